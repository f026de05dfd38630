"""Shared fixtures: tiny random MoE models of each architecture, built once per test session."""

from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def freeze_what_earlier_modules_left():
    """What is alive when a test module starts (the libraries, ~90,000 objects, and what the
    modules before it left), frozen out of the garbage collector's sweeps after one collection
    has freed what they dropped: every ``load`` and every measurement collects (to free models
    dropped earlier), and in a worker each collection had come to walk all that again, ~0.2 s,
    168 s of the suite's test time. Garbage this module makes is young and still collected;
    what was alive before it and dies during it waits for the next module's collection."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def conversion_cache(tmp_path_factory):
    """The cache ``load`` converts into, for the whole session: under the session's temporary
    directory, shared by the xdist workers (conversions into it are locked), not the user's
    (tests left hundreds of conversions of deleted temporary models there). A test's own
    ``HOBBIT_MLX_CACHE`` wins over it."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "hobbit_mlx_cache"
    os.environ["HOBBIT_MLX_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """``get(arch, quantize=True) -> (mlx-lm checkpoint dir, converted hobbit dir)``, cached."""
    from convert import convert
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    built: dict = {}

    def get(arch: str, quantize: bool = True):
        key = (arch, quantize)
        if key not in built:
            root = tmp_path_factory.mktemp(f"{arch}-{'q' if quantize else 'f'}")
            src = make_tiny_model(arch, root / "mlx", quantize=quantize)
            dst = convert(src, root / "hobbit", progress=False)
            built[key] = (src, dst)
        return built[key]

    return get


@pytest.fixture(scope="session")
def deep_models(tmp_path_factory):
    """``get(arch) -> converted hobbit dir`` of four-layer tiny models (two layers ahead of layer
    0 exist to stack predictions), cached."""
    from convert import convert
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    built: dict = {}

    def get(arch: str):
        if arch not in built:
            root = tmp_path_factory.mktemp(f"{arch}-deep")
            overrides = {"num_hidden_layers": 4}
            if arch == "gpt_oss":
                overrides["layer_types"] = ["sliding_attention", "full_attention"] * 2
            src = make_tiny_model(arch, root / "mlx", config_overrides=overrides)
            built[arch] = convert(src, root / "hobbit", progress=False)
        return built[arch]

    return get
