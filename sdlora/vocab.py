"""CLIP's byte-level BPE vocabulary, the starting point of the built-in tokenizers (tiny models, toy base)."""

from __future__ import annotations


def byte_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary: every byte, with and without the end-of-word mark."""
    chars = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = chars[:], 0
    for b in range(256):
        if b not in chars:
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    vocab = {}
    for s in symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[s] = len(vocab)
    return vocab
