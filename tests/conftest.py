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
    """Tests marked `gpu` need CUDA: they run on the H100 box and are skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
