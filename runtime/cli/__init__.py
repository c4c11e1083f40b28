"""`hmoe`: one command line. The client and operations commands live here and import no torch; the
ones that load weights (run, make-model, serve, shm) live in hmoe.workers.cli and are imported only
when invoked, so `hmoe generate`, `hmoe status` and `--help` start in a fraction of a second."""

from __future__ import annotations

import importlib
import sys

import click

from hmoe.runtime.cli.ops import config_skeleton_cmd, drain_cmd, health_cmd
from hmoe.runtime.cli.requests import EXIT_CANCELLED, generate_cmd, status_cmd
from hmoe.runtime.errors import HmoeError

# name -> "module:attribute" of the commands that need torch (resolved on use, never at import).
WORKER_COMMANDS = {
    "run": ("hmoe.workers.cli.run:run_cmd", "Generate offline, in this process, from a model folder or a pack."),
    "make-model": (
        "hmoe.workers.cli.run:make_model_cmd",
        "Write a random-weight checkpoint in the Hugging Face layout.",
    ),
    "serve": ("hmoe.workers.cli.serve:serve_cmd", "Serve a model with a router and two workers on this machine."),
    "shm": ("hmoe.workers.cli.shm:shm", "Weight packs in shared memory: load, ls, rm, gc."),
}


class HmoeGroup(click.Group):
    """Loads the worker commands on first use; turns an HmoeError into one line with its code (exit 1)."""

    def list_commands(self, ctx) -> list[str]:
        return sorted([*super().list_commands(ctx), *WORKER_COMMANDS])

    def get_command(self, ctx, name: str):
        if name in WORKER_COMMANDS and name not in self.commands:
            module, attribute = WORKER_COMMANDS[name][0].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter) -> None:
        """The listing without importing the worker commands: their one-line help is written above."""
        rows = [(name, self.commands[name].get_short_help_str(60)) for name in super().list_commands(ctx)]
        rows += [(name, help_text) for name, (_, help_text) in WORKER_COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Every error as one line with its code (`error: [code] ...`); Ctrl-C is `[cancelled]`, exit 130."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except HmoeError as exc:
            click.echo(f"error: {exc}", err=True)
            code = 1
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "hmoe"
            click.echo(f"error: [usage] {exc.format_message()} (see {command} --help)", err=True)
            code = exc.exit_code
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            code = exc.exit_code
        except (click.Abort, KeyboardInterrupt):
            click.echo("\n[cancelled]", err=True)
            code = EXIT_CANCELLED
        except BrokenPipeError:  # `hmoe ... | head`
            sys.stderr.close()
            code = 1
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=HmoeGroup)
def main() -> None:
    """hmoe: serve Mixture-of-Experts models on one machine (CPU experts, GPU for the rest)."""


for _command in (generate_cmd, status_cmd, health_cmd, drain_cmd, config_skeleton_cmd):
    main.add_command(_command)
