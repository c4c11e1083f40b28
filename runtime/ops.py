"""Operations commands, registered on `hmoe`: what hmoectl, install.sh and monitoring call.

`hmoe config-skeleton` prints the config file with every option commented out (install.sh writes
it to /etc/hmoe/hmoe.toml).
"""

from __future__ import annotations

import click

from hmoe.runtime.config import skeleton


@click.command("config-skeleton")
def config_skeleton_cmd() -> None:
    """Print the TOML config with every option commented out at its default."""
    click.echo(skeleton(), nl=False)


COMMANDS = (config_skeleton_cmd,)
