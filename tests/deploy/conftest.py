"""Tools the deploy tests need: skip, saying how to get them, where they are missing."""

from __future__ import annotations

import shutil

import pytest


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed: deploy/scripts/dev-setup.sh test installs it (root + apt-get)")
    return path


@pytest.fixture
def shellcheck() -> str:
    return _need("shellcheck")


@pytest.fixture
def systemd_analyze() -> str:
    return _need("systemd-analyze")
