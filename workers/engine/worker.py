"""`hmoe-worker`: one prefill, decode or colocated (both, ColocatedEngine) process, from start-up to drain.

start:  attach the weight pack (no copy of the experts) -> model on the device -> KV pool ->
        hand-off pool -> warm-up forward (kernels compiled) -> connect, Register, READY=1
loop:   receive (block only when idle) -> apply messages -> one engine step -> send its output
stop:   SIGTERM or Drain: refuse new work, finish running requests within drain_grace_s, cancel
        the rest, detach, exit 0. A second signal exits at once (1). Start-up failure exits 3.

One I/O thread owns the router socket (the zguide's agent pattern): it forwards frames between the
router and the main thread over an inproc pipe, and does the Paranoid Pirate heartbeating itself,
so a long prefill chunk never looks like a dead worker and no socket is shared between threads.
When the router's pongs stop for interval x liveness, it registers again under a new worker id and
tells the main thread, which drops its requests (the router has failed them).

Past 400 lines because start-up (with the streaming-prefill choice), the main loop and the I/O
thread's liveness protocol (re-registration, incarnations, stuck exits) share one object's state;
the I/O thread is the part to move out next.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time

import click
import torch
import zmq

from hmoe.runtime import policy, protocol
from hmoe.runtime.config import Config, WorkerConfig, config_options, load_config
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.log import configure_logging
from hmoe.runtime.sd_notify import SdNotify
from hmoe.shm import ShmError
from hmoe.workers.engine.colocated import ColocatedEngine
from hmoe.workers.engine.decode import DecodeEngine
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.engine.prefill import PrefillEngine
from hmoe.workers.engine.ranks import Ranks, device_free_bytes, parse_devices, streamed_prefill
from hmoe.workers.model.causal_lm import CausalLM, load_model
from hmoe.workers.model.kv_cache import KVPool, bytes_per_token, kv_budget_bytes
from hmoe.workers.model.prefix_cache import PrefixCache
from hmoe.workers.weights.pack_source import PackSource

log = logging.getLogger("hmoe.worker")

EXIT_FAILURE, EXIT_STARTUP_FAILURE = 1, 3
RECONNECTED = b"reconnected"  # I/O thread -> main thread, on the pipe: the router lost us; we registered again
ROUTER_RESTARTED = b"router-restarted"  # I/O thread -> main thread: a new router incarnation answered
DROPPED = b"dropped"  # main thread -> I/O thread: requests dropped; what came before this was for the old registration
STOP = b"stop"  # main thread -> I/O thread: forward what came before, then close the socket
ACCEPTED = (protocol.Prefill, protocol.Adopt, protocol.Cancel, protocol.Drain)  # and the router's answers:
ACCEPTED += (protocol.WorkerPong, protocol.Registered, protocol.Error)


class WorkerProcess:
    def __init__(self, role: str, config: Config, router: str):
        assert role in ("prefill", "decode", "colocated"), role
        self.role, self.config, self.router = role, config, router
        self.notify = SdNotify.from_env()
        self.context = zmq.Context.instance()
        self.pipe: zmq.Socket | None = None  # the main thread's end of the pipe to the I/O thread
        self.io_thread: threading.Thread | None = None
        self.worker_id = ""
        self.draining_since: float | None = None
        self.signals = 0
        self.steps, self.step_s = 0, 0.0  # engine steps that ran a forward pass, and their time
        # What start() builds, in order; close() releases whatever of it exists.
        self.source: PackSource | None = None
        self.experts = None
        self.streaming = None  # StreamingExperts of a prefill worker that streams long passes
        self.handoff: HandoffPool | None = None
        self.engine: PrefillEngine | DecodeEngine | ColocatedEngine | None = None
        self.prefill_room = 0  # colocated: KV token slots kept beside the decode share for the prompt prefilling
        self.ranks: Ranks | None = None  # a prefill worker's other devices ([worker] devices)

    # -- start-up --------------------------------------------------------------------------------

    def start(self) -> None:
        w = self.config.worker
        # The cores follow the work (policy.cpu_threads): half each, unless the prefill worker streams long
        # prompts to a GPU, then mostly the decode worker's; a colocated worker takes all but one.
        cpus = len(os.sched_getaffinity(0))
        prefill_devices = parse_devices(w.devices) or [w.device]
        devices = prefill_devices if self.role == "prefill" else [w.device]
        on_gpu = prefill_devices[0] != "cpu" and prefill_streams(w, prefill_devices[0])
        self.threads = w.cpu_threads or policy.cpu_threads(self.role, cpus, on_gpu)
        torch.set_num_threads(self.threads)
        device = _check_device(devices[0])  # before anything slow: a restart cannot fix it
        if len(devices) > 1:
            for name in devices[1:]:
                _check_device(name)
            if not prefill_streams(w, devices[0]):
                raise HmoeError(
                    "config_invalid",
                    f"[worker] devices = {w.devices!r} spans devices for streamed prefill: "
                    'set prefill_experts = "auto" (on GPUs) or "stream", and experts = "cpu"',
                )
            self.ranks = Ranks(self.config, devices)  # the followers load beside this process
        self.source = PackSource.attach(w.pack, self.config.shm, wait_s=60.0)
        self.experts = self._experts(device)
        self.model: CausalLM = load_model(self.source, device, w.dtype, experts=self.experts)
        slot_tokens = w.handoff_slot_tokens or self.config.router.max_prompt_tokens
        kv_bytes = kv_budget_bytes(
            w.kv_cache_gib,
            self.config.router.max_prompt_tokens,
            self.config.http.default_max_tokens,
            self.model.config,
            self.model.dtype,
        )
        if self.role == "prefill" and self.ranks is None:
            kv_bytes += int(w.prefix_cache_gib * (1 << 30))
        if self.role == "colocated":  # room for the prompt being prefilled beside what the router reserves
            self.prefill_room = -(-slot_tokens // w.kv_block_size) * w.kv_block_size
            kv_bytes += self.prefill_room * bytes_per_token(self.model.config, self.model.dtype)
        self.kv = KVPool.from_budget(self.model.config, kv_bytes, w.kv_block_size, self.model.dtype, device)
        if self.role == "decode":
            self.engine = self._decode_engine()
        else:
            self.handoff = HandoffPool.create(
                f"{self.role}-{os.getpid()}",
                w.handoff_slots,
                self.kv.bytes_per_token * min(slot_tokens, self.kv.capacity_tokens),
                self.config.shm,
            )
            if device.type == "cuda":  # the KV's copy out of the GPU is then a DMA (pageable: ~5x slower)
                try:
                    self.handoff.pin()
                except ShmError as exc:
                    log.warning("KV hand-off written through pageable memory (slower): %s", exc.message)
            self.streaming, stream_min_tokens, max_pass_tokens = self._streaming(device)
            prefill = PrefillEngine(
                self.model,
                self.kv,
                self.handoff,
                w.prefill_chunk_tokens,
                w.handoff_timeout_s,
                self.streaming,
                stream_min_tokens,
                w.prefill_chunk_tokens if self.role == "colocated" else max_pass_tokens,  # chunks between decode steps
                # colocated: decode needs every block; ranks: a cached prefix would be on this one alone
                self._prefix_cache() if self.role == "prefill" and self.ranks is None else None,
                ranks=self.ranks,
            )
            self.engine = prefill if self.role == "prefill" else ColocatedEngine(prefill, self._decode_engine())
        if self.ranks is not None:
            self.ranks.started()  # every rank has loaded: the warm-up is the first command
        self._warm_up()
        address = f"inproc://hmoe-worker-{id(self)}"
        self.pipe = self.context.socket(zmq.PAIR)
        self.pipe.bind(address)
        self.io_thread = threading.Thread(target=self._io, args=(address,), name="router-io", daemon=True)
        self.io_thread.start()
        self.notify.ready(f"{self.role} worker serving {w.pack} on {w.device}")
        log.info(
            "%s worker ready: pack %s, %s %s, KV %d tokens, %d CPU threads",
            self.role,
            w.pack,
            device,
            self.model.dtype,
            self.kv.capacity_tokens,
            self.threads,
        )

    def _decode_engine(self) -> DecodeEngine:
        w = self.config.worker
        return DecodeEngine(
            self.model,
            self.kv,
            w.max_batch,
            w.micro_batches,
            self.config.shm,
            adopt_slice_bytes=(w.adopt_slice_mib or adopt_slice_mib(self.model.device)) << 20,
        )

    def _prefix_cache(self) -> PrefixCache | None:
        """The prefill worker's prefix cache: prefix_cache_gib of the KV pool's blocks (0: none)."""
        w = self.config.worker
        per_block = self.kv.bytes_per_token * self.kv.block_size
        budget_blocks = min(int(w.prefix_cache_gib * (1 << 30)) // per_block, self.kv.num_blocks)
        if budget_blocks == 0:
            return None
        identity = f"{sorted(self.source.identity().items())}|{self.source.expert_format}"  # the model and format
        log.info(
            "prefix cache: %d blocks of %d tokens (%.2f GiB)", budget_blocks, self.kv.block_size, w.prefix_cache_gib
        )
        return PrefixCache(self.kv, budget_blocks, identity)

    def _experts(self, device: torch.device):
        if self.config.worker.experts == "torch":
            return None  # load_model's default: the torch reference backend on the device
        from hmoe.workers.experts.cpu import CpuExperts

        return CpuExperts.from_source(self.source, device, self.threads)

    def _streaming(self, device: torch.device):
        """(StreamingExperts or None, stream_min_tokens, max_pass_tokens) of a prefill worker: the ring's
        GPU memory checked against what the model and the KV cache left (too little: an error when
        prefill_experts is "stream", the CPU kernels with a warning when "auto"), the threshold measured."""
        from hmoe.workers.experts import streaming as slp

        w = self.config.worker
        if not prefill_streams(w, device.type):
            return None, 0, 1 << 30
        c = self.model.config
        per_token = slp.pass_bytes_per_token(c, self.model.dtype)
        share = self.ranks.share(c.num_experts) if self.ranks is not None else None
        scratch = 0  # the whole layer dequantized at once, unless the GPU has no room for it
        if device.type == "cuda":
            try:  # the longest prompt in one pass if it can
                pass_tokens = self.config.router.max_prompt_tokens
                scratch = slp.scratch_for(
                    self.source, device, self.model.dtype, w.stream_ring_layers, pass_tokens, share
                )
            except HmoeError as exc:
                if w.prefill_experts == "stream" or self.ranks is not None:  # forced: refuse to start
                    raise
                log.warning(
                    "prefill stays on the CPU kernels, with %d threads (the share of a streaming prefill worker; "
                    "set [worker] cpu_threads for more): %s",
                    self.threads,
                    exc.message,
                )
                return None, 0, 1 << 30
            try:
                self.source.pin()
            except ShmError as exc:
                log.warning("streaming prefill from pageable memory: %s", exc.message)
        streaming = slp.StreamingExperts.from_source(
            self.source, device, self.model.dtype, w.stream_ring_layers, share, scratch
        )
        free = device_free_bytes(device)
        if self.ranks is not None:  # every rank runs the same passes: the least free memory bounds them
            free = self.ranks.least_free_bytes(free)
        # activations of a pass stay on the GPU
        max_pass_tokens = int(free * slp.PASS_FRACTION) // per_token if device.type == "cuda" else 1 << 30
        copy_s, cpu_s_per_token = slp.measure_copy_s(streaming), slp.measure_cpu_s_per_token(self.experts, c)
        measured = max(1, int(copy_s / cpu_s_per_token))  # shorter passes finish on the CPU before one layer copies
        min_tokens = w.stream_min_tokens or measured
        log.info(
            "streaming prefill: %.2f GiB of GPU memory (%d ring layers of %.3f GiB + %d of %d experts dequantized); "
            "a layer copies in %.2f ms (%.1f GB/s), the CPU kernels take %.3f ms per token and layer: "
            "passes of >= %d tokens stream (measured %d), up to %d tokens per pass",
            streaming.device_bytes / 2**30,
            streaming.ring_layers,
            streaming.layer_bytes / 2**30,
            streaming.scratch_experts,
            streaming.num_experts,
            copy_s * 1e3,
            streaming.layer_bytes / copy_s / 1e9,
            cpu_s_per_token * 1e3,
            min_tokens,
            measured,
            max_pass_tokens,
        )
        return streaming, min_tokens, max_pass_tokens

    def _warm_up(self) -> None:
        """One tiny forward (and one streamed, if streaming) so the first request pays for no compilation."""
        from hmoe.workers.model.batch import ForwardBatch

        self.kv.reserve("warm-up", 2)
        self.model.forward(ForwardBatch.build(self.kv, [("warm-up", [0, 1], 0)]), self.kv)
        self.kv.free("warm-up")
        if self.streaming is not None:  # on every rank
            streamed_prefill(self.model, self.kv, self.streaming, self.ranks, -1, [0, 1], 2)

    def _register(self) -> protocol.Register:
        c = self.model.config
        return protocol.Register(
            self.worker_id,
            self.role,
            os.getpid(),
            str(self.model.device),
            protocol.ModelInfo(self.config.worker.pack, c.vocab_size, list(c.eos_token_ids), c.max_position_embeddings),
            self.kv.capacity_tokens - self.prefill_room,  # what the router may reserve for decoding
            self.config.worker.max_batch,
            kv_block_size=self.kv.block_size,
        )

    # -- main loop -------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._loop()
        except HmoeError as exc:  # from a step, a cancel or a drain alike
            if exc.code != "rank_lost":
                raise
            log.error("%s: exiting for a restart", exc.message)  # the router sends our requests elsewhere
            self.ranks.broken = True
            return EXIT_FAILURE

    def _loop(self) -> int:
        while True:
            self._receive(self._wait_ms())
            if self.signals and self.draining_since is None:  # the handler only counts; the drain starts here
                self.drain()
            if self.draining_since is not None:
                if not self.engine.busy:
                    break
                if time.monotonic() - self.draining_since > self.config.worker.drain_grace_s:
                    self._cancel_all("shutting_down", "the worker is shutting down")
                    break
            busy, start_s = self.engine.busy, time.perf_counter()
            for msg in self.engine.step():
                self._send(msg)
            if self.ranks is not None:  # the other ranks wait on the next command within the group's timeout
                self.ranks.ping_if_idle()
            if busy:  # a forward pass ran: its time goes out with the heartbeat (read by the I/O thread)
                self.steps, self.step_s = self.steps + 1, self.step_s + time.perf_counter() - start_s
            self.notify.tick()
        return 0

    def _wait_ms(self) -> int:
        """How long the loop may wait for a message before its next step: 50 ms idle, 5 ms while a
        prefilled prompt waits for a hand-off slot (the decode worker frees it in shared memory, no
        message says so), else not at all."""
        if not self.engine.busy:
            return 50
        awaiting = isinstance(self.engine, (PrefillEngine, ColocatedEngine)) and self.engine.awaiting_slot
        return 5 if awaiting else 0

    def _receive(self, timeout_ms: int) -> None:
        """Apply every message the I/O thread passed on, waiting up to timeout_ms for the first."""
        while self.pipe.poll(timeout_ms):
            timeout_ms = 0
            frame = self.pipe.recv()
            if frame == RECONNECTED:
                self.engine.drop_all()  # the router failed them when it lost us
                self.pipe.send(DROPPED)
                continue
            if frame == ROUTER_RESTARTED:
                if isinstance(self.engine, (PrefillEngine, ColocatedEngine)):
                    self.engine.release_unadopted()  # nobody will adopt what the old router's requests left
                continue
            try:
                self._apply(protocol.decode(frame, ACCEPTED))
            except HmoeError as exc:
                if exc.code == "rank_lost":  # not the message's fault: the worker restarts (run)
                    raise
                log.warning("bad message from the router: %s", exc)
                request_id = getattr(exc, "request_id", None)  # what a request carried fails that request only
                reply = protocol.RequestError(request_id, exc.code, exc.message) if request_id else None
                self._send(reply or protocol.Error(exc.code, exc.message))

    def _apply(self, msg) -> None:
        match msg:
            case protocol.Prefill() | protocol.Adopt() if self.draining_since is not None:
                self._send(protocol.RequestError(msg.request_id, "draining", "the worker is shutting down"))
            case protocol.Prefill() | protocol.Adopt() if self.role in (
                "colocated",
                "prefill" if isinstance(msg, protocol.Prefill) else "decode",
            ):
                try:  # what a request carries fails that request, never the worker
                    for out in self.engine.add(msg):
                        self._send(out)
                except HmoeError as exc:
                    self._send(protocol.RequestError(msg.request_id, exc.code, exc.message))
            case protocol.Prefill() | protocol.Adopt():
                self._send(protocol.RequestError(msg.request_id, "wrong_role", f"this is a {self.role} worker"))
            case protocol.Cancel():
                self.engine.cancel(msg.request_id)
            case protocol.Drain():
                self.drain()
            case protocol.Registered(version=version):
                log.info("registered with the router as %s, protocol version %d", msg.worker_id, version)
            case protocol.Error():  # the router refused this worker (another model, a protocol too old) or a frame
                log.error("the router says [%s] %s", msg.code, msg.message)

    def _send(self, msg) -> None:
        self.pipe.send(protocol.encode(msg))

    def _io(self, address: str) -> None:
        """The I/O thread: router socket <-> pipe, heartbeats both ways, re-registration."""
        r = self.config.router
        dead_after_s = r.heartbeat_interval_s * r.heartbeat_liveness
        pipe = self.context.socket(zmq.PAIR)
        pipe.connect(address)
        sock, generation, outage, last_heard, next_ping = None, 0, False, 0.0, 0.0
        incarnation, register_now = "", False  # of the router this registration talks to
        known_router = ""  # the incarnation heard last, across registrations
        stale = False  # between RECONNECTED and DROPPED: the main thread's output is about the old registration
        while True:
            now = time.monotonic()
            if sock is None or now - last_heard > dead_after_s or register_now:
                if sock is not None:
                    if register_now:
                        log.warning("the router does not know this worker (it restarted?): registering again")
                    elif not outage:  # one line per outage, not one per attempt
                        log.warning(
                            "router silent for %.1f s: dropping requests and registering again", now - last_heard
                        )
                    outage = True
                    sock.close(linger=0)
                    pipe.send(RECONNECTED)
                    stale = True
                generation += 1
                self.worker_id = f"{self.role}-{socket.gethostname()}-{os.getpid()}-{generation}"
                sock = self.context.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(self.router)
                sock.send(protocol.encode(self._register()))
                last_heard, incarnation, register_now = now, "", False
            if now >= next_ping:
                ping = self._ping()
                sock.send(protocol.encode(ping))
                next_ping = now + r.heartbeat_interval_s
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(pipe, zmq.POLLIN)
            for ready, _ in poller.poll(max(0.0, min(next_ping - now, 0.05)) * 1000):
                frame = ready.recv()
                if ready is pipe and frame == STOP:
                    sock.close(linger=1000)  # give the last replies a second to leave
                    pipe.close(linger=0)
                    return
                if ready is pipe:
                    if frame == DROPPED:
                        stale = False
                    elif not stale:  # a stale Prefilled on the new socket would hand off a slot drop_all frees
                        sock.send(frame)
                    continue
                last_heard, outage = time.monotonic(), False  # any message proves the router alive
                match _control(frame):
                    case protocol.Registered(incarnation=seen):  # before any request of that router: say so first
                        if seen and known_router and seen != known_router:
                            pipe.send(ROUTER_RESTARTED)  # the main thread frees only what the old one left
                        known_router = seen or known_router
                        pipe.send(frame)
                    case protocol.WorkerPong(incarnation=seen):  # a new router behind the same endpoint
                        register_now = bool(incarnation and seen and seen != incarnation)
                        incarnation = incarnation or seen
                        if seen and known_router and seen != known_router:
                            pipe.send(ROUTER_RESTARTED)
                        known_router = seen or known_router
                    case protocol.Error(code="not_registered"):
                        register_now = True
                    case protocol.Error(code="worker_stuck", message=why):  # the main thread is hung: restart
                        log.error("the router found this worker stuck (%s): exiting for a restart", why)
                        faulthandler.dump_traceback(all_threads=True)  # where it hangs, into the log
                        os._exit(EXIT_FAILURE)
                    case _:
                        pipe.send(frame)

    def _ping(self) -> protocol.WorkerPing:
        """The heartbeat, built on the I/O thread from counts the main thread keeps (no iteration)."""
        running, waiting = self.engine.load()
        free, stats = max(0, self.kv.free_blocks * self.kv.block_size - self.prefill_room), None
        if isinstance(self.engine, PrefillEngine):
            free = self.engine.free_tokens()
            if (prefix := self.engine.prefix) is not None:
                stats = protocol.PrefixStats(
                    prefix.cached_tokens, prefix.capacity_tokens, prefix.query_tokens, prefix.hit_tokens
                )
        return protocol.WorkerPing(self.worker_id, free, running, waiting, self.steps, self.step_s, stats)

    def _cancel_all(self, code: str, message: str) -> None:
        ids = self.engine.request_ids()
        self.engine.drop_all()
        for request_id in ids:
            self._send(protocol.RequestError(request_id, code, message))

    # -- shutdown --------------------------------------------------------------------------------

    def drain(self) -> None:
        if self.draining_since is None:
            log.info("draining: finishing running requests within %.0f s", self.config.worker.drain_grace_s)
            self.draining_since = time.monotonic()
            self.notify.stopping("draining")
            self.notify.extend_timeout(self.config.worker.drain_grace_s + 10)  # systemd waits for the drain

    def on_signal(self, signum, frame) -> None:
        self.signals += 1
        if self.signals > 1:  # runs between any two bytecodes of the main thread: touches nothing shared
            os.write(2, b"hmoe-worker: second signal: exiting now\n")
            os._exit(EXIT_FAILURE)  # the hand-off segment's name goes at the next prefill start (dead creator)

    def close(self) -> None:
        if self.io_thread is not None:
            self.pipe.send(STOP)
            self.io_thread.join()
            self.io_thread = None
        if self.pipe is not None:
            self.pipe.close(linger=0)
            self.pipe = None
        if self.experts is not None:
            self.experts.close()
        if self.handoff is not None:
            self.handoff.close()
        if isinstance(self.engine, (DecodeEngine, ColocatedEngine)):
            self.engine.close()
        if self.ranks is not None:
            self.ranks.stop()
        if self.source is not None:
            self.source.close()


def prefill_streams(w: WorkerConfig, device: str) -> bool:
    """Whether a prefill worker on `device` ("cpu", "cuda", "cuda:1") streams its long passes' experts:
    forced ("stream"), or by default ("auto") on a GPU; the CPU kernels must be the experts' backend."""
    auto = w.prefill_experts == "auto" and device.startswith("cuda")
    return w.experts == "cpu" and (w.prefill_experts == "stream" or auto)


