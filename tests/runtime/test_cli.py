"""The `hmoe` commands a user meets first, in-process (click's runner) against a real router where one
is needed: help that only helps, one spelling of the shared options, one-line errors with codes,
exit statuses that say what happened, and `--wait` that stops when the serve it waits for is gone."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import click
import pytest
from click.testing import CliRunner
from helpers.net import free_port, start_router
from helpers.signals import foreground

from hmoe.runtime import AsyncClient
from hmoe.runtime.cli import WORKER_COMMANDS, main
from hmoe.runtime.cli.instance import ServeFiles
from hmoe.runtime.config import load_config
from hmoe.runtime.sampling_params import SamplingParams

ROUTER_COMMANDS = ("generate", "status", "health", "drain")


def _hmoe(*args, env=None, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, input=input)


def _command(name: str) -> click.Command:
    return main.get_command(click.Context(main), name)


@pytest.mark.parametrize("name", sorted([*main.commands, *WORKER_COMMANDS]))
def test_every_command_help_only_prints_help(name, tmp_path):
    result = _hmoe(name, "--help", env={"HMOE_ROUTER_RUNTIME_DIR": str(tmp_path)})
    assert result.exit_code == 0 and result.output.startswith(f"Usage: main {name}"), result.output
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written
    command = _command(name)
    for sub in getattr(command, "commands", {}):  # hmoe shm load|ls|rm|gc
        assert _hmoe(name, sub, "--help").exit_code == 0


def test_one_spelling_of_the_router_options_and_the_defaults():
    for name in ROUTER_COMMANDS:
        flags = {opt for p in _command(name).params for opt in p.opts}
        assert {"--endpoint", "--port", "--server-key", "--timeout", "--config"} <= flags, (name, flags)
        assert "--timeout-s" not in flags
    default = {p.name: p.default for p in _command("generate").params}["max_tokens"]
    run_default = {p.name: p.default for p in _command("run").params}["max_tokens"]
    sdk_default = inspect.signature(AsyncClient.generate).parameters["max_tokens"].default
    assert default == run_default == sdk_default == SamplingParams().max_tokens


def test_health_and_drain_take_a_port(tmp_path):
    port = free_port()
    health = _hmoe("health", "--port", port, "--timeout", "0.2")
    assert health.exit_code == 2 and f"tcp://127.0.0.1:{port}" in health.output
    drain = _hmoe("drain", "--port", port, "--timeout", "0.2")
    assert drain.exit_code == 1 and "[router_unreachable]" in drain.output and f":{port}" in drain.output
    router = start_router(tmp_path)
    try:
        unhealthy = _hmoe("health", "--endpoint", router.frontend)
        assert unhealthy.exit_code == 2 and "no live prefill or decode worker" in unhealthy.output
    finally:
        router.stop()


def test_errors_are_one_line_with_a_code():
    bad_ids = _hmoe("generate", "--token-ids", "1,abc")
    assert bad_ids.exit_code == 2 and bad_ids.output.count("\n") == 1, bad_ids.output
    assert bad_ids.output.startswith("error: [usage] ") and "--token-ids" in bad_ids.output
    both = _hmoe("generate", "hi", "--token-ids", "1")
    assert both.exit_code == 2 and both.output.startswith("error: [usage] give a PROMPT or --token-ids")
    bad_env = _hmoe("status", env={"HMOE_ROUTER_MAX_QUEUED": "abc"})
    assert (
        bad_env.exit_code == 1
        and bad_env.output == "error: [config_invalid] [router] max_queued: 'abc' is not an integer\n"
    )
    bad_device = _hmoe("status", env={"HMOE_WORKER_DEVICE": "tpu"})
    assert "[config_invalid] [worker] device = 'tpu'; choose cpu, cuda or cuda:N" in bad_device.output


def test_a_misspelled_variable_is_warned_about_with_the_right_name(caplog):
    with caplog.at_level(logging.WARNING, logger="hmoe.runtime.config"):
        load_config(env={"HMOE_WORKR_DEVICE": "cuda", "HMOE_ROOT": "/x", "HMOE_BENCH_KT_DIR": "/y"})
    assert [r.getMessage() for r in caplog.records] == [
        "warning: HMOE_WORKR_DEVICE is not an hmoe setting and is ignored; did you mean HMOE_WORKER_DEVICE?"
    ]


def test_prompt_and_token_ids_from_stdin_or_a_file(tmp_path):
    from hmoe.runtime.cli.options import parse_token_ids, read_value

    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(map(str, range(100_000))))  # past any argument-list limit
    assert parse_token_ids(f"@{ids}") == list(range(100_000))
    assert parse_token_ids("1, 2,3") == [1, 2, 3]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello from a file")
    assert read_value(f"@{prompt}", "PROMPT") == "Hello from a file"
    echoed = CliRunner().invoke(click.command()(lambda: click.echo(read_value("-", "PROMPT"))), input="from stdin")
    assert echoed.output == "from stdin\n"
    missing = _hmoe("generate", f"@{tmp_path / 'nope.txt'}", "--port", free_port())
    assert missing.exit_code == 2 and "cannot read" in missing.output


@contextlib.contextmanager
def idle_workers(backend: str):
    """A prefill and a decode worker that register and heartbeat but never answer: a request stays running."""
    import zmq

    from hmoe.runtime.protocol import ModelInfo, Register, WorkerPing, encode

    stop = threading.Event()

    def beat():
        context = zmq.Context()
        sockets = []
        for role in ("prefill", "decode"):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(backend)
            sock.send(encode(Register(f"{role}-idle", role, os.getpid(), "cpu", ModelInfo("idle", 0, [], 0), 4096, 8)))
            sockets.append((sock, f"{role}-idle"))
        while not stop.wait(0.2):
            for sock, worker_id in sockets:
                sock.send(encode(WorkerPing(worker_id, 4096, 0)))
                while sock.poll(0):
                    sock.recv()
        for sock, _ in sockets:
            sock.close()
        context.term()

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_timeout_exits_124_and_ctrl_c_says_cancelled_once(tmp_path):
    """A real router whose workers never answer: a request runs until its deadline, or Ctrl-C."""
    router = start_router(tmp_path)
    try:
        with idle_workers(router.backend):
            _wait_running_or_queued(router.frontend, workers=2)
            _generate_times_out_then_ctrl_c(router)
    finally:
        router.stop()


def _wait_running_or_queued(frontend: str, workers: int = 0, busy: bool = False) -> None:
    from hmoe.runtime.client import status_once

    deadline = time.monotonic() + 60
    while True:
        status = status_once(frontend, 5.0)
        if len(status["workers"]) >= workers and (not busy or status["running"] + status["queued"] > 0):
            return
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def _generate_times_out_then_ctrl_c(router) -> None:
    timed_out = _hmoe("generate", "--endpoint", router.frontend, "--token-ids", "1,2", "--timeout", "0.5")
    assert timed_out.exit_code == 124, timed_out.output
    assert "timeout" in timed_out.output
    waiting = subprocess.Popen(
        [sys.executable, "-m", "hmoe.runtime.cli", "generate", "--endpoint", router.frontend, "--token-ids", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=foreground,
    )
    from hmoe.runtime.client import status_once

    _wait_running_or_queued(router.frontend, busy=True)
    assert waiting.poll() is None
    waiting.send_signal(signal.SIGINT)
    assert waiting.wait(30) == 130
    said = waiting.stderr.read()
    assert said.count("[cancelled]") == 1 and "Aborted" not in said and "Traceback" not in said, said
    while (status := status_once(router.frontend, 5.0))["running"] + status["queued"]:  # the cancel got there
        time.sleep(0.05)


def test_wait_stops_when_the_serve_it_waits_for_failed_or_exited(tmp_path, monkeypatch):
    port = free_port()
    env = {"HMOE_ROUTER_RUNTIME_DIR": str(tmp_path)}
    files = ServeFiles(tmp_path, f"tcp://127.0.0.1:{port}")

    def serve_fails_later():
        time.sleep(0.3)  # after generate started waiting, as in `{ hmoe serve & } && hmoe generate --wait 600`
        files.claim()
        files.fail("[startup_failed] tcp://127.0.0.1:1 is in use")
        files.release()

    threading.Thread(target=serve_fails_later).start()
    start = time.monotonic()
    failed = _hmoe("generate", "--port", port, "--wait", "600", "Hello", env=env)
    assert failed.exit_code == 1 and time.monotonic() - start < 60, failed.output
    assert "[not_ready] hmoe serve failed to start: [startup_failed] tcp://127.0.0.1:1 is in use" in failed.output

    files.failed_path.unlink()
    files.pid_path.write_text("4242\n")  # what a killed serve leaves: a pid file nobody locks
    exited = _hmoe("generate", "--port", port, "--wait", "600", "Hello", env=env)
    assert exited.exit_code == 1 and "hmoe serve (pid 4242) has exited" in exited.output

    os.utime(files.pid_path, (0, 0))  # an old leftover does not speak for the serve we wait for...
    monkeypatch.setattr("hmoe.runtime.cli.requests.WAIT_REPORT_S", 0.2)
    slow = _hmoe("generate", "--port", port, "--wait", "1", "Hello", env=env)
    assert slow.exit_code == 1 and "did not get a prefill and a decode worker within 1 s" in slow.output
    assert "waiting for tcp://127.0.0.1:" in slow.output and "no router answers yet" in slow.output  # ...progress


def test_a_second_serve_on_the_port_is_refused_and_touches_nothing(tmp_path):
    frontend = f"tcp://127.0.0.1:{free_port()}"
    first, second = ServeFiles(tmp_path, frontend), ServeFiles(tmp_path, frontend)
    first.claim()
    first.backend_path.touch()
    with pytest.raises(Exception) as refused:
        second.claim()
    assert refused.value.code == "startup_failed" and str(os.getpid()) in str(refused.value)
    second.fail("x")
    second.release()
    assert first.pid_path.exists() and first.backend_path.exists() and not first.failed_path.exists()
    assert ServeFiles(tmp_path, frontend).gone(time.time() - 1) is None  # alive
    first.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_while_waiting_for_serve_says_cancelled_once(tmp_path):
    waiting = subprocess.Popen(
        [sys.executable, "-m", "hmoe.runtime.cli", "generate", "--port", str(free_port()), "--wait", "30", "Hi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HMOE_ROUTER_RUNTIME_DIR": str(tmp_path)},
        preexec_fn=foreground,
    )
    said = waiting.stderr.readline()  # its first progress line: it is waiting
    assert said.startswith("waiting for tcp://127.0.0.1:"), said
    waiting.send_signal(signal.SIGINT)
    assert waiting.wait(30) == 130
    said = waiting.stderr.read()
    assert said.count("[cancelled]") == 1 and "Aborted" not in said and "Traceback" not in said, said
