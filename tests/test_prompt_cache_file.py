"""A prompt prefilled once and saved (``python -m hobbit_mlx.cache_prompt``), continued later by
``python -m hobbit_mlx.generate --prompt-cache-file``: mlx-lm's file format both ways."""

from __future__ import annotations

import importlib
import os

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

import hobbit_mlx
from hobbit_mlx import cache_prompt, cli_common, cli_flags
from hobbit_mlx.loader import REFERENCE_MODEL

DOC = "def add(a, b):\n    return a + b\n\n" * 12 + "class Stack:\n    def push(self, x):\n"
QUESTION = "Write sub."
generate_cli = importlib.import_module("hobbit_mlx.generate")  # (the package's attribute is the API's)


def tokens_of(module, argv: list[str], tokenizer, **kw) -> list[int]:
    """The prompt tokens a CLI builds from ``argv``."""
    args = module.setup_arg_parser().parse_args(argv)
    cli_flags.check_args(args)
    return module.build_prompt(args, tokenizer, **kw)


def test_a_saved_prompt_continued_gives_the_text_of_the_whole_prompt(tmp_path, capsys):
    """Exact mode under a budget that streams experts: the cached document and the question
    after it give the text of one generation over both (the saved prefill read its experts
    once, the question's run did not read them again)."""
    path = tmp_path / "doc.safetensors"
    flags = ["--memory-budget", "12MB", "--exact"]
    assert cli_common.run(cache_prompt.main, ["--prompt", DOC, "--prompt-cache-file", str(path),
                                              *flags]) == 0
    report = capsys.readouterr().err
    assert "Saved " in report and "Generation:" not in report
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # (not mkstemp's 0600)
    assert not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left

    assert cli_common.run(generate_cli.main, ["--prompt-cache-file", str(path), "--prompt",
                                              QUESTION, "--max-tokens", "12", *flags]) == 0
    continued = capsys.readouterr().out.rstrip("\n")
    assert continued

    model, tokenizer = hobbit_mlx.load(REFERENCE_MODEL, memory_budget="12MB", exact=True,
                                       progress=False)
    head = tokens_of(cache_prompt, ["--prompt", DOC, "--prompt-cache-file", str(path)], tokenizer)
    tail = tokens_of(generate_cli, ["--prompt", QUESTION], tokenizer, continues=True)
    assert tokenizer.decode(tail).startswith(QUESTION)  # the open user message goes on
    assert hobbit_mlx.generate(model, tokenizer, head + tail, max_tokens=12) == continued

    cache, metadata = load_prompt_cache(str(path), return_metadata=True)  # mlx-lm reads it
    assert cache[0].offset == len(head) and metadata["model"] == str(REFERENCE_MODEL)


@pytest.mark.parametrize("text", [DOC, "def add(a, b):"], ids=["by-layer", "short"])
def test_prefill_only_fills_the_cache_and_yields_nothing(text):
    """Both ways a prompt is prefilled: layer by layer (a long one), mlx-lm's (a short one: it
    failed with a TypeError)."""
    model, tokenizer = hobbit_mlx.load(REFERENCE_MODEL, memory_budget="12MB", exact=True,
                                       progress=False)
    tokens = tokenizer.encode(text)
    cache = make_prompt_cache(model)
    assert list(hobbit_mlx.stream_generate(model, tokenizer, tokens, max_tokens=0,
                                           prompt_cache=cache)) == []
    assert cache[0].offset == len(tokens)
    assert hobbit_mlx.offload_stats(model)["misses_high"] > 0  # (it ran, reading experts)


