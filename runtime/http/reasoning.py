"""ReasoningParser: a model's thinking (between its think markers) apart from its answer, as text streams.

Text between `<think>` and `</think>` goes to reasoning_content, the rest to content. A template
that opens the block in the prompt (DeepSeek-R1, V3.1 with thinking) starts the parser inside it,
so an output holding only the closing marker still splits. A marker may arrive cut across pieces:
the tail that could begin one is held back until the next piece (or `flush`). Newlines right after
either marker are dropped (as the templates write `</think>\\n\\n`). Pieces concatenate to exactly
what a whole-text split gives, however the text was cut.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


def opens_reasoning(prompt: str, start: str = START, end: str = END) -> bool:
    """True when the rendered prompt ends inside an open think block (the template opened it)."""
    return prompt.rfind(start) > prompt.rfind(end)


class ReasoningParser:
    __slots__ = ("start", "end", "in_reasoning", "held", "strip_newlines")

    def __init__(self, in_reasoning: bool = False, start: str = START, end: str = END):
        self.start, self.end = start, end
        self.in_reasoning = in_reasoning
        self.held = ""
        self.strip_newlines = in_reasoning

    def push(self, text: str) -> tuple[str, str]:
        """New output text -> (reasoning, content) safe to show now."""
        reasoning: list[str] = []
        content: list[str] = []
        buf = self.held + text
        self.held = ""
        while buf:
            if self.strip_newlines:
                buf = buf.lstrip("\n")
                if not buf:
                    break
                self.strip_newlines = False
            marker = self.end if self.in_reasoning else self.start
            out = reasoning if self.in_reasoning else content
            at = buf.find(marker)
            if at >= 0:
                out.append(buf[:at])
                buf = buf[at + len(marker) :]
                self.in_reasoning = not self.in_reasoning
                self.strip_newlines = True
                continue
            keep = _partial_suffix(buf, marker)
            out.append(buf[: len(buf) - keep])
            self.held = buf[len(buf) - keep :]
            break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """At the end: the held tail (it did not become a marker)."""
        held, self.held = self.held, ""
        return (held, "") if self.in_reasoning else ("", held)


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str, str]:
    """A whole output -> (reasoning, content)."""
    parser = ReasoningParser(in_reasoning)
    reasoning, content = parser.push(text)
    tail_reasoning, tail_content = parser.flush()
    return reasoning + tail_reasoning, content + tail_content


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
