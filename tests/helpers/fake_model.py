"""A fake CausalLM for in-process engine tests: no weights, deterministic tokens, real KV traffic.

FakeModel has the surface the engines use (`config`, `forward`, `forward_overlapped`, and the
per-layer generator `forward_layer_major`). A forward writes each new token's KV into the pool at the
batch's write slots, layer by layer (token id and position, in every layer and entry), then reads
each sequence's whole context back *from the pool* and returns logits whose argmax is
`next_token(context)`. So greedy output equals `continuation(prompt, n)` only if chunking, positions,
KV slots and the KV hand-off all carried every prompt token to the right place; a torn or misplaced
KV cache raises KVCorrupted instead of producing plausible tokens.

The message builders keep the tests' knowledge of the wire shapes (protocol.Prefill / Adopt /
Tokens) in this one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hmoe.runtime import protocol
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.weights.model_config import ModelConfig, RopeConfig

VOCAB = 64
LAYERS = 2
HEAD_DIM = 16  # k and v are 16 float32 wide: 2 layers * 32 * 4 = 256 bytes per token, 16 tokens per 4 KiB page


class KVCorrupted(AssertionError):
    """The KV a forward read back is not the tokens and positions that were written."""


def tiny_config(eos_token_ids: tuple[int, ...] = ()) -> ModelConfig:
    """A real ModelConfig (KVPool sizes its entries from it) for a GQA model with one KV head."""
    return ModelConfig(
        family="qwen3_moe",
        architecture="FakeForCausalLM",
        vocab_size=VOCAB,
        hidden_size=16,
        num_layers=LAYERS,
        num_heads=1,
        num_kv_heads=1,
        head_dim=HEAD_DIM,
        intermediate_size=16,
        moe_intermediate_size=16,
        num_experts=1,
        num_experts_per_tok=1,
        moe_layer_ids=(),
        rope=RopeConfig(theta=10000.0),
        rms_norm_eps=1e-6,
        max_position_embeddings=1 << 20,
        eos_token_ids=eos_token_ids,
    )


def next_token(context: Sequence[int]) -> int:
    """The fake model's greedy choice after `context`: depends on every token and its position."""
    return (sum((i + 1) * t for i, t in enumerate(context)) * 7 + len(context)) % VOCAB


def continuation(prompt: Sequence[int], n: int) -> list[int]:
    """The first n greedy tokens after prompt (no stop rule applied)."""
    context = list(prompt)
    for _ in range(n):
        context.append(next_token(context))
    return context[len(prompt) :]


def make_kv(config: ModelConfig, num_blocks: int, block_size: int, device: str = "cpu") -> KVPool:
    return KVPool(config, num_blocks, block_size, torch.float32, torch.device(device))


class FakeModel:
    def __init__(self, eos_token_ids: tuple[int, ...] = ()):
        self.config = tiny_config(eos_token_ids)
        self.calls: list[list[int]] = []  # per forward (or prefill pass): sequences in each batch
        self.tokens: list[list[int]] = []  # per forward (or prefill pass): new tokens in each batch
        self.layers: list = []  # no MoE layers and no expert backend: DecodeEngine takes its ForwardBatch path
        self.experts = None

    def forward(self, batch: ForwardBatch, kv: KVPool, all_logits: bool = False, experts=None) -> torch.Tensor:
        return self.forward_overlapped([batch], kv, all_logits, experts)[0]

    def forward_overlapped(self, batches: list[ForwardBatch], kv: KVPool, all_logits: bool = False, experts=None):
        steps = self.forward_layer_major(batches, kv, all_logits, experts)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def forward_layer_major(self, batches: list[ForwardBatch], kv: KVPool, all_logits: bool = False, experts=None):
        """Yields each layer's id once every batch has written that layer's KV; returns [B, V] logits per batch."""
        assert not all_logits, "the engines sample each sequence's last token only"
        self.calls.append([len(b.last_rows) for b in batches])
        self.tokens.append([len(b.input_ids) for b in batches])
        for layer in range(LAYERS):  # [L, S, W]: column 0 the token, column 1 the position; v tags the layer
            for batch in batches:
                assert len(batch.input_ids) == len(batch.positions) == len(batch.write_slots)
                kv.data["k"][layer, batch.write_slots, 0] = batch.input_ids.float()
                kv.data["k"][layer, batch.write_slots, 1] = batch.positions.float()
                kv.data["v"][layer, batch.write_slots, 0] = batch.input_ids.float() + 1000 * (layer + 1)
            yield layer
        return [self._logits(batch, kv) for batch in batches]

    def _logits(self, batch: ForwardBatch, kv: KVPool) -> torch.Tensor:
        contexts = _context_slots(batch)
        logits = torch.full((len(batch.last_rows), VOCAB), -1.0)
        for b, row in enumerate(batch.last_rows.tolist()):
            logits[b, next_token(read_context(kv, contexts[row]))] = 1.0
        return logits


def _context_slots(batch: ForwardBatch) -> dict[int, torch.Tensor]:
    """{row of a sequence's last token: its context's KV slots in position order}."""
    slots = {s.q_start + s.q_len - 1: s.ctx_slots for s in batch.seqs}
    if batch.decode is not None:
        for row, padded, mask in zip(batch.decode.rows.tolist(), batch.decode.slots, batch.decode.mask):
            slots[row] = padded[mask.reshape(-1)]
    return slots


def read_context(kv: KVPool, slots: torch.Tensor) -> list[int]:
    """The token ids whose KV sits at slots (in position order); KVCorrupted if it is not what a forward wrote."""
    k, v = kv.data["k"][:, slots].cpu(), kv.data["v"][:, slots].cpu()  # [L, n, W]
    tokens = k[0, :, 0]
    positions = torch.arange(len(slots), dtype=torch.float32)
    layer_tags = 1000 * torch.arange(1, LAYERS + 1, dtype=torch.float32)[:, None]
    if not (
        torch.equal(k[:, :, 1], positions.expand(LAYERS, -1))
        and torch.equal(k[:, :, 0], tokens.expand(LAYERS, -1))
        and torch.equal(v[:, :, 0], tokens + layer_tags)
    ):
        raise KVCorrupted(f"KV at slots {slots.tolist()} is not the written context")
    return [int(t) for t in tokens.tolist()]


# -- messages --------------------------------------------------------------------------------------


def sampling(**params) -> SamplingParams:
    """SamplingParams from keyword arguments, lists taken as the tuples it holds."""
    return SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})


def prefill_msg(request_id: str, token_ids: Sequence[int], **params) -> protocol.Prefill:
    return protocol.Prefill(request_id, list(token_ids), sampling(**params))


def adopt_msg(prefilled: protocol.Prefilled, prompt: Sequence[int], **params) -> protocol.Adopt:
    """The Adopt the router sends for a Prefilled (same sampling params as the Prefill)."""
    return protocol.Adopt(
        prefilled.request_id,
        len(prompt),
        prefilled.first_token,
        prefilled.slot,
        prefilled.segment,
        sampling(**params),
        prefilled.generation,
    )


def token_items(msg: protocol.Tokens) -> list[tuple[str, int, str | None]]:
    """(request_id, token, finish_reason or None) per request of one decode step."""
    return [(item.request_id, item.token, item.finish_reason) for item in msg.items]
