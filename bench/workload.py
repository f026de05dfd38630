"""What the benchmarks run: which model, which held-out prompts, which held-out text.

Shared by ``harness.py``, ``trace.py`` and ``offload_vs_mlx_lm.py`` so every number in
``bench/results`` comes from the same deterministic workload.

Model resolution (``resolve_model_paths``):

* ``--model`` given: an mlx-lm checkpoint (the baseline loads it with ``mlx_lm.load``; the hobbit
  side converts it once, or uses ``<checkpoint>/../hobbit`` when that store was converted from it),
  or a hobbit model directory whose manifest's ``source`` checkpoint still exists.
* no ``--model``: the bundled reference model ``hobbit_mlx/reference_model/`` when it exists (trained
  routing), else a tiny random-weight qwen3_moe that this module builds under ``TMP`` (random
  routing; its hit rates say nothing about trained routers).

Scratch directory (``TMP``): the generated models, converted stores and traces of the bench
scripts go to ``bench/results/tmp`` (git-ignored), or to ``$HOBBIT_BENCH_TMP`` when it is set.

Held-out text (``heldout_texts``): the validation files of the reference model's corpus split
(``reference/val_files.txt``, paths in the CPython standard library), in the listed order, those
of at least ``MIN_FILE_BYTES``, each cut to ``MAX_FILE_CHARS``: kept in ``reference/val_texts.json.gz``
as CPython 3.11's stdlib holds them (read from the running interpreter's stdlib they changed with
its version: 11 of the first 16 differ or are gone in 3.14, and every measurement with them);
when that file is missing, a few fixed Python snippets below.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
# git-ignored: generated models, converted stores, scratch output; $HOBBIT_BENCH_TMP moves it
TMP = (Path(os.environ["HOBBIT_BENCH_TMP"]).expanduser().resolve()
       if os.environ.get("HOBBIT_BENCH_TMP") else RESULTS / "tmp")
REFERENCE_MODEL = REPO / "hobbit_mlx" / "reference_model"
VAL_TEXTS = REPO / "reference" / "val_texts.json.gz"
MARKER = "bench_model.json"  # written next to config.json of models the bench scripts generate
MIN_FILE_BYTES = 3000
MAX_FILE_CHARS = 6000  # enough for a prompt or a perplexity piece; keeps encodes short

# The default model while the reference model does not exist: tiny, random weights, but with
# enough experts per layer that residency fractions mean something.
TINY_ARCH = "qwen3_moe"
TINY_OVERRIDES = {"hidden_size": 128, "num_hidden_layers": 4, "num_experts": 32,
                  "num_experts_per_tok": 4, "moe_intermediate_size": 64, "head_dim": 32}

FALLBACK_SNIPPETS = [
    '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def is_prime(n):
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True
''',
    '''import os
import sys


def walk_python_files(root):
    """Yield every .py file below root, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    total = 0
    for path in walk_python_files(argv[0] if argv else "."):
        with open(path, encoding="utf-8") as f:
            total += sum(1 for _ in f)
    print(total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
''',
    '''class Stack:
    """A last-in, first-out container."""

    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from empty stack")
        return self._items.pop()

    def peek(self):
        return self._items[-1]

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        return f"Stack({self._items!r})"
''',
    '''import json
from collections import Counter, defaultdict


def word_counts(lines):
    counts = Counter()
    for line in lines:
        for word in line.lower().split():
            counts[word.strip(".,;:!?")] += 1
    return counts


def group_by_length(words):
    groups = defaultdict(list)
    for word in words:
        groups[len(word)].append(word)
    return dict(sorted(groups.items()))


def save(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
''',
]


@dataclass
class ModelPaths:
    src: Path  # mlx-lm checkpoint: what the mlx-lm baseline loads
    hobbit: Path  # converted hobbit model directory
    name: str
    routing: str  # "trained", "random" or "unknown"

    def as_dict(self) -> dict:
        return {"src": str(self.src), "hobbit": str(self.hobbit), "name": self.name,
                "routing": self.routing}


def _routing_of(src: Path) -> str:
    marker = src / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("routing", "unknown")
        except (json.JSONDecodeError, OSError):
            return "unknown"
    if src.resolve() == REFERENCE_MODEL.resolve():
        return "trained"
    return "unknown"


def write_marker(src: Path, **info) -> None:
    (Path(src) / MARKER).write_text(json.dumps(info, indent=1))


def ensure_tiny_default(progress: bool = True) -> Path:
    """The tiny random qwen3_moe used while the reference model does not exist (built once)."""
    from convert import convert
    from hobbit_mlx.store import is_hobbit_model
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    root = TMP / "tiny-qwen3_moe-32e"
    src, dst = root / "mlx", root / "hobbit"
    if not (src / "config.json").is_file() or not (src / MARKER).is_file():
        if progress:
            print(f"[bench] building the tiny default model in {root}")
        make_tiny_model(TINY_ARCH, src, quantize=True, config_overrides=TINY_OVERRIDES)
        write_marker(src, routing="random", made_by="bench/workload.py ensure_tiny_default",
                     arch=TINY_ARCH, overrides=TINY_OVERRIDES)
    if not is_hobbit_model(dst):
        convert(src, dst, force=True, progress=False)
    return src


def _sibling_store(src: Path) -> Path | None:
    """``<src>/../hobbit`` when it is a store converted from ``src`` (what the bench scripts make)."""
    from hobbit_mlx.store import is_hobbit_model, load_manifest

    cand = src.parent / "hobbit"
    if is_hobbit_model(cand):
        source = load_manifest(cand, check_files=False).source
        if source and Path(source).expanduser().resolve() == src.resolve():
            return cand
    return None


def resolve_model_paths(model: str | Path | None, progress: bool = True) -> ModelPaths:
    from hobbit_mlx.loader import resolve_model
    from hobbit_mlx.store import is_hobbit_model, load_manifest

    if model is None:
        if (REFERENCE_MODEL / "config.json").is_file():
            src = REFERENCE_MODEL
        else:
            src = ensure_tiny_default(progress)
    else:
        src = Path(model).expanduser()
        if not src.exists():
            raise ValueError(f"{src}: no such model directory")
    if is_hobbit_model(src):
        hobbit = src
        source = load_manifest(src, check_files=False).source
        if not source or not (Path(source).expanduser() / "config.json").is_file():
            raise ValueError(
                f"{src} is a converted hobbit model whose source checkpoint ({source or 'unknown'}) "
                "is not here; the mlx-lm baseline needs the mlx-lm checkpoint: pass --model SRC")
        src = Path(source).expanduser()
    else:
        hobbit = _sibling_store(src) or resolve_model(src, progress=progress)
    name = src.name if src.name not in ("mlx", "model") else src.parent.name
    if src.resolve() == REFERENCE_MODEL.resolve():
        name = "reference"
    return ModelPaths(src=src, hobbit=Path(hobbit), name=name, routing=_routing_of(src))


def heldout_texts(max_files: int = 16) -> tuple[list[str], str]:
    """(texts, description): validation files of the reference corpus, else fixed snippets."""
    try:
        kept = json.loads(gzip.decompress(VAL_TEXTS.read_bytes()))
    except (OSError, ValueError):
        return list(FALLBACK_SNIPPETS), "fixed Python snippets (bench/workload.py FALLBACK_SNIPPETS)"
    used = list(kept["texts"])[:max_files]
    return ([kept["texts"][rel][:MAX_FILE_CHARS] for rel in used],
            f"validation files of reference/val_files.txt ({kept['source']}; "
            f"{VAL_TEXTS.relative_to(REPO)}): " + ", ".join(used))


def heldout_text(rel: str) -> str:
    """One validation file's kept text (its first ``MAX_FILE_CHARS``), by its stdlib path."""
    return json.loads(gzip.decompress(VAL_TEXTS.read_bytes()))["texts"][rel]


# The harness's default workload (trace.py uses the same): prompts x (prefill + greedy decode),
# and held-out pieces for teacher-forced perplexity. QUICK: the smoke variant of the test suite.
DEFAULT_WORKLOAD = dict(n_prompts=2, prompt_tokens=96, max_tokens=128, n_ppl=1, ppl_tokens=129)
QUICK_WORKLOAD = dict(n_prompts=1, prompt_tokens=32, max_tokens=16, n_ppl=1, ppl_tokens=33)


@dataclass
class Workload:
    prompts: list[list[int]]  # prompt token ids (prefill), one list per prompt
    max_tokens: int  # greedy decode length per prompt (EOS does not stop it)
    ppl_pieces: list[list[int]]  # held-out token sequences for teacher-forced perplexity
    source: str
    settings: dict = field(default_factory=dict)

    @property
    def max_context(self) -> int:
        longest = max([len(p) + self.max_tokens + 1 for p in self.prompts]
                      + [len(p) for p in self.ppl_pieces] + [1])
        return (longest + 255) // 256 * 256

    def as_dict(self) -> dict:
        return {"source": self.source, "max_tokens": self.max_tokens,
                "prompt_tokens": [len(p) for p in self.prompts],
                "ppl_tokens": [len(p) for p in self.ppl_pieces], **self.settings}


def _pieces(token_lists: list[list[int]], count: int, length: int, it=None):
    """``count`` pieces of ``length`` tokens: one text each, concatenating the next when short."""
    it = it if it is not None else itertools.cycle(token_lists)
    out = []
    for _ in range(count):
        buf: list[int] = []
        while len(buf) < length:
            buf.extend(next(it))
        out.append(buf[:length])
    return out, it


def make_workload(tokenizer, *, n_prompts: int = 3, prompt_tokens: int = 128,
                  max_tokens: int = 256, n_ppl: int = 2, ppl_tokens: int = 257) -> Workload:
    texts, source = heldout_texts(max_files=n_prompts + n_ppl)
    token_lists = [list(tokenizer.encode(t)) for t in texts]
    token_lists = [t for t in token_lists if t]
    prompts, it = _pieces(token_lists, n_prompts, prompt_tokens)
    ppl, _ = _pieces(token_lists, n_ppl, ppl_tokens, it)  # the texts after the prompts' ones
    return Workload(prompts, max_tokens, ppl, source,
                    {"n_prompts": n_prompts, "n_ppl": n_ppl, "greedy": True})
