"""PackSource: a model's weights read from a weight pack instead of its checkpoint folder.

It offers what `Checkpoint` offers the model code — `.config`, `.raw_config`, `.weight(name, shape,
dtype)` — plus `.layer_experts(layer_id)`, the zero-copy numpy arrays the CPU expert kernels read,
and `.blob(name)` for the small files kept in the pack (tokenizer.json ...), so a worker serves
from the pack alone. Tensors are torch views of the read-only mapping (no copy when no conversion
is asked for). `pin()` registers the whole mapping with CUDA as pinned memory for fast H2D copies.

NOTE: torch has no read-only tensors. A view from `raw()` or `weight()` lies on PROT_READ pages:
an in-place op on it kills the process with SIGSEGV. Convert (`.to(...)`) before modifying.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch

from hmoe.kernels.formats import ExpertFormat, LayerExperts, decode_expert
from hmoe.shm import Pack, ShmConfig, ShmError
from hmoe.workers.weights.checkpoint import FLOAT_DTYPES, Checkpoint, as_weight
from hmoe.workers.weights.errors import CheckpointError
from hmoe.workers.weights.model_config import ModelConfig, parse_model_config
from hmoe.workers.weights.pack_loader import EXPERT_RE
from hmoe.workers.weights.pinned import HostRegistration

TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "F32": torch.float32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F64": torch.float64,
}


class PackSource:
    """The weights of one model from an attached pack (attach ↔ close)."""

    def __init__(self, pack: Pack, raw_config: dict, config: ModelConfig, expert_format: ExpertFormat):
        self.pack = pack
        self.raw_config = raw_config
        self.config = config
        self.expert_format = expert_format
        self.path = None  # no model folder: everything comes from the pack
        self._registration: HostRegistration | None = None

    @classmethod
    def attach(
        cls,
        name: str,
        shm_config: ShmConfig = ShmConfig(),
        model_dir: str | os.PathLike | None = None,
        wait_s: float = 0.0,
    ) -> PackSource:
        """Attach pack `name`; with `model_dir`, refuse a pack built from any other checkpoint."""
        pack = Pack.attach(name, shm_config, wait_s)
        try:
            if model_dir is not None:
                with Checkpoint.open(model_dir) as checkpoint:
                    pack.check_matches(source=checkpoint.identity())
            config_json = pack.blob("config.json")
            if config_json is None:
                raise ShmError("pack_corrupt", f"pack {name!r} holds no config.json; remove it and load it again")
            raw_config = json.loads(config_json)
            experts = pack.manifest.experts
            fmt = ExpertFormat(experts["kind"], experts["group_size"])
            return cls(pack, raw_config, parse_model_config(raw_config), fmt)
        except BaseException:
            pack.close()
            raise

    def blob(self, name: str) -> bytes | None:
        """A small file of the model folder kept in the pack: tokenizer.json, generation_config.json ..."""
        return self.pack.blob(name)

    def identity(self) -> dict:
        """The identity of the checkpoint the pack was built from (as Checkpoint.identity() gave it)."""
        return self.pack.manifest.source

    def __contains__(self, name: str) -> bool:
        return name in self.pack or self._expert_key(name) is not None

    def is_fp8(self, name: str) -> bool:
        return name + "_scale_inv" in self.pack

    def raw(self, name: str) -> torch.Tensor:
        """The tensor as stored, a zero-copy view of read-only memory (see the NOTE above)."""
        if name not in self.pack:
            raise CheckpointError("tensor_missing", f"pack {self.pack.name!r}: tensor {name!r} is not in the pack")
        entry = self.pack.entry(name)
        dtype = TORCH_DTYPES[entry.dtype]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype)
        with warnings.catch_warnings():
            # torch warns on every non-writable buffer; read-only is the point here.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            flat = torch.frombuffer(self.pack.segment.buffer(entry.offset, entry.nbytes), dtype=dtype)
        return flat.view(entry.shape)

    def weight(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """As Checkpoint.weight: the tensor as `dtype`, FP8 dequantized, its shape checked; no copy when
        the stored dtype is `dtype`. Routed-expert tensors are decoded from the layer arrays (a copy)."""
        key = self._expert_key(name)
        tensor = self._expert_weight(*key) if key is not None else self.raw(name)
        # float64 too: routed experts decoded from the kernels' layout come out exact in float64.
        return as_weight(f"pack {self.pack.name!r}", name, tensor, shape, dtype, self, (*FLOAT_DTYPES, torch.float64))

    def layer_experts(self, layer_id: int) -> LayerExperts:
        """One MoE layer's routed experts as the CPU kernels read them: zero-copy, read-only numpy views."""
        c = self.config
        return LayerExperts(
            self.expert_format, c.num_experts, c.hidden_size, c.moe_intermediate_size, self.pack.expert_arrays(layer_id)
        )

    def pin(self) -> None:
        """Register the whole mapping with CUDA (read-only) so H2D copies from it run at pinned speed."""
        assert self._registration is None, "already pinned"
        self._registration = HostRegistration.register(self.pack.segment.address, self.pack.segment.nbytes)

    def unpin(self) -> None:
        if self._registration is not None:
            self._registration.unregister()
            self._registration = None

    @property
    def pinned(self) -> bool:
        return self._registration is not None

    def close(self) -> None:
        """Unpin, then unmap (deferred while tensors or arrays of the pack are alive)."""
        self.unpin()
        self.pack.close()

    def __enter__(self) -> PackSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _expert_key(self, name: str) -> tuple[int, int, str] | None:
        match = EXPERT_RE.fullmatch(name)
        if not match or match.group(4) or int(match.group(1)) not in self.config.moe_layer_ids:
            return None
        layer_id, expert, proj = int(match.group(1)), int(match.group(2)), match.group(3)
        return (layer_id, expert, proj) if expert < self.config.num_experts else None

    def _expert_weight(self, layer_id: int, expert: int, proj: str) -> torch.Tensor:
        c = self.config
        arrays = self.pack.expert_arrays(layer_id)
        decoded = decode_expert(self.expert_format, arrays, expert, proj, c.hidden_size, c.moe_intermediate_size)
        return torch.from_numpy(np.ascontiguousarray(decoded))  # float64 [out, in]: exact for every format
