"""The worker processes (torch): engine, model, experts, weights.

OpenMP threads sleep as soon as a parallel region ends (OMP_WAIT_POLICY=passive, unless the environment
says otherwise). A worker runs two OpenMP users: torch's CPU ops on the main thread and the expert
kernels on their own thread, each with its own team of threads. With libgomp's default the idle team
spins for milliseconds after every region, on the cores the other team and the GPU-launching thread
need. Measured on the H200 box (bench/results/decode-h200-wait-policy.json: Qwen3-30B-A3B FP8, 8 layers,
13 kernel threads, batch 1): with spinning teams the kernels read 16 GB/s inside a step; with sleeping
ones, and every kernel region started from the one expert thread (workers/experts/cpu.py), 61 GB/s,
0.96 of the same kernels alone, and a token took 7.8 ms instead of 22.5. The kernels' own phases still spin
inside a region (kernels/moe.py), where waiting is short.

libgomp reads the policy once, when it is loaded (by `import torch` or Numba's first parallel region),
so it is set here: importing any hmoe.workers module comes before torch in every worker entry point.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