def test_a_cache_mlx_lm_saved_continues_as_in_mlx_lm(tmp_path, capsys):
    """A file made with mlx-lm's own prefill on the whole model: hobbit's continuation (exact,
    experts streamed) is mlx-lm's with the same file."""
    from mlx_lm.generate import generate_step

    ref, tokenizer = mlx_lm.load(str(REFERENCE_MODEL))
    ref.set_dtype(mx.float32)
    tokens = tokenizer.encode(DOC)
    cache = make_prompt_cache(ref)
    for _ in generate_step(mx.array(tokens), ref, max_tokens=0, prompt_cache=cache):
        pass
    path = tmp_path / "mlx-lm.safetensors"
    save_prompt_cache(str(path), cache, {"model": str(REFERENCE_MODEL), "tokenizer_config": "{}"})
    # (without a template mlx-lm's CLI would put a BOS token here, mid-sequence; ours does not)
    want = mlx_lm.generate(ref, tokenizer, tokenizer.encode(QUESTION, add_special_tokens=False),
                           max_tokens=10, prompt_cache=load_prompt_cache(str(path)))

    assert cli_common.run(generate_cli.main, [
        "--prompt-cache-file", str(path), "--prompt", QUESTION, "--ignore-chat-template",
        "--max-tokens", "10", "--memory-budget", "12MB", "--exact", "--quiet-report"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == want


@pytest.mark.parametrize("argv, needle", [
    (["--prompt-cache-file", "{d}/none.safetensors"], "no such file"),
    (["--prompt-cache-file", "{d}/not-a-cache.safetensors"], "is not a prompt cache"),
    (["--prompt-cache-file", "{d}/doc.safetensors", "--model", "{d}"], "is not the model"),
    (["--prompt-cache-file", "{d}/doc.safetensors", "--max-kv-size", "64"], "--max-kv-size"),
])
def test_generate_refuses_a_cache_file_it_cannot_continue(tmp_path, capsys, argv, needle):
    (tmp_path / "not-a-cache.safetensors").write_bytes(b"\x00" * 64)
    save_prompt_cache(str(tmp_path / "doc.safetensors"),
                      make_prompt_cache(mlx_lm.load(str(REFERENCE_MODEL))[0]),
                      {"model": str(REFERENCE_MODEL), "tokenizer_config": "{}"})
    argv = [a.format(d=tmp_path) for a in argv]
    assert cli_common.run(generate_cli.main, argv + ["--prompt", QUESTION]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_a_file_made_against_a_checkpoint_continues_on_its_conversion(tmp_path, capsys):
    """The model is the checkpoint the weights came from, not the directory's path: a file made
    with the reference checkpoint continues on a ``convert --copy`` of it (it was refused as
    another model), and a file named after that copy continues on the checkpoint."""
    from convert import convert

    copy = convert(REFERENCE_MODEL, tmp_path / "copy", copy=True, progress=False)
    path = tmp_path / "doc.safetensors"
    empty = make_prompt_cache(mlx_lm.load(str(REFERENCE_MODEL))[0])
    save_prompt_cache(str(path), empty, {"model": str(REFERENCE_MODEL), "tokenizer_config": "{}"})
    ask = ["--prompt-cache-file", str(path), "--prompt", QUESTION, "--max-tokens", "4",
           "--memory-budget", "12MB", "--quiet-report"]
    assert cli_common.run(generate_cli.main, ask + ["--model", str(copy)]) == 0
    save_prompt_cache(str(path), empty, {"model": str(copy), "tokenizer_config": "{}"})
    assert cli_common.run(generate_cli.main, ask + ["--model", str(REFERENCE_MODEL)]) == 0
    assert cli_common.run(generate_cli.main, ask + ["--model", str(tmp_path)]) == 2
    assert "is not the model the prompt cache" in capsys.readouterr().err


@pytest.mark.parametrize("name, needle", [("doc.bin", "must end in .safetensors"),
                                          ("nodir/doc.safetensors", "no directory"),
                                          ("", "is a directory")])
def test_cache_prompt_refuses_a_file_it_cannot_write_before_the_load(tmp_path, capsys, name,
                                                                      needle):
    target = str(tmp_path / name) if name else str(tmp_path) + "/x.safetensors"
    if not name:
        os.mkdir(target)
    assert cli_common.run(cache_prompt.main, ["--prompt", DOC, "--prompt-cache-file", target,
                                              "--model", "/nonexistent"]) == 2
    assert needle in capsys.readouterr().err  # (checked before the model: no load error)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_question_after_an_assistant_prefill_continues_the_user_message():
    """With --prefill-response the marker goes in the user message (mlx-lm's puts it in the
    assistant's, and the question was lost)."""
    _, tokenizer = mlx_lm.load(str(REFERENCE_MODEL))
    args = generate_cli.setup_arg_parser().parse_args(["--prompt", QUESTION,
                                                        "--prefill-response", "Sure:"])
    cli_flags.check_args(args)
    text = tokenizer.decode(generate_cli.build_prompt(args, tokenizer, continues=True))
    assert text.startswith(QUESTION) and text.rstrip().endswith("Sure:")


def test_a_quantized_cache_sets_the_kv_bits_the_budget_plans_for(tmp_path, capsys):
    from hobbit_mlx.testing.tiny_models import make_tiny_model

    src = make_tiny_model("qwen3_moe", tmp_path / "mlx", config_overrides={"head_dim": 32})
    path = str(tmp_path / "q.safetensors")
    assert cli_common.run(cache_prompt.main, [
        "--model", str(src), "--prompt", DOC, "--prompt-cache-file", path, "--kv-bits", "8",
        "--kv-group-size", "32", "--quantized-kv-start", "0", "--ignore-chat-template",
        "--quiet-report"]) == 0
    assert load_prompt_cache(path)[0].bits == 8
    ask = ["--prompt-cache-file", path, "--prompt", QUESTION, "--ignore-chat-template",
           "--max-tokens", "4", "--quiet-report"]
    assert cli_common.run(generate_cli.main, ask) == 0  # (the model and its KV bits from the file)
    capsys.readouterr()
    assert cli_common.run(generate_cli.main, ask + ["--kv-bits", "4"]) == 2
    assert "do not match the cache" in capsys.readouterr().err


def test_the_file_keeps_end_tokens_and_an_absolute_model_path(tmp_path, monkeypatch, capsys):
    """The end tokens given to cache_prompt reach generate through the file (mlx-lm's
    --eos-token too), and a model given by a relative path is found from anywhere."""
    import shutil

    model = tmp_path / "ref"
    shutil.copytree(REFERENCE_MODEL, model)
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "doc.safetensors")
    assert cli_common.run(cache_prompt.main, ["--model", "ref", "--prompt", DOC,
                                              "--prompt-cache-file", path, "--memory-budget",
                                              "12MB", "--extra-eos-token", "<|im_end|>", "x",
                                              "--quiet-report"]) == 0
    _, metadata = load_prompt_cache(path, return_metadata=True)
    assert metadata["model"] == str(model)
    assert '"eos_token": "<|im_end|>"' in metadata["tokenizer_config"]
    monkeypatch.chdir(REFERENCE_MODEL.parent)  # (elsewhere)
    args = generate_cli.setup_arg_parser().parse_args(["--prompt-cache-file", path,
                                                        "--extra-eos-token", "y"])
    cache_prompt.read(args)
    assert args.model == str(model) and args.extra_eos_token == ["y", "<|im_end|>", "x"]
    args.system_prompt = "be brief"
    with pytest.raises(cli_common.CLIError, match="--system-prompt with --prompt-cache-file"):
        cache_prompt.read(args)


def test_a_cache_of_other_shapes_is_one_error_line(tmp_path, capsys):
    """Same name and layer count, other attention shapes (the model changed since): one line
    where mlx-lm ends in a traceback."""
    from mlx_lm.generate import generate_step

    from hobbit_mlx.testing.tiny_models import make_tiny_model

    wide = make_tiny_model("qwen3_moe", tmp_path / "wide", config_overrides={"head_dim": 32})
    narrow = make_tiny_model("qwen3_moe", tmp_path / "narrow")
    ref, _ = mlx_lm.load(str(wide))
    cache = make_prompt_cache(ref)
    for _ in generate_step(mx.array([5, 6, 7, 8]), ref, max_tokens=0, prompt_cache=cache):
        pass
    path = str(tmp_path / "wide.safetensors")
    save_prompt_cache(path, cache, {"model": str(narrow), "tokenizer_config": "{}"})
    assert cli_common.run(generate_cli.main, ["--prompt-cache-file", path, "--prompt", "9",
                                              "--ignore-chat-template", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "Traceback" not in err
