"""Configuration: TOML file, then HMOE_* environment, then flags, resolved into frozen dataclasses.

Each option is spelled once, as a field below; its TOML key is `[section] field`, its environment
variable HMOE_SECTION_FIELD, its flag --field (on the commands of that section; see
`config_options`). Values are checked against their ranges here, at the edge, so a process never
starts with a setting it cannot honour.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

from hmoe.runtime.errors import HmoeError
from hmoe.shm import ShmConfig  # the [shm] section is the weight pack's own config

log = logging.getLogger(__name__)
# HMOE_* variables that are not options: the deploy scripts' own (install.sh, hmoectl, hmoe-pack.service).
OTHER_VARIABLES = ("HMOE_ROOT", "HMOE_VENV", "HMOE_CONFIG", "HMOE_ENV_FILE", "HMOE_USER", "HMOE_PACK_ARGS")
OTHER_PREFIXES = ("HMOE_BENCH_", "HMOE_TEST_")


def default_runtime_dir() -> str:
    """Where ipc sockets live: systemd's RuntimeDirectory, else $XDG_RUNTIME_DIR/hmoe, else /tmp/hmoe-UID."""
    return os.environ.get("RUNTIME_DIRECTORY") or (
        f"{os.environ['XDG_RUNTIME_DIR']}/hmoe" if os.environ.get("XDG_RUNTIME_DIR") else f"/tmp/hmoe-{os.getuid()}"
    )


@dataclass(frozen=True)
class RouterConfig:
    frontend: str = "tcp://127.0.0.1:5555"  # where clients connect (tcp:// or ipc://)
    backend: str = ""  # where workers connect; "" = ipc://<runtime_dir>/backend.sock
    runtime_dir: str = ""  # "" = default_runtime_dir()
    model_dir: str = ""  # tokenizer.json comes from here ("" = from the weight pack named in [worker] pack)
    max_prompt_tokens: int = 32768
    max_queued: int = 256  # requests waiting for prefill before new ones are refused ("queue_full")
    heartbeat_interval_s: float = 0.5  # range in _ranges; a peer silent for interval * liveness is dead
    heartbeat_liveness: int = 4  # 0.5 s * 4 = 2 s < the 3 s promise
    client_timeout_s: float = 10.0  # a streaming client silent this long is gone; its requests are cancelled
    request_timeout_s: float = 0.0  # default per-request deadline; 0 = none
    worker_wait_s: float = 30.0  # queued requests end with "no_worker" once a role has had no worker this long
    stuck_after_s: float = 60.0  # a busy worker whose step counter stands still this long is stuck: restarted
    prefill_starve_s: float = 10.0  # shortest prompt prefills first; one queued this long goes first (policy.py)
    interleave_max_tokens: int = 128  # a prompt this short runs between the layers of a longer one's prefill; 0 = off
    drain_grace_s: float = 30.0  # on SIGTERM: finish running requests for this long, then cancel
    curve_secret_key: str = ""  # path of a CURVE secret key file: encrypts the frontend (non-localhost use)
    log_level: str = "info"

    _ranges = {
        "max_prompt_tokens": (1, 1 << 22),
        "max_queued": (1, 1 << 20),
        "heartbeat_interval_s": (0.05, 5.0),
        "heartbeat_liveness": (2, 20),
        "client_timeout_s": (1.0, 3600.0),
        "request_timeout_s": (0.0, 86400.0),
        "worker_wait_s": (1.0, 3600.0),
        "stuck_after_s": (1.0, 3600.0),
        "prefill_starve_s": (0.0, 3600.0),
        "interleave_max_tokens": (0, 1 << 20),
        "drain_grace_s": (0.0, 3600.0),
    }


