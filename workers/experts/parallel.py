"""Expert parallelism for streamed prefill (SmallEP): N ranks, one per GPU, each streaming its share of
every MoE layer's experts over its own PCIe link, so each link carries 1/N of the bytes.

Every rank runs the same pass (attention replicated: its cost is small beside the experts' bytes at
the lengths that stream); a rank computes, for every token, only the (token, expert) pairs of its
experts, routed as rank 0 routed them (its ids and weights broadcast, [T, K] each), and the ranks'
partial outputs are summed with one all-reduce per layer (torch.distributed: NCCL on GPUs, gloo on
CPUs). With attention replicated every rank already holds every token, so that is the whole
exchange: no dispatch, one collective of [T, H] float32 per layer.

Rank 0 takes the prompts; the others follow each pass's inputs (workers/engine/ranks.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hmoe.runtime.errors import HmoeError


@contextmanager
def rank_lost_on_failure(what: str) -> Iterator[None]:
    """A collective that fails (a rank's connection closed, or the group's timeout passed) as HmoeError
    rank_lost, "what: why"."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        raise HmoeError("rank_lost", f"{what}: {exc}") from exc


@dataclass(frozen=True)
class ExpertShare:
    """This rank's experts [first, end) of every MoE layer; the partial outputs are summed over `group`
    (None: a single process computing one share, as the tests do)."""

    first: int
    end: int
    group: dist.ProcessGroup | None = None

    def agree(self, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Every rank takes rank 0's routing of the layer's tokens, in place: each rank routes its own copy of
        the hidden states, and a last-bit difference between them would count a (token, expert) pair
        twice or not at all."""
        if self.group is not None:
            with rank_lost_on_failure("expert-parallel broadcast failed"):
                dist.broadcast(ids, dist.get_global_rank(self.group, 0), group=self.group)
                dist.broadcast(weights, dist.get_global_rank(self.group, 0), group=self.group)

    def reduce(self, out: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' partial outputs of a layer, in place; HmoeError rank_lost when a rank is gone (its
        connection closed, or the group's timeout passed)."""
        if self.group is not None:
            with rank_lost_on_failure("expert-parallel all-reduce failed"):
                dist.all_reduce(out, group=self.group)
        return out


def expert_shares(num_experts: int, ranks: int) -> list[tuple[int, int]]:
    """Contiguous [first, end) per rank, balanced by bytes: a layer's experts are all one size, so the
    counts differ by at most one."""
    assert 1 <= ranks <= num_experts, (ranks, num_experts)
    bounds = [num_experts * r // ranks for r in range(ranks + 1)]
    return list(zip(bounds, bounds[1:]))
