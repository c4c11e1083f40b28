"""Every worker process loads libgomp with sleeping idle threads (hmoe/workers/__init__.py): torch reads
OMP_WAIT_POLICY when it is first imported, so the policy must be in the environment by then. `hmoe run`
and `hmoe serve` reach torch only through hmoe.workers (tests/test_imports.py keeps torch out of runtime/),
and `hmoe-worker` is hmoe.workers.engine.worker."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Records the policy in force when torch is first imported, then imports the module named in argv[1].
PROBE = """
import importlib, os, sys

class Watch:
    policy = "torch never imported"

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and Watch.policy == "torch never imported":
            Watch.policy = os.environ.get("OMP_WAIT_POLICY")
        return None

sys.meta_path.insert(0, Watch())
importlib.import_module(sys.argv[1])
print(Watch.policy)
"""


def _policy_when_torch_loads(module: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, module], env={**base, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_the_worker_loads_torch_with_passive_openmp_threads():
    assert _policy_when_torch_loads("hmoe.workers.engine.worker") == "passive"


@pytest.mark.parametrize("policy", ["active", "PASSIVE"])
def test_an_operators_policy_is_kept(policy):
    assert _policy_when_torch_loads("hmoe.workers.engine.worker", OMP_WAIT_POLICY=policy) == policy
