"""Options shared by the commands that start a generation (`hmoe run`, `hmoe generate`), spelled once."""

from __future__ import annotations

import click


def sampling_options(max_tokens: int):
    """--token-ids, --max-tokens, --temperature, --top-p, --top-k, --seed."""
    options = [
        click.option("--token-ids", help="Comma-separated prompt token ids instead of text, e.g. 1,2,3."),
        click.option("--max-tokens", type=int, default=max_tokens, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 keeps every token."),
        click.option("--seed", type=int, default=None),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def parse_token_ids(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3], or a usage error naming --token-ids."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of integers", param_hint="--token-ids"
        ) from None
