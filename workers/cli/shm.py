"""`hmoe shm`: load, list and remove weight packs (registered as a subgroup of the `hmoe` command).

The [shm] settings (group, hugetlbfs, ...) come from the config file named by --config and the
HMOE_SHM_* environment, as for every other command.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import click

from hmoe.shm import ShmConfig, collect_garbage, list_packs, remove_pack


@click.group("shm")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="hmoe TOML config file.")
@click.pass_context
def shm(ctx, config_path) -> None:
    """Weight packs in shared memory: load once, attach from every worker."""
    from hmoe.runtime.config import load_config

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # The commands print their own outcome; the attach that follows a load would repeat the page-size line.
    logging.getLogger("hmoe.shm.pack").setLevel(logging.WARNING)
    ctx.obj = load_config(config_path).shm


@shm.command("load")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--name", default=None, help="Pack name (default: the model folder's name and the expert format).")
@click.option(
    "--experts",
    type=click.Choice(["native", "bf16", "fp8", "int4"]),
    default="native",
    show_default=True,
    help="Routed-expert format; native keeps fp8 as fp8 and stores bf16/fp16/fp32 as bf16.",
)
@click.option(
    "--group", "group_size", type=click.Choice(["32", "128"]), default="128", show_default=True, help="INT4 group size."
)
@click.option("--threads", type=int, default=0, help="Loader threads (default: the CPUs we may use, at most 16).")
@click.option("--wait-s", type=float, default=None, help="Give up waiting for another loader after this long.")
@click.pass_obj
def load_cmd(config: ShmConfig, model_dir, name, experts, group_size, threads, wait_s) -> None:
    """Build the weight pack of MODEL_DIR in shared memory (or find it already there)."""
    from hmoe.workers.weights.pack_loader import load_pack

    start = time.monotonic()
    pack, built = load_pack(model_dir, name, experts, int(group_size), config, threads or None, wait_s)
    with pack:
        seconds = time.monotonic() - start
        size = pack.segment.nbytes
        if built:
            click.echo(  # (the loader's own last line gave the copy speed: one speed, not two)
                f"loaded pack {pack.name}: {size / 2**30:.2f} GiB, experts {pack.manifest.experts['name']}, "
                f"in {seconds:.1f} s"
            )
        else:
            click.echo(
                f"pack {pack.name} is already loaded ({size / 2**30:.2f} GiB, experts {pack.manifest.experts['name']})"
            )


@shm.command("ls")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of packs.")
@click.pass_obj
def ls_cmd(config: ShmConfig, as_json) -> None:
    """List packs: name, state, size, experts, model, attached processes."""
    infos = list_packs(config)
    if as_json:
        click.echo(json.dumps([info.to_dict() for info in infos]))
        return
    rows = [("NAME", "STATE", "SIZE", "EXPERTS", "MODEL", "ATTACHED", "SOURCE")]
    for i in infos:
        attached = ",".join(map(str, i.attached_pids)) or "-"
        rows.append(
            (
                i.name,
                i.state,
                f"{i.nbytes / 2**30:.2f} GiB",
                i.experts or "-",
                i.model or "-",
                attached,
                i.source or i.problem or "-",
            )
        )
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


@shm.command("rm")
@click.argument("name")
@click.option(
    "--force", is_flag=True, help="Remove even while processes map it (they keep their pages until they exit)."
)
@click.pass_obj
def rm_cmd(config: ShmConfig, name, force) -> None:
    """Remove pack NAME."""
    info = remove_pack(name, config, force)
    click.echo(f"removed {name} ({info.nbytes / 2**30:.2f} GiB)")


@shm.command("gc")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.pass_obj
def gc_cmd(config: ShmConfig, dry_run) -> None:
    """Remove packs that are incomplete, invalid or attached by no process, and stale lock files."""
    actions = collect_garbage(config, dry_run)
    for a in actions:
        click.echo(f"{'would remove' if dry_run else 'removed'} {a.name}: {a.reason} ({a.freed_bytes / 2**30:.2f} GiB)")
    if not actions:
        click.echo("nothing to remove")


if __name__ == "__main__":
    shm()
