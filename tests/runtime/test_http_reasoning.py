"""ReasoningParser: thinking apart from the answer, the same however the streamed text is cut."""

from __future__ import annotations

import random

import pytest

from hmoe.runtime.http.reasoning import ReasoningParser, opens_reasoning, split_reasoning

CASES = [
    # (output, template opened the block, reasoning, content)
    ("<think>\nLet me see.</think>\n\nIt is 4.", False, "Let me see.", "It is 4."),
    ("Let me see.\n</think>\n\nIt is 4.", True, "Let me see.\n", "It is 4."),  # R1: the prompt opened it
    ("\n\nIt is 4.", True, "", "It is 4."),  # no closing marker yet: a thinking model still thinking...
    ("It is 4.", False, "", "It is 4."),
    ("still thinking <th", True, "still thinking <th", ""),  # ...and a cut marker that never completes
    ("Answer <thin", False, "", "Answer <thin"),
    ("a<think>b</think>c<think>d</think>e", False, "bd", "ace"),
    ("<think></think>x", False, "", "x"),
    ("é<think>ü</think>ö", False, "ü", "éö"),
]


@pytest.mark.parametrize("text, opened, reasoning, content", CASES)
def test_whole_text_split(text, opened, reasoning, content):
    if opened and "</think>" not in text:
        reasoning, content = text.lstrip("\n"), ""
    assert split_reasoning(text, opened) == (reasoning, content)


@pytest.mark.parametrize("text, opened, reasoning, content", CASES)
def test_every_cut_into_pieces_gives_the_whole_text_split(text, opened, reasoning, content):
    whole = split_reasoning(text, opened)
    rng = random.Random(len(text))
    cuts = [[i] for i in range(len(text) + 1)] + [sorted(rng.sample(range(len(text)), 3)) for _ in range(30)]
    for points in cuts:
        bounds = [0, *points, len(text)]
        parser = ReasoningParser(opened)
        got_r, got_c = [], []
        for a, b in zip(bounds, bounds[1:]):
            r, c = parser.push(text[a:b])
            assert "<think>" not in r + c and "</think>" not in r + c
            got_r.append(r)
            got_c.append(c)
        r, c = parser.flush()
        assert ("".join(got_r) + r, "".join(got_c) + c) == whole, points


def test_a_marker_cut_across_pieces_is_held_back_until_it_completes():
    parser = ReasoningParser(in_reasoning=True)
    assert parser.push("thought </th") == ("thought ", "")
    assert parser.push("ink>\n") == ("", "")
    assert parser.push("\nanswer") == ("", "answer")


def test_opens_reasoning_reads_the_rendered_prompt():
    assert opens_reasoning("<｜User｜>hi<｜Assistant｜><think>")
    assert not opens_reasoning("<｜User｜>hi<｜Assistant｜></think>")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_reasoning("<|im_start|>assistant\n")
