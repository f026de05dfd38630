"""A manifest that is not what the store holds fails at load, naming manifest.json, the layer,
the precision and the problem (not silent garbage, nor a traceback mid-reply)."""

from __future__ import annotations

import json
import shutil

import pytest

import convert as converter
import hobbit_mlx
from hobbit_mlx.loader import runtime_of
from hobbit_mlx.store import StoreError, load_manifest


@pytest.fixture(scope="module")
def pristine(tiny_factory, tmp_path_factory):
    """A converted copy (it reads nothing in place), left as is: each test edits a copy of it."""
    src, _ = tiny_factory("qwen3_moe")
    return converter.convert(src, tmp_path_factory.mktemp("pristine") / "model", progress=False,
                             copy=True)


def _edited(pristine, tmp_path, edit):
    """A copy of ``pristine`` whose manifest ``edit(manifest_json)`` changed."""
    model = shutil.copytree(pristine, tmp_path / "model")
    path = model / "experts" / "manifest.json"
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    return model


def _high(obj, layer=1):
    return obj["layers"][layer]["precisions"]["high"]


def _set_dtype(suffix, dtype):
    def edit(obj):
        for t in _high(obj)["tensors"]:
            if t[0].endswith(suffix):
                t[1] = dtype
    return edit


def _halve_first_weight(obj):
    t = next(t for t in _high(obj)["tensors"] if t[0].endswith(".weight"))
    t[2] = [t[2][0] // 2, t[2][1]]


def _set_span(index, value):
    def edit(obj):
        _high(obj)["records"][0]["spans"][0][index] = value
    return edit


MALFORMED = {
    "a missing record": (lambda obj: _high(obj)["records"].pop(),
                         r"layer 1 high: (\d+) records, needs \d+"),
    "a file index out of range": (_set_span(0, 99), r"layer 1 high: record 0 names file 99"),
    "a negative offset": (_set_span(1, -4096), r"layer 1 high: record 0 starts at byte -4096"),
    "an unknown dtype": (_set_dtype("down_proj.weight", "Q7"),
                         r"layer 1 high: tensor down_proj.weight has unknown dtype 'Q7'"),
    "a narrower dtype": (_set_dtype(".scales", "F16"), r"layer 1 high: .*dtype or shape is wrong"),
    "a smaller shape": (_halve_first_weight, r"layer 1 high: .*dtype or shape is wrong"),
    "a missing tensor": (lambda obj: _high(obj)["tensors"].pop(
        next(i for i, t in enumerate(_high(obj)["tensors"]) if t[0] == "up_proj.scales")),
                         r"layer 1 high: tensor up_proj.scales is missing"),
    "a span shorter than its tensors": (_set_span(2, 64),
                                        r"layer 1 high: record 0 span 0 is 64 bytes"),
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_malformed_manifest_fails_at_load_naming_layer_and_problem(pristine, tmp_path, what):
    edit, message = MALFORMED[what]
    model = _edited(pristine, tmp_path, edit)
    with pytest.raises(StoreError, match=rf"manifest\.json: {message}"):
        load_manifest(model)
    with pytest.raises(StoreError, match=rf"manifest\.json: {message}"):
        hobbit_mlx.load(model, progress=False)


def test_pristine_manifest_loads(pristine):
    assert len(load_manifest(pristine).layers) == 2


@pytest.mark.parametrize("edit,message", [
    # same bytes, read as another dtype: only the model's own layout can tell
    (_set_dtype("gate_proj.weight", "F32"),
     r"layer 1 high: tensor gate_proj.weight has dtype F32, the model reads U32"),
    # another width: every span still filled, the shapes are not what the module reads
    (lambda obj: _high(obj)["quant"]["down_proj"].update(bits=8),
     r"layer 1 high: tensor down_proj.weight has shape \[\d+, \d+\], the model reads"),
], ids=["weight dtype", "quant bits"])
def test_layout_the_config_does_not_build_fails_at_load(pristine, tmp_path, edit, message):
    model = _edited(pristine, tmp_path, edit)
    with pytest.raises(StoreError, match=rf"manifest\.json: {message}"):
        hobbit_mlx.load(model, progress=False)


def test_mismatch_with_config_names_the_layer_that_differs(pristine, tmp_path):
    def edit(obj):
        obj["layers"][1]["module"] = "model.layers.1.mlp.experts"
    model = _edited(pristine, tmp_path, edit)
    with pytest.raises(StoreError, match=r"does not match config.json: MoE layer 1 is "
                       r"model\.layers\.1\.mlp\.switch_mlp with \d+ experts in the config, "
                       r"model\.layers\.1\.mlp\.experts with \d+ experts in the manifest"):
        hobbit_mlx.load(model, progress=False)


def test_missing_low_records_fail_where_the_options_read_them(pristine, tmp_path):
    def edit(obj):
        del obj["layers"][1]["precisions"]["low"]
    model = _edited(pristine, tmp_path, edit)
    with pytest.raises(StoreError, match=r"manifest\.json: layer 1 has no 'low' .*exact"):
        hobbit_mlx.load(model, progress=False)
    loaded, _ = hobbit_mlx.load(model, exact=True, progress=False)  # exact reads 4-bit only
    runtime_of(loaded).close()


def test_checksum_error_says_whether_the_source_or_the_store_changed(tiny_factory, pristine):
    from hobbit_mlx.store import checksum_error

    _, in_place = tiny_factory("qwen3_moe")
    manifest = load_manifest(in_place)
    span = manifest.layers[0].precisions["high"].records[0].spans[0]
    assert manifest.files[span[0]] in manifest.references
    err = str(checksum_error(in_place, manifest, span))
    assert "source checkpoint this model reads in place has changed" in err
    assert f"python -m convert {manifest.source} {in_place} --force" in err
    copy = load_manifest(pristine)
    err = str(checksum_error(pristine, copy, copy.layers[0].precisions["high"].records[0].spans[0]))
    assert "the expert store is corrupt" in err and "--force" in err
