"""A prefill worker spanning several devices ([worker] devices): expert-parallel streamed prefill.

Rank 0 is the worker process: it alone talks to the router, runs the PrefillEngine and owns the
hand-off. Ranks 1.. are processes it starts (`Ranks.start`), one per further device, each with the
model (all but the routed experts) and a KV pool of its own. They run every streamed pass rank 0
runs, layer for layer, each streaming its share of every MoE layer's experts and summing the layer's
outputs with the others (workers/experts/parallel.py), on rank 0's commands: int64 tensors broadcast
over the group (`Ranks` on rank 0, `follow` on the others), never pickles:

    OPEN key start tokens prompt_len, then the pass's ids   a streamed pass begins (start 0: reserve the KV)
    LAYER                                                    one step of the pass (one next() of the forward)
    CLOSE key                                                the pass ended or was abandoned
    FREE key                                                 the prompt's KV is let go
    PING                                                     nothing: keeps an idle group inside its timeout
    STOP                                                     exit

Passes on the CPU kernels (short prompts, tails under stream_min_tokens, interleaved prompts) run on
rank 0 alone: a prompt streams first and only then, if ever, finishes on the CPU, so a follower
always holds the KV its next streamed pass needs. A cached prefix would exist on rank 0 alone, so
the prefix cache is off on such a worker.

Groups (`_Groups`, made alike on every rank right after joining): the experts' all-reduce (NCCL on
GPUs, gloo on CPUs) and the commands (gloo, CPU tensors: a lost rank fails a command at once, and a
follower never syncs its GPU to read one) time out after max(4 s, [router] stuck_after_s); a
start group with a long timeout carries one barrier, once every rank has loaded, so a slow start-up
(kernel compiles, pinning a big pack) times nothing out.

Faults: a rank that dies makes the next command or gloo collective fail at once, a hung one the next
collective after the timeout (on NCCL, its watchdog ends the process; the router's stuck_after_s
catches the rest); rank 0 then raises rank_lost, the worker exits and is restarted whole, and the
router sends its requests to the new one. Followers die with rank 0 (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from hmoe.runtime.config import Config
from hmoe.runtime.errors import HmoeError
from hmoe.workers.experts.parallel import ExpertShare, expert_shares, rank_lost_on_failure

log = logging.getLogger(__name__)

OPEN, LAYER, CLOSE, FREE, PING, STOP = range(6)
PING_EVERY_S = 1.0  # an idle group's command cadence: a lost rank is found within it; the timeout floor is 4x it
START_TIMEOUT = timedelta(minutes=30)  # joining, loading and the start barrier


def parse_devices(devices: str) -> list[str]:
    return [d.strip() for d in devices.split(",") if d.strip()]


def device_free_bytes(device: torch.device) -> int:
    """Free memory on a GPU; no bound (1 << 62) on a CPU."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 62


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _group_timeout(config: Config) -> timedelta:
    return timedelta(seconds=max(PING_EVERY_S * 4, config.router.stuck_after_s))


class _Groups:
    """Join the ranks (rendezvous on port) and make the groups every rank makes, in the same order."""

    def __init__(self, config: Config, devices: list[str], rank: int, port: int):
        backend, timeout = _backend(devices[0]), _group_timeout(config)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(devices), timeout=START_TIMEOUT
        )
        self.start = dist.new_group(backend="gloo", timeout=START_TIMEOUT)
        self.commands = dist.new_group(backend="gloo", timeout=timeout)
        self.experts = dist.new_group(backend=backend, timeout=timeout)

    def least_free_bytes(self, free: int) -> int:
        """The least of every rank's free device memory (each gives its own, once its ring is allocated)."""
        tensor = torch.tensor([free], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.start)
        return int(tensor.item())

    def started(self) -> None:
        """Wait until every rank has loaded (rank 0: just before its first command)."""
        dist.barrier(group=self.start)