def adopt_slice_mib(device: torch.device) -> int:
    """[worker] adopt_slice_mib 0: on a GPU the slice is a DMA on a side stream beside the step, so it may be
    large (1 GiB, ~20 ms of PCIe 5: a 32K Qwen3-30B-A3B prompt's 3 GiB of KV joins in 3 steps; in 64 MiB
    slices it took 48, ~15 s for its second token beside 16 streams' 0.3 s steps on the H200 box); on a
    CPU it is a copy on the step's own thread, which it delays (64 MiB, a few ms)."""
    return 1024 if device.type == "cuda" else 64


def _check_device(name: str) -> torch.device:
    """The worker's device, or HmoeError "startup_failed" (exit 3, not restarted) when this machine lacks it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HmoeError("startup_failed", f"device {name!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise HmoeError(
                "startup_failed",
                f"device {name}: this machine has {count} usable CUDA device(s) (torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}): use --device cpu or another index",
            )
    return device


def _control(frame: bytes):
    """The messages the I/O thread acts on (a WorkerPong, a Registered, a not_registered or worker_stuck
    Error), else None (for the main thread alone)."""
    if len(frame) > 256:  # Prefill, Adopt: not a control message; the main thread decodes it
        return None
    try:
        msg = protocol.decode(frame, (protocol.WorkerPong, protocol.Registered, protocol.Error))
    except HmoeError:
        return None
    if isinstance(msg, protocol.Error) and msg.code not in ("not_registered", "worker_stuck"):
        return None
    return msg


@click.command()
@click.option("--role", type=click.Choice(["prefill", "decode", "colocated"]), required=True)
@click.option("--router", "router_endpoint", default=None, help="The router's backend endpoint (default from config).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="TOML config file.")
@config_options("worker", ["pack", "device", "dtype", "kv_cache_gib", "max_batch", "experts", "cpu_threads"])
def main(role, router_endpoint, config_path, **worker_flags) -> None:
    """Run one hmoe worker process (prefill or decode) until drained."""
    configure_logging(process=role)
    try:
        config = load_config(config_path, overrides={"worker": worker_flags})
        configure_logging(config.router.log_level, process=role, context=lambda: {"role": role})
        if not config.worker.pack:
            raise HmoeError("config_invalid", "no weight pack: pass --pack NAME or set [worker] pack")
        worker = WorkerProcess(role, config, router_endpoint or config.backend)
        configure_logging(  # the id changes each time it registers: read per line
            config.router.log_level, process=role, context=lambda: {"role": role, "worker_id": worker.worker_id}
        )
        signal.signal(signal.SIGTERM, worker.on_signal)
        signal.signal(signal.SIGINT, worker.on_signal)
        worker.start()
    except HmoeError as exc:
        log.error("start-up failed: %s", exc)
        if "worker" in locals():
            worker.close()
        # a lost rank may be passing trouble (restart); anything else a restart cannot fix
        sys.exit(EXIT_FAILURE if exc.code == "rank_lost" else EXIT_STARTUP_FAILURE)
    except BaseException:
        if "worker" in locals():
            worker.close()  # its other ranks too, or the exit waits for them
        raise
    try:
        code = worker.run()
    finally:
        worker.close()
    log.info("%s worker stopped", role)
    sys.exit(code)


if __name__ == "__main__":
    main()