@dataclass(frozen=True)
class WorkerConfig:
    pack: str = ""  # weight pack name in shared memory ("" = the one `hmoe serve` made)
    device: str = "cpu"  # cpu | cuda | cuda:N
    devices: str = ""  # a prefill worker on several devices, "cuda:0,cuda:1" (expert-parallel streaming); "" = device
    dtype: str = "auto"  # auto (bf16 on cpu and cuda) | fp32 | bf16
    kv_cache_gib: float = 0.0  # GiB; 0: room for one longest prompt plus [http] default_max_tokens, at least 2
    prefix_cache_gib: float = 2.0  # prefill worker: KV of earlier prompts kept for reuse, beside kv_cache_gib; 0 = off
    kv_block_size: int = 16
    max_batch: int = 32  # decode requests running at once
    micro_batches: int = 2  # decode splits its batch so one half's attention overlaps the other's experts
    prefill_chunk_tokens: int = 2048  # prompts longer than this are prefilled in chunks
    handoff_slots: int = 4  # KV hand-off slots between prefill and decode
    handoff_slot_tokens: int = 0  # tokens per slot; 0 = router.max_prompt_tokens
    handoff_timeout_s: float = 60.0  # a filled slot nobody adopted is reclaimed after this
    adopt_slice_mib: int = 0  # KV a decode step copies in from hand-off slots; 0 = 1024 on a GPU, 64 on a CPU
    cpu_threads: int = 0  # threads for torch and the expert kernels; 0 = by role and work (policy.cpu_threads)
    experts: str = "cpu"  # cpu (kernels over the pack) | torch (reference, all on device)
    prefill_experts: str = "auto"  # auto (long passes stream the pack's experts to a GPU) | cpu | stream
    stream_min_tokens: int = 0  # prefill passes at least this long stream; 0 = measured at start-up
    stream_ring_layers: int = 2  # MoE layers of experts on the GPU at once while streaming (2: copy one, use one)
    drain_grace_s: float = 30.0
    layout: str = "disaggregated"  # hmoe serve: a prefill and a decode worker | colocated: one worker doing both

    _ranges = {
        "kv_cache_gib": (0.0, 4096.0),
        "prefix_cache_gib": (0.0, 4096.0),
        "kv_block_size": (1, 1024),
        "max_batch": (1, 4096),
        "micro_batches": (1, 2),
        "prefill_chunk_tokens": (16, 1 << 20),
        "handoff_slots": (1, 256),
        "handoff_slot_tokens": (0, 1 << 22),
        "handoff_timeout_s": (1.0, 3600.0),
        "adopt_slice_mib": (0, 16384),
        "cpu_threads": (0, 4096),
        "stream_min_tokens": (0, 1 << 22),
        "stream_ring_layers": (1, 64),
        "drain_grace_s": (0.0, 3600.0),
    }
    _choices = {
        "experts": ("cpu", "torch"),
        "prefill_experts": ("auto", "cpu", "stream"),
        "layout": ("disaggregated", "colocated"),
        "dtype": ("auto", "fp32", "bf16"),
    }
    _patterns = {
        "device": (r"cpu|cuda(:\d+)?", "cpu, cuda or cuda:N"),
        "devices": (
            r"((cpu|cuda(:\d+)?)(,(cpu|cuda(:\d+)?))*)?",
            'empty, or devices joined by commas: "cuda:0,cuda:1"',
        ),
    }


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"  # where the OpenAI-compatible HTTP API listens (0.0.0.0: every interface)
    port: int = 8000  # its port; 0 turns the HTTP API off
    served_model_name: str = ""  # the `model` clients send and get back; "" = the weight pack's name
    chat_template: str = ""  # a Jinja chat template file overriding the checkpoint's own
    max_n: int = 16  # the largest `n` (choices per request) accepted
    default_max_tokens: int = 2048  # for a request that gives none; less when the context or the KV cache is smaller

    _ranges = {"port": (0, 65535), "max_n": (1, 256), "default_max_tokens": (1, 1 << 22)}


@dataclass(frozen=True)
class Config:
    router: RouterConfig = RouterConfig()
    worker: WorkerConfig = WorkerConfig()
    shm: ShmConfig = ShmConfig()
    http: HttpConfig = HttpConfig()

    @property
    def runtime_dir(self) -> str:
        return self.router.runtime_dir or default_runtime_dir()

    @property
    def backend(self) -> str:
        return self.router.backend or f"ipc://{self.runtime_dir}/backend.sock"


SECTIONS = {"router": RouterConfig, "worker": WorkerConfig, "shm": ShmConfig, "http": HttpConfig}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _convert(section: str, name: str, raw, hint):
    """A raw value (TOML value or environment string) -> the field's type, or a config_invalid error."""
    target = {"str": str, "int": int, "float": float, "bool": bool}[hint if isinstance(hint, str) else hint.__name__]
    where = f"[{section}] {name}"
    kind = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[target]
    if isinstance(raw, str) and target is not str:
        text = raw.strip().lower()
        try:
            raw = (
                {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text]
                if target is bool
                else target(text)
            )
        except (KeyError, ValueError):
            raise HmoeError("config_invalid", f"{where}: {raw!r} is not {kind}") from None
    if target is float and isinstance(raw, int) and not isinstance(raw, bool):
        raw = float(raw)
    if not isinstance(raw, target) or (target is int and isinstance(raw, bool)):
        raise HmoeError("config_invalid", f"{where}: {raw!r} is not {kind}")
    return raw