class Ranks:
    """Rank 0's end: starts the followers, joins the group with them, sends them each pass's commands."""

    def __init__(self, config: Config, devices: list[str]):
        self.devices, self.processes = devices, []
        self.device = torch.device(devices[0])
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with socket.socket() as s:  # a free port for the group's rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        context = multiprocessing.get_context("spawn")
        for rank in range(1, len(devices)):
            process = context.Process(
                target=_follower_main, args=(config, devices, rank, port), name=f"prefill-rank{rank}", daemon=True
            )
            process.start()
            self.processes.append(process)
        self.groups = _Groups(config, devices, 0, port)
        self.broken = False  # a collective failed: no more commands (the worker exits)
        self.last_command_s = time.monotonic()
        log.info("prefill ranks: %s (pids %s)", ", ".join(devices), [p.pid for p in self.processes])

    def share(self, num_experts: int) -> ExpertShare:
        return ExpertShare(*expert_shares(num_experts, len(self.devices))[0], self.groups.experts)

    def least_free_bytes(self, free: int) -> int:
        """The least free device memory of any rank, this one's `free` included (sizes the passes)."""
        return self._starting(self.groups.least_free_bytes, free)

    def started(self) -> None:
        """Every rank has loaded: commands may flow (their timeout starts counting now)."""
        self._starting(self.groups.started)
        self.last_command_s = time.monotonic()

    def _starting(self, step, *args):
        with self._collective("a prefill rank did not start"):
            return step(*args)

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """rank_lost when the collective fails, and no command after it."""
        try:
            with rank_lost_on_failure(what):
                yield
        except HmoeError:
            self.broken = True
            raise

    def open(self, key: int, start: int, token_ids, prompt_len: int) -> None:
        self._send(OPEN, key, start, len(token_ids), prompt_len)
        self._broadcast(torch.tensor(list(token_ids), dtype=torch.int64))

    def layer(self) -> None:
        self._send(LAYER)

    def close_pass(self, key: int) -> None:
        self._send(CLOSE, key)

    def free(self, key: int) -> None:
        self._send(FREE, key)

    def ping_if_idle(self) -> None:
        if time.monotonic() - self.last_command_s > PING_EVERY_S:
            self._send(PING)

    def stop(self) -> None:
        """STOP the followers (when the group still works), then make sure they are gone. After a failed
        collective no STOP can reach them: a live follower is hung or waits out its own collective, so it
        is killed at once rather than after a wait that the worker's restart would spend."""
        if not self.broken:
            try:
                self._send(STOP)
            except HmoeError:
                pass
        for process in self.processes:
            process.join(timeout=0 if self.broken else 10)
            if process.is_alive():
                process.kill()
                process.join()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _send(self, op: int, *args: int) -> None:
        command = [op, *args] + [0] * (4 - len(args))
        self._broadcast(torch.tensor(command, dtype=torch.int64))
        self.last_command_s = time.monotonic()

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self.broken:
            raise HmoeError("rank_lost", "a prefill rank was lost earlier")
        with self._collective("a prefill rank is gone"):
            dist.broadcast(tensor, 0, group=self.groups.commands)


class _StreamedOnly:
    """A follower's model runs routed experts only through the streamed pass it is handed."""

    def submit(self, layer_id, hidden, topk_ids, topk_weights):
        raise AssertionError("a follower rank runs routed experts only in streamed passes")

    wait = submit


