"""`hmoe generate` and `hmoe status`: thin clients of a running service (no torch; they start in a
fraction of a second)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import click

from hmoe.runtime.cli.options import parse_token_ids, sampling_options
from hmoe.runtime.config import load_config

ROUTER_TIMEOUT_S = 3.0  # a router that has not answered a ping (sent every second) for this long is gone


def _endpoint(config_path: str | None, endpoint: str | None, port: int | None) -> str:
    if endpoint:
        return endpoint
    if port:
        return f"tcp://127.0.0.1:{port}"
    return load_config(config_path).router.frontend


@click.command("generate")
@click.argument("prompt", required=False)
@sampling_options(max_tokens=64)
@click.option("--stop", multiple=True, help="Stop string (repeatable); the text ends before it.")
@click.option("--timeout", type=float, default=None, help="Deadline in seconds; the request ends with reason timeout.")
@click.option("--endpoint", help="The router's client endpoint (default: [router] frontend).")
@click.option("--port", type=int, help="Shorthand for --endpoint tcp://127.0.0.1:PORT.")
@click.option("--server-key", help="The router's CURVE public key (file or Z85) for an encrypted endpoint.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end instead of streaming.")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=0.0,
    help="Wait up to this long for the service to be ready (e.g. right after starting hmoe serve).",
)
def generate_cmd(
    prompt,
    token_ids,
    max_tokens,
    temperature,
    top_p,
    top_k,
    seed,
    stop,
    timeout,
    endpoint,
    port,
    server_key,
    config_path,
    as_json,
    wait_s,
) -> None:
    """Stream a completion of PROMPT from a running hmoe serve; Ctrl-C cancels it."""
    from hmoe.runtime.client import Client  # noqa: PLC0415

    if (prompt is None) == (token_ids is None):
        raise click.UsageError("give a PROMPT or --token-ids (not both)")
    ids = parse_token_ids(token_ids) if token_ids is not None else None
    endpoint = _endpoint(config_path, endpoint, port)
    if wait_s > 0:
        _wait_ready(endpoint, wait_s, server_key)
    with Client(endpoint, server_public_key=server_key, router_timeout_s=ROUTER_TIMEOUT_S) as client:
        stream = client.generate(
            prompt,
            token_ids=ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            timeout=timeout,
            stream=not as_json,
        )
        try:
            for chunk in stream:
                click.echo(chunk.text, nl=False)
        except KeyboardInterrupt:
            stream.close()
            click.echo("\n[cancelled]", err=True)
            sys.exit(130)
        result = stream.result
    if as_json:
        click.echo(
            json.dumps(
                {
                    "request_id": result.request_id,
                    "text": result.text,
                    "token_ids": list(result.token_ids),
                    "finish_reason": result.finish_reason,
                    "usage": dataclasses.asdict(result.usage),
                }
            )
        )
        return
    u = result.usage
    click.echo("")
    speed = f", {1 / u.tpot_s:.1f} tok/s" if u.tpot_s else ""
    ttft = f", first token {u.ttft_s * 1000:.0f} ms" if u.ttft_s is not None else ""
    click.echo(f"[{u.output_tokens} tokens, {result.finish_reason}{ttft}{speed}]", err=True)


def _wait_ready(endpoint: str, wait_s: float, server_key: str | None) -> None:
    """Until the router answers with a prefill and a decode worker registered (or wait_s passed)."""
    from hmoe.runtime.client import RouterUnreachable, status_once  # noqa: PLC0415
    from hmoe.runtime.errors import HmoeError  # noqa: PLC0415

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if {w["role"] for w in status_once(endpoint, 1.0, server_key)["workers"]} >= {"prefill", "decode"}:
                return
        except RouterUnreachable:
            pass
        time.sleep(0.5)
    raise HmoeError(
        "not_ready", f"{endpoint} did not get a prefill and a decode worker within {wait_s:g} s: is hmoe serve running?"
    )


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="The router's Status as one JSON object.")
@click.option("--endpoint", help="The router's client endpoint (default: [router] frontend).")
@click.option("--port", type=int, help="Shorthand for --endpoint tcp://127.0.0.1:PORT.")
@click.option("--server-key", help="The router's CURVE public key (file or Z85).")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds to wait for the router.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
def status_cmd(as_json, endpoint, port, server_key, timeout, config_path) -> None:
    """Show the router's workers, queue, KV use and throughput."""
    from hmoe.runtime.client import status_once  # noqa: PLC0415

    endpoint = _endpoint(config_path, endpoint, port)
    status = status_once(endpoint, timeout, server_key)
    if as_json:
        click.echo(json.dumps(status))
        return
    kv = status["kv"]
    used = f"{kv['used_tokens']}/{kv['capacity_tokens']} tokens" if kv.get("capacity_tokens") else "no decode worker"
    click.echo(f"router {endpoint}{'  (draining)' if status['draining'] else ''}")
    click.echo(
        f"  queued {status['queued']}, running {status['running']}, KV reserved {used}, "
        f"{status['throughput'].get('tokens_per_s', 0)} tokens/s (last minute)"
    )
    if not status["workers"]:
        click.echo("  no workers registered")
    for w in status["workers"]:
        click.echo(
            f"  {w['role']:<8} {w['worker_id']}  pid {w['pid']}  {w['device']}  running {w['running']}, "
            f"waiting {w['waiting']}, KV free {w['kv_free_tokens']}/{w['kv_capacity_tokens']}, "
            f"seen {w['last_seen_s']} s ago"
        )
