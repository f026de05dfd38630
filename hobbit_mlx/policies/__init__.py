"""Cache replacement policies behind one small interface.

A policy only ranks keys; the cache owns the bytes and the budget. Keys are
``(layer, expert, precision)`` tuples. ``victim`` picks the key to evict among those ``evictable`` accepts (resident, unpinned).
"""

from __future__ import annotations

from typing import Callable, Hashable, Protocol

Key = Hashable


class Policy(Protocol):
    name: str

    def on_insert(self, key: Key) -> None: ...
    def on_hit(self, key: Key) -> None: ...
    def on_evict(self, key: Key) -> None: ...
    def victim(self, evictable: Callable[[Key], bool]) -> Key: ...
    def reset(self) -> None: ...
    # optional: on_layer(layer) is called before each MoE layer runs; on_hits(keys) for many
    # resident keys at once (one layer call's hits); on_prefetch(key) instead of
    # on_insert for an expert read ahead of any request (a frequency policy counts no use)


from .arc import ARCPolicy  # noqa: E402
from .hobbit import HobbitPolicy, ShallowFavoringPolicy  # noqa: E402
from .lfu import LFUPolicy  # noqa: E402
from .lru import LRUPolicy  # noqa: E402
from .seqfreq import SequenceFrequencyPolicy  # noqa: E402

POLICIES: dict[str, Callable[..., Policy]] = {
    "lru": LRUPolicy, "lfu": LFUPolicy, "arc": ARCPolicy, "hobbit": HobbitPolicy,
    "shallow": ShallowFavoringPolicy, "seqfreq": SequenceFrequencyPolicy}


HOOKS = ("on_insert", "on_hit", "on_hits", "on_evict", "reset", "on_layer", "on_prefetch")


def forward_hooks(wrapper, inner: Policy) -> None:
    """Give a policy that wraps ``inner`` (and only changes ``victim``) every hook ``inner`` has,
    and none it lacks: callers test for the optional ones with ``hasattr``."""
    for hook in HOOKS:
        if hasattr(inner, hook):
            setattr(wrapper, hook, getattr(inner, hook))


class ProtectShallow:
    """Any policy, with the experts of the first ``layers`` layers evicted only when nothing
    deeper can be. Prefetch predicts a layer from the one before it, so the first layer is the
    one it can never cover: keeping it resident is what Fate's shallow-favoring cache is for."""

    def __init__(self, inner: Policy, layers: int) -> None:
        self.inner, self.layers = inner, layers
        self.name = f"{inner.name}+shallow{layers}"
        forward_hooks(self, inner)

    def victim(self, evictable: Callable[[Key], bool]) -> Key:
        try:
            return self.inner.victim(lambda k: k[0] >= self.layers and evictable(k))
        except LookupError:
            return self.inner.victim(evictable)


def check_policy_options(name: str, options: dict) -> None:
    """A user's ``policy_options`` name only what the policy takes (``make_policy`` drops the
    rest silently, which is right for the runtime's own extras, not for a typo)."""
    import inspect

    if name not in POLICIES:
        return  # (make_policy names the unknown policy)
    accepted = set(inspect.signature(POLICIES[name]).parameters) | {"shallow_layers"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"policy_options {', '.join(unknown)} are not options of the "
                         f"{name!r} policy (it takes {', '.join(sorted(accepted))})")


def make_policy(name: str, shallow_layers: int = 0, **kwargs) -> Policy:
    """Build a policy by name; options it does not take (e.g. ``num_layers``) are ignored.
    ``shallow_layers`` > 0 keeps that many leading layers resident first (``ProtectShallow``)."""
    import inspect

    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    factory = POLICIES[name]
    accepted = inspect.signature(factory).parameters
    policy = factory(**{k: v for k, v in kwargs.items() if k in accepted})
    return ProtectShallow(policy, shallow_layers) if shallow_layers > 0 else policy
