"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest
from helpers.kernel_layers import FORMATS

from hmoe.kernels.formats import ExpertFormat


@pytest.fixture(params=FORMATS, ids=lambda f: f.name)
def fmt(request) -> ExpertFormat:
    return request.param
