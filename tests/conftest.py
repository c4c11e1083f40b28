"""Shared fixtures: tiny random checkpoints in the Hugging Face layout, made once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{(arch, dtype): path} of `hmoe make-model` tiny checkpoints, made on first use."""
    from hmoe.workers.make_model import make_model

    cache = {}

    def get(arch: str = "deepseek_v3", dtype: str = "fp32"):
        key = (arch, dtype)
        if key not in cache:
            cache[key] = make_model(tmp_path_factory.mktemp(f"{arch}-{dtype}"), arch, "tiny", dtype, seed=1)
        return cache[key]

    return get


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: they run on the H100 box and are skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
