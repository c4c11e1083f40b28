"""Random layers in every format for the kernel tests, made through the public encoder."""

from __future__ import annotations

import numpy as np

from hmoe.kernels.formats import PROJS, ExpertFormat, LayerExperts, encode_expert, proj_shape

FORMATS = [ExpertFormat("bf16"), ExpertFormat("fp8"), ExpertFormat("int4", 32), ExpertFormat("int4", 128)]


def random_layer(fmt: ExpertFormat, num_experts: int, hidden: int, inter: int, seed: int = 0) -> LayerExperts:
    """Random float weights (never zeros), encoded into `fmt`."""
    rng = np.random.default_rng(seed)
    layer = LayerExperts.allocate(fmt, num_experts, hidden, inter)
    for e in range(num_experts):
        for proj in PROJS:
            w = rng.standard_normal(proj_shape(proj, hidden, inter)).astype(np.float32) * 0.1
            encode_expert(fmt, layer.arrays, e, proj, w)
    return layer
