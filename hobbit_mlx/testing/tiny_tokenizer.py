"""The tiny byte-level BPE tokenizer that every tiny model is saved with.

Its own module because it is independent of any architecture: the vocabulary
size and special-token ids here are what the configs in
:mod:`hobbit_mlx.testing.tiny_configs` point at, and both
:func:`~hobbit_mlx.testing.tiny_models.make_tiny_model` and
:func:`~hobbit_mlx.testing.tiny_hf_checkpoint.save_hf_per_expert` write it
next to the weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Union

VOCAB_SIZE = 512

# Special tokens of the tiny tokenizer.  Their ids are 0..len-1.
_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<s>", "</s>", "<pad>", "<unk>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

_TOKENIZER_CACHE: Dict[int, str] = {}
_CORPUS_BYTES = 256 * 1024
# The VOCAB_SIZE tokenizer as _train_tokenizer_json trained it on CPython 3.11's stdlib: the
# stdlib differs between Python versions (and distributions), and so would the tokens, the
# routing and the generated text that tests rely on.
_FROZEN = {VOCAB_SIZE: Path(__file__).with_name("tiny_tokenizer.json")}


def _training_text() -> str:
    """Deterministic training text: sorted stdlib sources, first few hundred KB."""
    stdlib = Path(os.__file__).parent
    chunks, total = [], 0
    for p in sorted(stdlib.glob("*.py")):
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunks.append(t)
        total += len(t)
        if total >= _CORPUS_BYTES:
            break
    text = "".join(chunks)[:_CORPUS_BYTES]
    # Make sure chat-ish English text is represented too.
    text += "\nHello, how are you? I am a tiny model. The quick brown fox.\n" * 20
    return text


def _train_tokenizer_json(vocab_size: int) -> str:
    if vocab_size in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE[vocab_size]
    if vocab_size in _FROZEN:
        _TOKENIZER_CACHE[vocab_size] = _FROZEN[vocab_size].read_text(encoding="utf-8")
        return _TOKENIZER_CACHE[vocab_size]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = _training_text()
    lines = text.splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError("tokenizer vocab larger than requested")
    s = tok.to_str()
    _TOKENIZER_CACHE[vocab_size] = s
    return s


def make_tokenizer(out_dir: Union[str, Path], vocab_size: int = VOCAB_SIZE):
    """Train (once per process) a byte-level BPE tokenizer and save it to out_dir.

    Returns the ``transformers`` tokenizer object.  Token ids 0..5 are the
    special tokens ``<pad> <s> </s> <unk> <|im_start|> <|im_end|>``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_str(_train_tokenizer_json(vocab_size))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _copy_tokenizer(src_dir: Optional[Path], out_dir: Path, vocab_size: int) -> None:
    if src_dir is not None and (src_dir / "tokenizer.json").exists():
        for f in _TOKENIZER_FILES:
            if (src_dir / f).exists():
                shutil.copy(src_dir / f, out_dir / f)
    else:
        make_tokenizer(out_dir, vocab_size)

