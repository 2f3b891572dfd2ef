"""The tokenizer a GGUF file describes, built with the `tokenizers` library from its metadata.

A GGUF carries no ``tokenizer.json``: it stores the vocabulary, token types, merges (byte-level
BPE) and special token ids under llama.cpp's key names. transformers can rebuild a tokenizer from
them, but its GGUF reader needs torch, and transformers before 5.24 rebuilt Gemma 3's wrongly
(" passport" in four pieces, no BOS). This module builds the same tokenizer as transformers
5.24+ (``integrations/gguf/gguf_tokenizer_mapping.py``: its Gemma and byte-level builders) from
the `gguf` reader's fields, so converting the embedded model needs neither torch nor a recent
transformers; `tests/test_gguf.py` checks the result token for token against transformers'.

Two kinds are supported, the ones of the families we convert:

* ``llama`` (SentencePiece) on Gemma: BPE with byte fallback over the vocabulary as the file
  spells it (a token of two or more spaces respelled with ``▁``), merges recovered from the
  vocabulary in file order (Gemma's scores do not follow its merge order), spaces normalised to
  ``▁``, ``<bos>`` in front when the file says so.
* ``gpt2`` (byte-level BPE) on Qwen2: the file's merges, split by the pre-tokenizer regex it
  names, then byte-level.

Control tokens become special tokens and user-defined ones (Gemma's runs of newlines) plain
added tokens, both matched whole before the model runs, as llama.cpp does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

__all__ = ["save_gguf_tokenizer"]

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types

# Pre-tokenizer splits of the byte-level vocabularies, by `tokenizer.ggml.pre`.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}

# transformers' tokenizer classes the folder names, so AutoTokenizer loads it as that family's.
_TOKENIZER_CLASSES = {"gemma3": "GemmaTokenizer", "gemma3_text": "GemmaTokenizer",
                      "qwen2": "Qwen2Tokenizer"}


def save_gguf_tokenizer(fields: dict[str, Any], out_dir: Path, model_type: str,
                        source: Path) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` for the GGUF metadata ``fields``
    (``tokenizer.ggml.*`` key -> value, ``tokens`` decoded to str) into ``out_dir``.

    Raises:
      ValueError: a tokenizer kind this module does not build (the message names the file).

    Example:
      >>> save_gguf_tokenizer(fields, Path("/tmp/gemma3-270m"), "gemma3_text", gguf_path)  # doctest: +SKIP
    """
    kind = fields.get("tokenizer.ggml.model")
    if kind == "llama" and model_type.startswith("gemma"):
        tokenizer = _gemma(fields)
    elif kind == "gpt2":
        tokenizer = _byte_level(fields, source)
    else:
        raise ValueError(f"{source}: cannot build a tokenizer of kind {kind!r} for model type "
                         f"{model_type!r}; supported: 'llama' (Gemma) and 'gpt2' (byte-level)")
    tokens = fields["tokenizer.ggml.tokens"]
    specials = _add_special_tokens(tokenizer, fields)
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    named = {name: tokens[fields[f"tokenizer.ggml.{key}_token_id"]]
             for name, key in (("bos_token", "bos"), ("eos_token", "eos"),
                               ("unk_token", "unknown"), ("pad_token", "padding"))
             if fields.get(f"tokenizer.ggml.{key}_token_id") is not None}
    _set_post_processor(tokenizer, named.get("bos_token") if add_bos else None,
                        named.get("eos_token") if add_eos else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": _TOKENIZER_CLASSES.get(model_type, "PreTrainedTokenizerFast"),
              **named, "add_bos_token": add_bos, "add_eos_token": add_eos,
              "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000_000,
              "added_tokens_decoder": specials}
    if kind == "llama" and "<mask>" in tokenizer.get_vocab():
        config["mask_token"] = "<mask>"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1,
                                                              ensure_ascii=False))


def _gemma(fields: dict[str, Any]) -> Tokenizer:
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t
              for t in fields["tokenizer.ggml.tokens"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    unk_id = fields.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else "<unk>"
    # Merge order: the order the merged tokens appear in the file (earlier merges first).
    merges = _merges_from_vocab(vocab, {token: -index for index, token in enumerate(tokens)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk,
                                     dropout=None, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous",
                                                   invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "),
                                           decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def _byte_level(fields: dict[str, Any], source: Path) -> Tokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {token if set(token) <= alphabet
             else "".join(spelling[byte] for byte in token.encode("utf-8")): index
             for index, token in enumerate(fields["tokenizer.ggml.tokens"])}
    if "tokenizer.ggml.merges" not in fields:
        raise ValueError(f"{source}: a byte-level (gpt2) vocabulary without merges")
    merges = [tuple(merge.split(" ")) for merge in fields["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                     continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False))
    split = _SPLITS.get(fields.get("tokenizer.ggml.pre"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tokenizer.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer, fields: dict[str, Any]) -> dict[str, dict]:
    """Control tokens as special tokens, user-defined ones as plain added tokens (both matched
    whole); returns them as ``added_tokens_decoder`` entries of ``tokenizer_config.json``."""
    tokens, types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type", [])
    byte_level = fields.get("tokenizer.ggml.model") == "gpt2"
    spelled = set(_bytes_to_unicode().values())
    named_ids = {fields.get(f"tokenizer.ggml.{key}_token_id")
                 for key in ("bos", "eos", "unknown", "padding")} - {None}
    # A control token outside the byte alphabet of a byte-level vocabulary is a llama.cpp
    # mislabel; adding it would grow the vocabulary past the model's (transformers skips it).
    control = [tokens[i] for i, kind in enumerate(types)
               if (kind == _CONTROL or i in named_ids)
               and not (byte_level and not set(tokens[i]) <= spelled)]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tokenizer.get_vocab()
    user = [tokens[i] for i, kind in enumerate(types) if kind == _USER_DEFINED and tokens[i] in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return {str(vocab[t]): {"content": t, "special": t in control, "normalized": False,
                            "lstrip": False, "rstrip": False, "single_word": False}
            for t in control + user}


def _set_post_processor(tokenizer: Tokenizer, bos: str | None, eos: str | None) -> None:
    if bos is None and eos is None:
        return
    first, last = ([f"{bos}:0"] if bos else []), ([f"{eos}:0"] if eos else [])
    second = [f"{bos}:1"] if bos else []
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(first + ["$A:0"] + last),
        pair=" ".join(first + ["$A:0"] + last + second + ["$B:1"] + [t.replace(":0", ":1")
                                                                   for t in last]),
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in {bos, eos} if t])


def _merges_from_vocab(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a vocabulary implies: every split of a token into two tokens of the
    vocabulary, best score first (transformers' ``generate_merges`` with ``vocab_scores``)."""
    merges = []
    for merge, score in scores.items():
        pieces = [(merge[:i], merge[i:], score) for i in range(1, len(merge))
                  if merge[:i] in vocab and merge[i:] in vocab]
        merges.extend(sorted(pieces, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table of byte-level vocabularies."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))
