"""Start-up checks shared by `hmoe run` and `hmoe serve`: cheap, before anything heavy loads, each
failing with the code the server uses for the same fault (error_codes.py)."""

from __future__ import annotations

import errno
import socket

from hmoe.runtime.errors import HmoeError
from hmoe.workers.weights.errors import CheckpointError


def check_device(device: str) -> None:
    """device_unavailable unless `device` (cpu | cuda | cuda:N, syntax checked by the config) exists here."""
    import torch

    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise HmoeError("device_unavailable", f"device {device!r}: this machine has no usable CUDA device; use cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise HmoeError(
            "device_unavailable", f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
        )


def check_model(config) -> None:
    """config_field for a model config a forward pass cannot run (e.g. made with no layers)."""
    if config.num_layers < 1:
        raise CheckpointError("config_field", f"config.json: num_hidden_layers = {config.num_layers}; need at least 1")


def check_fits(config, num_prompt_tokens: int, max_tokens: int) -> None:
    """The router's context check: prompt + max_tokens within the model's context (context_too_long)."""
    need, context = num_prompt_tokens + max_tokens, config.max_position_embeddings
    if context and need > context:
        raise HmoeError(
            "context_too_long",
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
            f"model's context of {context} tokens; shorten the prompt or lower max_tokens",
        )


def check_endpoint_free(frontend: str, flag: str = "--port") -> None:
    """startup_failed when a tcp frontend's port is taken (bind-and-release, as the router will bind it)."""
    if not frontend.startswith("tcp://"):
        return
    host, _, port = frontend.removeprefix("tcp://").rpartition(":")
    host = {"*": "0.0.0.0", "": "0.0.0.0"}.get(host, host)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as zmq binds: TIME_WAIT is no conflict
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise HmoeError(
                "startup_failed", f"{frontend} {why}: stop what listens there or pick another {flag}"
            ) from None
