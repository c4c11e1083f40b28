"""Checkpoint: a Hugging Face model folder read lazily, tensor by tensor.

A folder holds config.json and either model.safetensors or shards listed in
model.safetensors.index.json. Tensors stay on disk until asked for (safetensors maps the files), so
a checkpoint larger than RAM can be streamed into a weight pack. FP8 checkpoints (DeepSeek's
format) store E4M3 weights with a float32 `<name>_scale_inv` per 128x128 block; `weight()` returns
them dequantized, `raw()` as stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hmoe.workers.weights.errors import CheckpointError
from hmoe.workers.weights.model_config import ModelConfig, parse_model_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP8_DTYPE = torch.float8_e4m3fn


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """E4M3 [out, in] times its block scale [ceil(out/128), ceil(in/128)] -> dtype [out, in]."""
    out_dim, in_dim = weight.shape
    scale = scale_inv.to(torch.float32)
    scale = scale.repeat_interleave(128, 0)[:out_dim].repeat_interleave(128, 1)[:, :in_dim]
    return (weight.to(torch.float32) * scale).to(dtype)


def as_weight(
    origin: str,
    name: str,
    tensor: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    source,
    float_dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> torch.Tensor:
    """A stored tensor as the model takes it: shape checked, FP8 blocks dequantized (the scale from
    `source.raw(name + "_scale_inv")`), cast to `dtype` (no copy when it already is)."""
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(
            "tensor_shape",
            f"{origin}: tensor {name!r} has shape {list(tensor.shape)}, the config implies {list(shape)}",
        )
    if tensor.dtype == FP8_DTYPE:
        if not source.is_fp8(name):
            raise CheckpointError("checkpoint_corrupt", f"{origin}: FP8 tensor {name!r} has no {name}_scale_inv")
        scale_inv = source.raw(name + "_scale_inv")
        blocks = (-(-shape[0] // 128), -(-shape[1] // 128))
        if tuple(scale_inv.shape) != blocks:
            raise CheckpointError(
                "tensor_shape",
                f"{origin}: {name}_scale_inv has shape {list(scale_inv.shape)}, 128x128 blocks need {list(blocks)}",
            )
        return dequantize_fp8_blocks(tensor, scale_inv, dtype)
    if tensor.dtype not in float_dtypes:
        raise CheckpointError(
            "unsupported_dtype", f"{origin}: tensor {name!r} is {tensor.dtype}; supported: fp32, bf16, fp16, fp8-e4m3"
        )
    return tensor.to(dtype)


class Checkpoint:
    """Lazy reader of one Hugging Face model folder (close() or use as a context manager)."""

    def __init__(self, path: Path, raw_config: dict, config: ModelConfig, weight_map: dict[str, str]):
        self.path = path
        self.raw_config = raw_config
        self.config = config
        self.weight_map = weight_map  # tensor name -> shard file name
        self._files: dict[str, object] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        path = Path(path)
        config_path = path / "config.json"
        if not path.is_dir():
            raise CheckpointError("model_not_found", f"{path}: no such model folder")
        if not config_path.is_file():
            raise CheckpointError("model_not_found", f"{path}: no config.json (is this a Hugging Face model folder?)")
        try:
            raw_config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError("config_invalid", f"{config_path}: not valid JSON ({exc})") from None
        if not isinstance(raw_config, dict):
            raise CheckpointError("config_invalid", f"{config_path}: expected a JSON object")
        config = parse_model_config(raw_config)
        return cls(path, raw_config, config, _weight_map(path))

    def close(self) -> None:
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError("tensor_missing", f"{self.path}: tensor {name!r} is not in the checkpoint")
        file_name = self.weight_map[name]
        handle = self._files.get(file_name)
        if handle is None:
            handle = _open_safetensors(self.path / file_name)
            self._files[file_name] = handle
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def is_fp8(self, name: str) -> bool:
        return name + "_scale_inv" in self.weight_map

    def raw(self, name: str) -> torch.Tensor:
        """The tensor exactly as stored (E4M3 for FP8 weights)."""
        file_name = self.weight_map.get(name)
        try:
            return self._file(name).get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(
                "checkpoint_corrupt", f"{self.path / str(file_name)}: tensor {name!r}: {exc}"
            ) from None

    def weight(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The tensor as `dtype`, FP8 blocks dequantized, its shape checked against the model's."""
        return as_weight(str(self.path), name, self.raw(name), shape, dtype, self)

    def identity(self) -> dict:
        """What makes this checkpoint itself: its config and every weight file's name, size and mtime."""
        files = sorted(set(self.weight_map.values()))
        stats = [[f, (self.path / f).stat().st_size, (self.path / f).stat().st_mtime_ns] for f in files]
        config_sha = hashlib.sha256((self.path / "config.json").read_bytes()).hexdigest()
        return {"path": str(self.path.resolve()), "config_sha256": config_sha, "files": stats}


def _open_safetensors(file_path: Path):
    if not file_path.is_file():
        raise CheckpointError("shard_missing", f"{file_path}: shard file is missing (listed in {INDEX_FILE})")
    try:
        return safe_open(str(file_path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            "checkpoint_corrupt", f"{file_path}: not a readable safetensors file ({exc}); re-download or re-convert it"
        ) from None


def _weight_map(path: Path) -> dict[str, str]:
    index_path = path / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError("checkpoint_corrupt", f"{index_path}: not a valid index ({exc})") from None
        for file_name in sorted(set(weight_map.values())):
            if not (path / file_name).is_file():
                raise CheckpointError(
                    "shard_missing", f"{path / file_name}: shard file is missing (listed in {INDEX_FILE})"
                )
        return dict(weight_map)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError("weights_missing", f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}")
    weight_map = {}
    for file_name in files:
        for name in _open_safetensors(path / file_name).keys():
            weight_map[name] = file_name
    return weight_map
