"""Detokenizer and StopStrings: streamed pieces add up to the whole text, never half a character or stop."""

from __future__ import annotations

import pytest
from helpers.net import ByteTokenizer
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hmoe.runtime.detokenizer import MAX_HOLD_TOKENS, Detokenizer
from hmoe.runtime.stop_strings import StopStrings


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE like the demo model's: merges over ASCII and a little CJK/accents, bytes for the rest."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        ["hello world, the quick brown fox", "héllo wörld 中文 テスト emoji 🙂 ok"] * 20, trainer=trainer
    )
    return tok


def stream(decoder, ids: list[int]) -> list[str]:
    detok = Detokenizer(decoder)
    return [detok.push([i]) for i in ids] + [detok.flush()]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
@example("<|end|>")  # found by hypothesis in a CI-like run: the special token's own text
@example("a <|end|>b")
def test_pieces_concatenate_to_the_text_and_never_split_a_character(bpe, text):
    ids = bpe.encode(text).ids
    pieces = stream(bpe, ids)
    assert "".join(pieces) == bpe.decode(ids)
    # A special token's text encodes to the special token, which is not shown (test below).
    assert "".join(pieces) == text.replace("<|end|>", "")
    assert not any("\ufffd" in p for p in pieces)


def test_a_character_split_over_tokens_waits_for_its_last_byte():
    assert stream(ByteTokenizer(), list("a中".encode())) == ["a", "", "", "中", ""]
    assert stream(ByteTokenizer(), list("🙂".encode())) == ["", "", "", "🙂", ""]


def test_bytes_that_never_complete_a_character_still_flow():
    cut = stream(ByteTokenizer(), [0xE4, 0xB8, ord("x"), ord("y")])  # a 3-byte character cut after 2 bytes
    assert cut == ["", "", "\ufffdx", "y", ""]
    stray = stream(ByteTokenizer(), [0x80] * 6)  # continuation bytes with no start
    assert (
        stray[: MAX_HOLD_TOKENS - 1] == [""] * (MAX_HOLD_TOKENS - 1) and stray[MAX_HOLD_TOKENS - 1]
    )  # held, then shown
    assert "".join(stray) == "\ufffd" * 6


def test_special_tokens_are_not_shown(bpe):
    end = bpe.token_to_id("<|end|>")
    assert "".join(stream(bpe, bpe.encode("hello").ids + [end])) == "hello"


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="abc", max_size=30),
    st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
    st.lists(st.integers(1, 5), min_size=1, max_size=30),
)
def test_stop_strings_cut_at_the_first_completed_stop_however_the_text_is_cut(text, stops, cuts):
    matcher = StopStrings(tuple(stops))
    shown, position, i = "", 0, 0
    while position < len(text) and not matcher.stopped:
        piece = text[position : position + cuts[i % len(cuts)]]
        position, i = position + len(piece), i + 1
        shown += matcher.push(piece)
        assert all(s not in shown for s in stops)
    if not matcher.stopped:
        shown += matcher.flush()
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    assert shown == (text[: min(hits)[1]] if hits else text) and matcher.stopped == bool(hits)
