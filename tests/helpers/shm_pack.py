"""Weight-pack test helpers: a small manifest, a deterministic fill and its expected contents, and
child processes with a ShmConfig in scope."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

from hmoe.shm import PackLayout, ShmConfig, expert_array_name

CHILD_TIMEOUT_S = 60


def small_manifest(name: str = "p", source: dict | None = None, expert_bytes: int = 8192, layers=(1, 2)):
    """A pack with two checkpoint tensors, expert arrays for `layers` and one blob."""
    layout = PackLayout()
    layout.add_tensor("model.norm.weight", "F32", (16,))
    layout.add_tensor("model.embed_tokens.weight", "BF16", (8, 16))
    for layer in layers:
        layout.add_tensor(expert_array_name(layer, "w"), "U8", (4, expert_bytes // 4), align=4096, layer=layer)
        layout.add_tensor(expert_array_name(layer, "scale"), "F32", (4, 3), layer=layer)
    layout.add_blob("config.json", 13)
    return layout.manifest(
        name, source or {"path": "/models/x", "config_sha256": "ab"}, {"architecture": "Test"}, {"kind": "fp8"}
    )


def fill_pattern(writer) -> None:
    """Deterministic contents: every array holds its own arange (mod its dtype)."""
    for entry in writer.manifest.tensors:
        view = writer.array(entry.name).reshape(-1)
        view[:] = (np.arange(view.size) % 251).astype(view.dtype)
    writer.write_blob("config.json", b'{"a": "conf"}')


def expected(entry) -> np.ndarray:
    return (np.arange(int(np.prod(entry.shape))) % 251).astype(entry.numpy_dtype).reshape(entry.shape)


def config_literal(config: ShmConfig) -> str:
    return f"ShmConfig(prefix={config.prefix!r}, lock_dir={config.lock_dir!r})"


def child(code: str, config: ShmConfig, **kwargs) -> subprocess.Popen:
    """A Python child process with `config` and the test helpers in scope."""
    prelude = textwrap.dedent(
        f"""
        import os, sys, time, signal
        import numpy as np
        sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
        from helpers.shm_pack import small_manifest, fill_pattern, expected
        from hmoe.shm import *
        config = {config_literal(config)}
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_line(proc: subprocess.Popen, expect: str) -> str:
    """Block until the child prints a line starting with `expect`."""
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait(CHILD_TIMEOUT_S)
            raise AssertionError(f"child exited ({proc.returncode}) before {expect!r}: {proc.stderr.read()}")
        if line.startswith(expect):
            return line.strip()
