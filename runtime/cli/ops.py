"""`hmoe health`, `hmoe drain`, `hmoe config-skeleton`: what hmoectl, install.sh and monitoring call.

`hmoe health` prints one line and exits like a monitoring plugin: 0 healthy, 1 draining,
2 unhealthy (a role has no live worker) or unreachable. `hmoe drain` asks the router to stop
admitting and finish what runs, then waits until it has exited. `hmoe config-skeleton` prints the
config file with every option commented out (install.sh writes it to /etc/hmoe/hmoe.toml).
They talk to the router through the SDK `Client`, at --endpoint/--port or the frontend the config names.
"""

from __future__ import annotations

import sys
import time

import click

from hmoe.runtime.cli.options import resolve_endpoint, router_options, timeout_option
from hmoe.runtime.config import load_config, skeleton
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.worker_pool import ROLES, roles_served

HEALTHY, DRAINING, UNHEALTHY = 0, 1, 2  # the exit statuses of `hmoe health` (Nagios: OK, WARNING, CRITICAL)


def describe(status: dict) -> str:
    """A Status in a few words: workers per role, running, queued, KV use, tokens/s."""
    roles = [sum(role in roles_served(w["role"]) for w in status["workers"]) for role in ROLES]
    kv = status["kv"]
    used = kv.get("used_tokens", 0) / kv["capacity_tokens"] if kv.get("capacity_tokens") else 0.0
    return (
        " + ".join(f"{n} {role}" for n, role in zip(roles, ROLES)) + f" workers, {status['running']} running, "
        f"{status['queued']} queued, KV {used:.0%} used, {status['throughput'].get('tokens_per_s', 0):g} tokens/s"
    )


@click.command("health")
@router_options
@timeout_option("Seconds to wait for the router.")
def health_cmd(endpoint, port, server_key, config_path, timeout) -> None:
    """One line and an exit status for monitoring: 0 healthy, 1 draining, 2 unhealthy or unreachable."""
    from hmoe.runtime.client import RouterUnreachable, status_once

    config = load_config(config_path)
    endpoint, server_key = resolve_endpoint(config, endpoint, port, server_key)
    try:
        status = status_once(endpoint, timeout, server_key)
    except RouterUnreachable:
        click.echo(f"unhealthy: the router at {endpoint} did not answer within {timeout:g} s")
        sys.exit(UNHEALTHY)
    missing = [role for role in ROLES if not any(role in roles_served(w["role"]) for w in status["workers"])]
    if missing:
        click.echo(f"unhealthy: no live {' or '.join(missing)} worker; {describe(status)}")
        sys.exit(UNHEALTHY)
    if status["draining"]:
        click.echo(f"draining: {describe(status)}")
        sys.exit(DRAINING)
    click.echo(f"healthy: {describe(status)}")


@click.command("drain")
@router_options
@timeout_option("Seconds to wait for the router to answer.")
@click.option(
    "--grace-s",
    type=click.FloatRange(min=0),
    default=None,
    help="Time running requests get to finish [default: [router] drain_grace_s].",
)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the router has exited.")
def drain_cmd(endpoint, port, server_key, config_path, timeout, grace_s, wait) -> None:
    """Stop admitting; running requests finish within the grace time; then the router exits 0."""
    from hmoe.runtime.client import Client, RouterUnreachable, status_once

    config = load_config(config_path)
    grace_s = config.router.drain_grace_s if grace_s is None else grace_s
    endpoint, server_key = resolve_endpoint(config, endpoint, port, server_key)
    with Client(endpoint, server_public_key=server_key, router_timeout_s=max(timeout, 1.5)) as client:
        status = client.drain(grace_s)
        click.echo(f"draining: {describe(status)}; new requests are refused, running ones get up to {grace_s:g} s")
    deadline = time.monotonic() + grace_s + 10.0
    while wait:
        try:
            status = status_once(endpoint, 1.0, server_key)
        except RouterUnreachable:
            click.echo("drained: the router has exited")
            return
        if time.monotonic() > deadline:
            raise HmoeError(
                "drain_timeout", f"the router still runs {grace_s + 10:g} s after the drain: {describe(status)}"
            )
        time.sleep(0.5)


@click.command("config-skeleton")
def config_skeleton_cmd() -> None:
    """Print the TOML config with every option commented out at its default."""
    click.echo(skeleton(), nl=False)
