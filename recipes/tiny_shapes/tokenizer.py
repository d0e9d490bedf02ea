"""A CLIP tokenizer whose vocabulary is the words of the shapes world.

CLIP's byte-pair encoder splits a word into characters (the last one marked ``</w>``) and then
applies merges in rank order. :func:`word_merges` derives, for a word list, merges under which
every listed word becomes exactly one token; other words still tokenize, into pieces.
"""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

from lindiff.data import VOCABULARY

SPECIAL_TOKENS: tuple[str, ...] = ("<|startoftext|>", "<|endoftext|>")
MODEL_MAX_LENGTH = 24
"""The longest caption of the grammar is 17 words; 24 positions hold it with BOS and EOS."""


def _apply(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge ``symbols`` the way CLIP's BPE does: always the lowest-ranked adjacent pair first."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(symbols))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        first, second = symbols[i], symbols[i + 1]
        merged, j = [], 0
        while j < len(symbols):
            if j < len(symbols) - 1 and symbols[j] == first and symbols[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols


def word_merges(words: Iterable[str], base: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """BPE merges under which each of ``words`` encodes to a single ``word</w>`` token.

    Merges are appended word by word, each new one ranked after all earlier ones (after
    ``base``'s, which come first in the result), so a later word's merges never change how an
    earlier word encodes.
    """
    merges: list[tuple[str, str]] = list(base)
    ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
    for word in words:
        symbols = _apply([*word[:-1], word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = _apply(symbols, ranks)
    return merges


def write_tokenizer(folder: str | Path, words: Iterable[str] = VOCABULARY) -> CLIPTokenizer:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config for ``words`` into ``folder``.

    The vocabulary holds the special tokens, every printable ASCII character (alone and
    word-final), every merge result, and so every word of ``words`` as one token.
    """
    words = [w for w in dict.fromkeys(w.lower() for w in words) if w]
    merges = word_merges(words)
    characters = [c for c in string.printable if not c.isspace()]
    tokens = [*characters, *(c + "</w>" for c in characters), *(a + b for a, b in merges), *SPECIAL_TOKENS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n", encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MODEL_MAX_LENGTH
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def extend_tokenizer(base: str | Path, folder: str | Path, words: Iterable[str]) -> CLIPTokenizer:
    """Write into ``folder`` the tokenizer of ``base`` with every word of ``words`` as one token.

    Existing tokens keep their ids and existing merges their ranks, so every text encodes as
    before unless it holds a new word; new tokens get the ids after the last one (the special
    tokens'), so a text encoder only needs new rows at the end of its embedding table.
    """
    base = Path(base)
    vocab = json.loads((base / "vocab.json").read_text(encoding="utf-8"))
    lines = (base / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    old = [tuple(line.split()) for line in lines if line]
    merges = word_merges(dict.fromkeys(w.lower() for w in words if w), base=old)
    for a, b in merges[len(old) :]:
        vocab.setdefault(a + b, len(vocab))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n", encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    old_tokenizer = CLIPTokenizer.from_pretrained(base)
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=old_tokenizer.model_max_length,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer
