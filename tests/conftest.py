"""Shared fixtures: tiny random checkpoints in the Hugging Face layout (made once per session), and a
private weight-pack namespace per test (so ls/gc never see anyone else's packs; lock files in the
test's tmp dir; every segment unlinked afterwards)."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
from helpers.shm_pack import fill_pattern, small_manifest

from hmoe.shm import ShmConfig, build_pack
from hmoe.shm.segment import unlink_segment

# `python -m pytest` (the README's command) puts the working directory, the checkout, first on sys.path,
# where our top-level kernels/ folder (hmoe.kernels, mapped by the editable install) would shadow the
# Hugging Face `kernels` package that transformers >= 5.25 depends on and imports. Nothing imports the
# checkout's folders by their bare names, so the tests run without it.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]

# The suite runs in two processes (pyproject.toml: -n 2), a test file at a time in each. The files that start
# whole services (router and workers as processes) are one unit, so two of them never run at once on the
# 2 cores: they assert heartbeats, watchdog pings and 3 s SLOs.
SERVICE_FILES = {
    f"tests/{name}.py"
    for name in (
        "deploy/test_live",
        "workers/cli/test_chaos",
        "workers/cli/test_http_serve",
        "workers/cli/test_serve",
        "workers/cli/test_serve_colocated",
        "workers/engine/test_worker_processes",
    )
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{(arch, dtype): path} of `hmoe make-model` tiny checkpoints, made on first use."""
    from hmoe.workers.weights.make_model import make_model

    cache = {}

    def get(arch: str = "deepseek_v3", dtype: str = "fp32"):
        key = (arch, dtype)
        if key not in cache:
            cache[key] = make_model(tmp_path_factory.mktemp(f"{arch}-{dtype}"), arch, "tiny", dtype, seed=1)
        return cache[key]

    return get


@pytest.fixture
def shm_config(tmp_path) -> ShmConfig:
    config = ShmConfig(prefix=f"hmoe.test-{uuid.uuid4().hex[:8]}.", lock_dir=str(tmp_path))
    yield config
    for name in config.pack_names():
        unlink_segment(name, config)


@pytest.fixture
def ready_pack(shm_config):
    pack, built = build_pack(small_manifest(), fill_pattern, shm_config)
    assert built
    yield pack
    pack.close()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: they run on the H200 box and are skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's file-at-a-time scheduling, the service files one unit. (Not xdist_group marks: with
    pytest 9.2, xdist 3.8's loadgroup no longer renames the tests it groups.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return "services" if path in SERVICE_FILES else path

    return ByFile(config, log)
