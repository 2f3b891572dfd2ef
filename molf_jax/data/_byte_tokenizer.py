"""A 260-token byte-level tokenizer built offline, for tiny models, smoke runs and tests."""

from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")


def _byte_symbols() -> list[str]:
    # The printable-character stand-ins GPT-2's byte-level BPE uses for the 256 byte values
    # (what `tokenizers.pre_tokenizers.ByteLevel` emits), listed in byte order.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_level_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per byte: id = byte + 4.

    Ids 0..3 are ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``. Any text round-trips through
    encode/decode, and nothing is downloaded.

    Example:
      >>> tok = byte_level_tokenizer()
      >>> tok('Hi', add_special_tokens=False)['input_ids'], len(tok)
      ([76, 109], 260)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in _byte_symbols():
        vocab[symbol] = len(vocab)
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )
