"""`hmoe serve --layout colocated`: one worker process prefills and decodes; the router treats it as both
roles, the clients see the same service (real processes, sockets and shared memory, CPU)."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner
from helpers.serve import serve

from hmoe.runtime import AsyncClient, Client
from hmoe.runtime.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    yield from serve(
        tiny_models("deepseek_v3", "fp32"), tmp_path_factory.mktemp("colocated"), "colocated-test",
        HMOE_WORKER_LAYOUT="colocated",
    )  # fmt: skip


def test_one_worker_serves_concurrent_streams_with_the_greedy_tokens_of_sequential_runs(served):
    prompts = [f"Request {i}: the fox jumps over {i * 7} dogs." for i in range(6)]
    greedy = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
    with Client(served.endpoint) as client:
        sequential = [client.complete(p, **greedy).token_ids for p in prompts]
        status = client.status()
    assert [w["role"] for w in status["workers"]] == ["colocated"]

    async def concurrent():
        async with AsyncClient(served.endpoint) as client:
            return await asyncio.gather(*(client.complete(p, **greedy) for p in prompts))

    results = asyncio.run(concurrent())
    assert [r.token_ids for r in results] == sequential and all(len(t) == 12 for t in sequential)
    health = CliRunner().invoke(main, ["health", "--endpoint", served.endpoint])
    assert health.exit_code == 0 and "1 prefill + 1 decode workers" in health.output, health.output
