"""A non-editable install (deploy/scripts/install.sh) carries every subpackage: pyproject lists them all."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_code_folder_with_an_init_is_a_listed_package():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name.split(".", 1)[1].split(".")[0]: folder for name, folder in setup["package-dir"].items()}
    found = {
        ".".join(("hmoe", top, *init.parent.relative_to(ROOT / folder).parts))
        for top, folder in folders.items()
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert found == set(setup["packages"]), sorted(found ^ set(setup["packages"]))
