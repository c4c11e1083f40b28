"""`hmoe generate` and `hmoe status`: thin clients of a running service (no torch; they start in a
fraction of a second)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import click

from hmoe.runtime.cli.instance import ServeFiles
from hmoe.runtime.cli.options import (
    ROUTER_TIMEOUT_S,
    parse_token_ids,
    read_value,
    resolve_endpoint,
    router_options,
    sampling_options,
    timeout_option,
)
from hmoe.runtime.config import load_config
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.worker_pool import ROLES, roles_served

EXIT_TIMEOUT, EXIT_CANCELLED = 124, 130  # as timeout(1) and a shell's Ctrl-C
WAIT_REPORT_S = 5.0  # --wait says what it is waiting for this often
SETTLE_S = 1.5  # status waits this long at most for the workers' heartbeats to catch up with the router (3 beats)


@click.command("generate")
@click.argument("prompt", required=False)
@sampling_options
@click.option("--stop", multiple=True, help="Stop string (repeatable); the text ends before it.")
@timeout_option("Deadline of the request in seconds; it then ends with reason timeout (exit 124).", default=None)
@router_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end instead of streaming.")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
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
    """Stream a completion of PROMPT (text, - reads standard input, @FILE) from hmoe serve; Ctrl-C cancels it."""
    from hmoe.runtime.client import Client  # noqa: PLC0415

    if (prompt is None) == (token_ids is None):
        raise click.UsageError("give a PROMPT or --token-ids (not both)")
    ids = parse_token_ids(token_ids) if token_ids is not None else None
    prompt = read_value(prompt, "PROMPT") if prompt is not None else None
    config = load_config(config_path)
    endpoint, server_key = resolve_endpoint(config, endpoint, port, server_key)
    if wait_s > 0:
        _wait_ready(endpoint, wait_s, server_key, ServeFiles(config.runtime_dir, endpoint))
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
            raise
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
    else:
        u = result.usage
        click.echo("")
        speed = f", {1 / u.tpot_s:.1f} tok/s" if u.tpot_s else ""
        ttft = f", first token {u.ttft_s * 1000:.0f} ms" if u.ttft_s is not None else ""
        click.echo(f"[{u.output_tokens} tokens, {result.finish_reason}{ttft}{speed}]", err=True)
    if result.finish_reason == "timeout":
        sys.exit(EXIT_TIMEOUT)


def _wait_ready(endpoint: str, wait_s: float, server_key: str | None, files: ServeFiles) -> None:
    """Until the router answers with a prefill and a decode worker registered; not_ready when wait_s passed or
    the serve behind the endpoint has exited or failed to start (its files in the runtime dir say so)."""
    from hmoe.runtime.client import RouterUnreachable, status_once  # noqa: PLC0415

    since_wall, start = time.time(), time.monotonic()
    next_report = start + WAIT_REPORT_S
    roles: set[str] | None = None
    while (waited_s := time.monotonic() - start) < wait_s:
        try:
            roles = {r for w in status_once(endpoint, 1.0, server_key)["workers"] for r in roles_served(w["role"])}
            if roles >= set(ROLES):
                if time.monotonic() > start + WAIT_REPORT_S:
                    click.echo(f"ready after {waited_s:.0f} s", err=True)
                return
        except RouterUnreachable:
            roles = None
        if (why := files.gone(since_wall)) is not None:
            raise HmoeError("not_ready", why)
        if time.monotonic() >= next_report:
            next_report += WAIT_REPORT_S
            state = "no router answers yet" if roles is None else f"workers registered: {sorted(roles) or 'none'}"
            click.echo(f"waiting for {endpoint}: {state} ({waited_s:.0f} of {wait_s:g} s)", err=True)
        time.sleep(0.5)
    raise HmoeError(
        "not_ready", f"{endpoint} did not get a prefill and a decode worker within {wait_s:g} s: is hmoe serve running?"
    )


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="The router's Status as one JSON object.")
@router_options
@timeout_option("Seconds to wait for the router.")
def status_cmd(as_json, endpoint, port, server_key, config_path, timeout) -> None:
    """Show the router's workers, queue, KV use and throughput."""
    from hmoe.runtime.client import status_once  # noqa: PLC0415

    endpoint, server_key = resolve_endpoint(load_config(config_path), endpoint, port, server_key)
    status = status_once(endpoint, timeout, server_key)
    deadline = time.monotonic() + SETTLE_S
    while not _agrees(status) and time.monotonic() < deadline:  # a worker's heartbeat lags the router's count
        time.sleep(0.1)
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
        if prefix := w.get("prefix"):
            rate = f"{prefix['hit_tokens'] / prefix['query_tokens']:.0%}" if prefix["query_tokens"] else "-"
            click.echo(
                f"           prefix cache {prefix['cached_tokens']}/{prefix['capacity_tokens']} tokens, "
                f"hit rate {rate} ({prefix['hit_tokens']} of {prefix['query_tokens']} prompt tokens)"
            )


def _agrees(status: dict) -> bool:
    """When the router runs nothing, neither do its workers (by their last heartbeat), and their KV is free."""
    if status["running"] or status["queued"]:
        return True  # busy: the workers' view is a moment old by design
    return all(
        w["running"] == 0 and w["waiting"] == 0 and w["kv_free_tokens"] == w["kv_capacity_tokens"]
        for w in status["workers"]
    )
