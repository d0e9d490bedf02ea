"""The CLIP tokenizer over the caption vocabulary."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

from lindiff.data import VOCABULARY
from recipes.tiny_shapes.tokenizer import word_merges, write_tokenizer


def test_tokenizer_keeps_every_word_whole(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    for word in VOCABULARY:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))
    tokens = tokenizer.tokenize("two blue stars to the left of a red circle")
    assert tokens == [
        w + "</w>" for w in ["two", "blue", "stars", "to", "the", "left", "of", "a", "red", "circle"]
    ]
    assert tokenizer.tokenize("a purple dragon")[:2] == ["a</w>", "purple</w>"]
    ids = tokenizer("a purple dragon!").input_ids  # unknown words become pieces, never <unk>
    assert ids.count(tokenizer.unk_token_id) == 1 and ids[-1] == tokenizer.eos_token_id


def test_word_merges_later_words_do_not_change_earlier_ones() -> None:
    first = word_merges(["red", "green"])
    both = word_merges(["red", "green", "reddish", "greener"])
    assert both[: len(first)] == first
