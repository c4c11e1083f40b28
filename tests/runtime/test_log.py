"""Every log line is one JSON object with its context as fields: process, pid, and a process's own fields
(a worker's role and current worker_id), for structlog and stdlib loggers (workers/, shm/) alike."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import logging, structlog
from hmoe.runtime.log import configure_logging
worker = {"id": ""}
configure_logging("info", process="prefill", context=lambda: {"role": "prefill", "worker_id": worker["id"]})
logging.getLogger("hmoe.shm.pack").info("attached %s", "p")
worker["id"] = "prefill-host-7-2"  # registered (again): later lines carry the new id
logging.getLogger("hmoe.workers.engine.prefill").info("refused: %s", "x", extra={"request_id": "r1", "code": "c"})
structlog.get_logger("hmoe.router").warning("admitted", request_id="r2")
"""


def test_every_line_is_json_with_the_process_context_and_the_call_fields():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60, check=True)
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [line["event"] for line in lines] == ["attached p", "refused: x", "admitted"]
    assert all(line["process"] == "prefill" and line["role"] == "prefill" and line["pid"] > 0 for line in lines)
    assert [line["worker_id"] for line in lines] == ["", "prefill-host-7-2", "prefill-host-7-2"]
    assert (lines[1]["request_id"], lines[1]["code"], lines[2]["request_id"]) == ("r1", "c", "r2")
    assert not any(key.startswith("_") for line in lines for key in line)
