"""Options shared by the `hmoe` commands, spelled once: the sampling options of `hmoe run` and
`hmoe generate`, where to find the router (generate, status, health, drain), and how a prompt is read.

A prompt or a token-id list may be given inline, as `-` (read standard input) or as `@PATH` (read
that file), so a 100K-token prompt never meets the shell's argument limit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hmoe.runtime.sampling_params import SamplingParams

DEFAULT_MAX_TOKENS = SamplingParams.max_tokens  # one default for run, generate and the SDK
ROUTER_TIMEOUT_S = 3.0  # a router that has not answered for this long is gone (status, health, drain, generate)


def sampling_options(fn):
    """--token-ids, --max-tokens, --temperature, --top-p, --top-k, --seed."""
    options = [
        click.option(
            "--token-ids", help="Comma-separated prompt token ids instead of text, e.g. 1,2,3 (or - / @FILE)."
        ),
        click.option("--max-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_TOKENS, show_default=True),
        click.option(
            "--temperature", type=click.FloatRange(0, 100), default=0.0, show_default=True, help="0 is greedy."
        ),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 keeps every token."),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def router_options(fn):
    """--endpoint, --port, --server-key, --timeout, --config: where the router is and how long to wait for it."""
    options = [
        click.option("--endpoint", help="The router's client endpoint (default: [router] frontend)."),
        click.option("--port", type=click.IntRange(1, 65535), help="Shorthand for --endpoint tcp://127.0.0.1:PORT."),
        click.option("--server-key", help="The router's CURVE public key (file or Z85) for an encrypted endpoint."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def timeout_option(help_text: str, default: float | None = ROUTER_TIMEOUT_S):
    """--timeout SECONDS, one name on every command (health also takes the old --timeout-s)."""
    return click.option(
        "--timeout",
        "timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        show_default=True,
        help=help_text,
    )


def read_value(text: str, param_hint: str) -> str:
    """TEXT, or the contents of standard input (`-`) or of a file (`@PATH`)."""
    if text == "-":
        return sys.stdin.read()
    if text.startswith("@") and len(text) > 1:
        try:
            return Path(text[1:]).read_text()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {text[1:]}: {exc.strerror}", param_hint=param_hint) from None
    return text


def parse_token_ids(text: str) -> list[int]:
    """'1,2,3' (or - / @FILE holding that, commas or whitespace) -> [1, 2, 3], or a usage error naming --token-ids."""
    text = read_value(text, "--token-ids")
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise click.BadParameter(
            f"{shown!r} is not a comma-separated list of integers", param_hint="--token-ids"
        ) from None


def endpoint_of(frontend: str) -> str:
    """A frontend as a client reaches it: a wildcard bind address through loopback."""
    return frontend.replace("://*:", "://127.0.0.1:").replace("://0.0.0.0:", "://127.0.0.1:")


def resolve_endpoint(config, endpoint: str | None, port: int | None, server_key: str | None) -> tuple[str, str | None]:
    """(endpoint, CURVE key): --endpoint, else --port, else [router] frontend; --server-key, else the
    configured [router] curve_secret_key (its file holds the public key too)."""
    if endpoint and port:
        raise click.UsageError("give --endpoint or --port, not both")
    endpoint = endpoint or (f"tcp://127.0.0.1:{port}" if port else endpoint_of(config.router.frontend))
    return endpoint, server_key or config.router.curve_secret_key or None
