"""Detokenizer -> StopStrings, as a Request streams text, over the tokenizer `hmoe make-model` writes
(a byte-level BPE with special tokens): whatever the token ids and however the decode steps batch
them, the pieces add up to the tokenizer's own decode of all the ids, cut before the first stop."""

from __future__ import annotations

import pytest
from helpers.net import ByteTokenizer
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hmoe.runtime.detokenizer import Detokenizer
from hmoe.runtime.stop_strings import StopStrings
from hmoe.workers.weights.make_model import build_tokenizer

TOKENIZER = build_tokenizer(1024)  # deterministic, ~30 ms; the tiny models' tokenizer.json
VOCAB = TOKENIZER.get_vocab_size()


def shown_text(decoder, ids: list[int], steps: list[int], stops: tuple[str, ...]) -> str:
    """What a client is shown: ids pushed a few per step (a decode step's Tokens), as Request does."""
    detok, matcher, shown, i, n = Detokenizer(decoder), StopStrings(stops), "", 0, 0
    while i < len(ids) and not matcher.stopped:
        batch = ids[i : i + steps[n % len(steps)]]
        i, n = i + len(batch), n + 1
        piece = matcher.push(detok.push(batch))
        assert not any(stop in shown + piece for stop in stops)
        shown += piece
    if not matcher.stopped:
        shown += matcher.push(detok.flush())
        shown += "" if matcher.stopped else matcher.flush()
    return shown


def cut_at_first_stop(text: str, stops: tuple[str, ...]) -> str:
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    return text[: min(hits)[1]] if hits else text


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
    st.lists(st.integers(1, 4), min_size=1, max_size=8),
)
@example(ids=[116, 243, 250, 149, 102], steps=[1])  # three stray bytes, then a two-byte character
@example(ids=[18, 145, 117, 509, 451, 105, 117, 159, 161, 237], steps=[1])
def test_any_ids_stream_to_the_tokenizers_own_decode(ids, steps):
    assert shown_text(TOKENIZER, ids, steps, ()) == TOKENIZER.decode(ids, skip_special_tokens=True)


@settings(max_examples=100, deadline=None)
@given(st.data(), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40), st.lists(st.integers(1, 4), min_size=1))
def test_stop_strings_cut_the_streamed_text_before_the_first_stop(data, ids, steps):
    text = TOKENIZER.decode(ids, skip_special_tokens=True)
    stops = data.draw(st.lists(st.sampled_from(_substrings(text)) | st.text(min_size=1, max_size=3), max_size=3))
    assert shown_text(TOKENIZER, ids, steps, tuple(stops)) == cut_at_first_stop(text, tuple(stops))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60), st.lists(st.integers(1, 4), min_size=1, max_size=8))
def test_real_text_streams_back_whole(text, steps):
    ids = TOKENIZER.encode(text, add_special_tokens=False).ids
    assert shown_text(TOKENIZER, ids, steps, ()) == text


@pytest.mark.parametrize(
    "junk, char", [(b"\xb6\x80\x80", "ק"), (b"\xff", "中"), (b"\xe4\xb8", "🙂"), (b"\x80\x80\x80", "é")]
)
def test_junk_bytes_do_not_spoil_the_character_after_them(junk, char):
    """A character right after junk bytes is still whole, however long the junk held the stream."""
    ids = list(junk + char.encode())
    for steps in ([1], [2], [len(ids)]):
        assert shown_text(ByteTokenizer(), ids, steps, ()) == (junk + char.encode()).decode(errors="replace")


def _substrings(text: str) -> list[str]:
    return [text[i : i + n] for n in (1, 2, 3) for i in range(len(text) - n + 1)] or ["x"]