def _follower_main(config: Config, devices: list[str], rank: int, port: int) -> None:
    """A follower process: join the group first (rank 0 waits for it), then load, then follow."""
    from hmoe.runtime.log import configure_logging
    from hmoe.workers.experts.streaming import StreamingExperts, scratch_for
    from hmoe.workers.model.causal_lm import load_model
    from hmoe.workers.model.kv_cache import KVPool, kv_budget_bytes
    from hmoe.workers.weights.pack_source import PackSource

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with rank 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 drains and sends STOP
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(config.router.log_level, process=f"prefill-rank{rank}")
    w = config.worker
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    groups = _Groups(config, devices, rank, port)
    source = PackSource.attach(w.pack, config.shm, wait_s=60.0)
    try:
        if device.type == "cuda":
            source.pin()
        model = load_model(source, device, w.dtype, experts=_StreamedOnly())
        c = model.config
        share = ExpertShare(*expert_shares(c.num_experts, len(devices))[rank], groups.experts)
        budget = kv_budget_bytes(
            w.kv_cache_gib, config.router.max_prompt_tokens, config.http.default_max_tokens, c, model.dtype
        )
        kv = KVPool.from_budget(c, budget, w.kv_block_size, model.dtype, device)  # first, as rank 0 does
        ring, pass_tokens = w.stream_ring_layers, config.router.max_prompt_tokens
        scratch = scratch_for(source, device, model.dtype, ring, pass_tokens, share)  # what this GPU has room for
        streaming = StreamingExperts.from_source(source, device, model.dtype, ring, share, scratch)
        log.info("prefill rank %d of %d on %s: experts %d..%d", rank, len(devices), device, share.first, share.end)
        groups.least_free_bytes(device_free_bytes(device))
        groups.started()
        follow(model, kv, streaming, w.prefill_chunk_tokens, groups.commands)
    except (HmoeError, RuntimeError, dist.DistError) as exc:
        log.error("prefill rank %d stops: %s", rank, exc)
    finally:
        source.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(0)  # no atexit work of a spawned child (its parent owns the shared state)


def streamed_prefill(model, kv, streaming, ranks: Ranks | None, key: int, token_ids: list[int], chunk_tokens: int):
    """One prompt in one streamed pass on every rank (the warm-up, benchmarks): its last chunk's logits.
    The PrefillEngine drives the same commands a layer per step."""
    from hmoe.workers.model.batch import ForwardBatch

    seq = f"rank-pass-{key}"
    kv.reserve(seq, len(token_ids))
    starts = range(0, len(token_ids), chunk_tokens)
    batches = [ForwardBatch.build(kv, [(seq, token_ids[i : i + chunk_tokens], i)]) for i in starts]
    stream_pass = streaming.open_pass()
    if ranks is not None:
        ranks.open(key, 0, token_ids, len(token_ids))
    steps = model.forward_layer_major(batches, kv, experts=stream_pass)
    try:
        while True:
            if ranks is not None:
                ranks.layer()
            next(steps)
    except StopIteration as done:
        return done.value[-1]
    finally:
        steps.close()
        stream_pass.close()
        kv.free(seq)
        if ranks is not None and not ranks.broken:
            ranks.close_pass(key)
            ranks.free(key)


def follow(model, kv, streaming, chunk_tokens: int, commands) -> None:
    """Run rank 0's commands (broadcast over the gloo group `commands`) until STOP; HmoeError rank_lost
    when rank 0 is gone."""
    from hmoe.workers.model.batch import ForwardBatch

    steps, stream_pass = None, None

    def receive(n: int) -> list[int]:
        tensor = torch.empty(n, dtype=torch.int64)
        with rank_lost_on_failure("prefill rank 0 is gone"):
            dist.broadcast(tensor, 0, group=commands)
        return tensor.tolist()

    while True:
        op, key, start, tokens, prompt_len = receive(5)
        if op == OPEN:
            ids = receive(tokens)
            if start == 0:
                kv.reserve(str(key), prompt_len)
            batches = [
                ForwardBatch.build(kv, [(str(key), ids[i : i + chunk_tokens], start + i)])
                for i in range(0, tokens, chunk_tokens)
            ]
            stream_pass = streaming.open_pass()
            steps = model.forward_layer_major(batches, kv, experts=stream_pass)
        elif op == LAYER:
            try:
                next(steps)
            except StopIteration:
                pass
        elif op == CLOSE:
            steps.close()
            stream_pass.close()
            steps, stream_pass = None, None
        elif op == FREE:
            kv.free(str(key))
        elif op == STOP:
            return
