"""A call served by a 4-bit and a 2-bit part sends every part's reads to storage before it waits
for any: the device reads the 2-bit misses while the host waits for the 4-bit ones and builds
their run (one wait per call for the device, not one per part)."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

import hobbit_mlx
import hobbit_mlx.fetch as fetch_module
import hobbit_mlx.offload as offload
from hobbit_mlx.loader import runtime_of


def test_both_parts_read_before_either_is_waited_for(tiny_factory, monkeypatch):
    _, dst = tiny_factory("qwen3_moe")
    monkeypatch.setattr(fetch_module, "INLINE_READ_S", 0.0)  # reads go to reader threads
    events = []  # ("submit" | "wait", precision), per layer call: ("call",)
    finish = offload.Fetch.finish

    def noted_finish(self):
        if self.pending:
            events.append(("wait", self.precision))
        return finish(self)

    monkeypatch.setattr(offload.Fetch, "finish", noted_finish)
    model, _ = hobbit_mlx.load(dst, expert_residency=0.3, adapt_to_storage=False, t1=0.5,
                               t2=1.0, big_little=False, progress=False)
    rt = runtime_of(model)
    submit = rt.reader.submit_into
    rt.reader.submit_into = lambda entry, *a, **k: (
        events.append(("submit", "low" if entry.bits < 4 else "high")) or submit(entry, *a, **k))
    synced = offload.OffloadedSwitch._synced_call
    monkeypatch.setattr(offload.OffloadedSwitch, "_synced_call",
                        lambda self, *a: events.append(("call",)) or synced(self, *a))
    cache = make_prompt_cache(model)
    for t in [(13 * i + 7) % 200 + 1 for i in range(24)]:
        mx.eval(model(mx.array([[t]]), cache=cache))
    calls, current = [], None
    for e in events:
        if e == ("call",):
            current = []
            calls.append(current)
        elif current is not None:
            current.append(e)
    both = [c for c in calls if ("submit", "high") in c and ("submit", "low") in c]
    assert both, "no call read both 4-bit and 2-bit copies"
    for c in both:  # every read of the call went out before its first wait
        first_wait = next(i for i, e in enumerate(c) if e[0] == "wait")
        assert all(i < first_wait for i, e in enumerate(c) if e[0] == "submit")