def load_config(
    path: str | os.PathLike | None = None,
    env: typing.Mapping[str, str] | None = None,
    overrides: dict[str, dict] | None = None,
) -> Config:
    """File < environment < overrides (flags); unknown keys and out-of-range values are errors."""
    env = os.environ if env is None else env
    _warn_unknown_variables(env)
    layers: dict[str, dict] = {name: {} for name in SECTIONS}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise HmoeError("config_missing", f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise HmoeError("config_invalid", f"{path}: {exc}") from None
        for section, values in data.items():
            if section not in SECTIONS or not isinstance(values, dict):
                raise HmoeError("config_invalid", f"{path}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
            layers[section].update(values)
    for section in SECTIONS:
        prefix = f"HMOE_{section.upper()}_"
        for key, value in env.items():
            if key.startswith(prefix):
                layers[section][key[len(prefix) :].lower()] = value
        for key, value in ((overrides or {}).get(section) or {}).items():
            if value is not None:
                layers[section][key] = value
    built = {}
    for section, cls in SECTIONS.items():
        fields = {n: f for n, f in _fields(cls).items() if not n.startswith("_")}
        unknown = set(layers[section]) - set(fields)
        if unknown:
            raise HmoeError(
                "config_invalid", f"[{section}]: unknown options {sorted(unknown)} (known: {', '.join(fields)})"
            )
        values = {n: _convert(section, n, v, fields[n].type) for n, v in layers[section].items()}
        _check_ranges(section, cls, {**{n: f.default for n, f in fields.items()}, **values})
        built[section] = cls(**values)
    return Config(**built)


def _warn_unknown_variables(env: typing.Mapping[str, str]) -> None:
    """A warning (not an error: other tools may own the name) for each HMOE_* variable that no option
    and no deploy script reads, with the closest known name: a misspelling would otherwise do nothing."""
    known = [f"HMOE_{section.upper()}_{name.upper()}" for section, cls in SECTIONS.items() for name in _fields(cls)]
    for key in sorted(env):
        if not key.startswith("HMOE_") or key in OTHER_VARIABLES or key.startswith(OTHER_PREFIXES):
            continue
        if any(key.startswith(f"HMOE_{section.upper()}_") for section in SECTIONS):
            continue  # an unknown option of a known section is an error below
        close = difflib.get_close_matches(key, [*known, *OTHER_VARIABLES], n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else " (hmoe config-skeleton lists every variable)"
        log.warning("warning: %s is not an hmoe setting and is ignored%s", key, hint)


def _check_ranges(section: str, cls, values: dict) -> None:
    for name, (low, high) in getattr(cls, "_ranges", {}).items():
        if not low <= values[name] <= high:
            raise HmoeError(
                "config_invalid", f"[{section}] {name} = {values[name]} is outside its sane range [{low}, {high}]"
            )
    for name, (pattern, expected) in getattr(cls, "_patterns", {}).items():
        if not re.fullmatch(pattern, values[name]):
            raise HmoeError("config_invalid", f"[{section}] {name} = {values[name]!r}; choose {expected}")
    for name, choices in getattr(cls, "_choices", {}).items():
        if values[name] not in choices:
            raise HmoeError(
                "config_invalid", f"[{section}] {name} = {values[name]!r}; choose one of {', '.join(choices)}"
            )


def config_options(section: str, names: list[str] | None = None):
    """Click decorator: one --flag per field of `section` (or the given subset), help from the field."""
    import click

    cls = SECTIONS[section]

    def decorate(fn):
        for name, f in reversed(list(_fields(cls).items())):
            if name.startswith("_") or (names is not None and name not in names):
                continue
            kind = {"str": str, "int": int, "float": float, "bool": bool}[
                f.type if isinstance(f.type, str) else f.type.__name__
            ]
            flag = "--" + name.replace("_", "-")
            fn = click.option(flag, name, type=kind, default=None, help=f"[{section}] {name} (default {f.default!r})")(
                fn
            )
        return fn

    return decorate


def skeleton() -> str:
    """The TOML config with every option commented out at its default, its note, range and variable."""
    import inspect
    import io
    import json
    import re
    import tokenize

    lines = [
        "# hmoe configuration: every option, commented out at its default.",
        "# Precedence: this file < HMOE_<SECTION>_<OPTION> environment < command-line flags.",
    ]
    for section, cls in SECTIONS.items():
        notes = {}
        for source_line in inspect.getsource(cls).splitlines():
            if match := re.match(r"\s+(\w+):", source_line):
                tokens = tokenize.generate_tokens(io.StringIO(source_line.strip() + "\n").readline)
                notes[match[1]] = " ".join(t.string.lstrip("# ") for t in tokens if t.type == tokenize.COMMENT)
        lines += ["", f"[{section}]"]
        for name, f in _fields(cls).items():
            if name.startswith("_"):
                continue
            limits = getattr(cls, "_ranges", {}).get(name) or getattr(cls, "_choices", {}).get(name)
            limits = (
                (f"one of {', '.join(limits)}" if isinstance(limits[0], str) else f"range {limits[0]}..{limits[1]}")
                if limits
                else ""
            )
            about = "; ".join(
                part for part in (notes.get(name), limits, f"env HMOE_{section.upper()}_{name.upper()}") if part
            )
            value = json.dumps(f.default) if isinstance(f.default, (str, bool)) else repr(f.default)
            lines += [f"# {about}", f"# {name} = {value}"]
    return "\n".join(lines) + "\n"
