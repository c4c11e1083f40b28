"""CausalLM: the decoder stack shared by every family, and load_model() that builds it from weights.

Shapes: N tokens in the batch, B sequences, H hidden, V vocab.

    h = x + attn(norm(x));  out = h + mlp(norm(h))      (mlp: dense MLP or MoE)

The family decides attention only (workers/models/<family>.py). Where routed experts run is the
ExpertBackend handed in (torch reference, CPU kernels over a weight pack, ...).
A weight source is a Checkpoint or a PackSource: `.config` and `.weight(name, shape, dtype)`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Generator

import torch
import torch.nn.functional as F

from hmoe.workers.experts.backend import ExpertBackend, TorchExperts
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.model.layers import MLP, MoE, RMSNorm, Rotary, Router
from hmoe.workers.weights.model_config import ModelConfig

log = logging.getLogger(__name__)


class DecoderLayer:
    def __init__(self, attn, mlp, input_norm: RMSNorm, post_attention_norm: RMSNorm):
        self.attn, self.mlp = attn, mlp
        self.input_norm, self.post_attention_norm = input_norm, post_attention_norm

    def start(self, x, batch, kv, rotary, cos, sin, experts: ExpertBackend):
        """Attention and residual on the device, then start the MLP (a MoE's routed experts on `experts`)."""
        h = x + self.attn(self.input_norm(x), batch, kv, rotary, cos, sin)
        return h, self.mlp.submit(self.post_attention_norm(h), experts)

    def finish(self, h, pending) -> torch.Tensor:
        return h + self.mlp.finish(pending)


class CausalLM:
    """The stack. Where routed experts run is each forward's `experts` (default: the backend it was loaded with)."""

    def __init__(
        self, config: ModelConfig, embed, layers, norm, lm_head, rotary: Rotary, device, dtype, experts: ExpertBackend
    ):
        self.config, self.embed, self.layers, self.norm, self.lm_head = config, embed, layers, norm, lm_head
        self.rotary, self.device, self.dtype, self.experts = rotary, device, dtype, experts

    def forward(
        self, batch: ForwardBatch, kv: KVPool, all_logits: bool = False, experts: ExpertBackend | None = None
    ) -> torch.Tensor:
        """Run the batch, write its KV, return float32 logits [B, V] of each sequence's last token
        (or [N, V] of every token with all_logits)."""
        return self.forward_overlapped([batch], kv, all_logits, experts)[0]

    @torch.inference_mode()
    def forward_overlapped(
        self,
        batches: list[ForwardBatch],
        kv: KVPool,
        all_logits: bool = False,
        experts: ExpertBackend | None = None,
    ) -> list[torch.Tensor]:
        """Micro-batches through the stack, software-pipelined: while one micro-batch's routed experts
        run (on the CPU kernels), the device computes the other's attention."""
        steps = self.forward_layer_major(batches, kv, all_logits, experts)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def forward_layer_major(
        self,
        batches: list[ForwardBatch],
        kv: KVPool,
        all_logits: bool = False,
        experts: ExpertBackend | None = None,
    ) -> Generator[int, None, list[torch.Tensor]]:
        """forward_overlapped as a generator: yields each layer's id once every batch has started it,
        returns the logits. Layer-major: every batch passes layer L before any passes L+1, so a
        prompt's chunks given in order as the batches keep causality (chunk k attends to the KV that
        chunks < k wrote in the same layer) and the experts of a layer are needed once per pass.

        Per layer and batch i: finish i's previous layer -> attention -> start i's MLP.
        """
        experts = self.experts if experts is None else experts
        with torch.inference_mode():
            xs = [F.embedding(b.input_ids, self.embed) for b in batches]  # [N_i, H]
            rope = [self.rotary.cos_sin(b.positions, self.dtype) for b in batches]
        pending: list = [None] * len(batches)
        for layer_id, layer in enumerate(self.layers):
            with torch.inference_mode():
                for i, batch in enumerate(batches):
                    if layer_id:
                        xs[i] = self.layers[layer_id - 1].finish(*pending[i])
                    pending[i] = layer.start(xs[i], batch, kv, self.rotary, *rope[i], experts)
            yield layer_id
        logits = []
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                x = self.layers[-1].finish(*pending[i])
                if not all_logits:
                    x = x[batch.last_rows]  # [B, H]
                logits.append(F.linear(self.norm(x), self.lm_head).to(torch.float32))
        return logits


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """ "auto" is bfloat16 on every device. On the CPU too: on the 2-core machine (AVX-512 without
    AVX512-BF16, torch 2.13) Qwen3-30B-A3B FP8 (2 layers, experts on the kernels) decoded 21.3-21.9 tok/s in
    bf16 against 16.7-17.1 in float32, prefilled 2.7K tokens in 3.5 s against 5.0, loaded in 3.2-3.5 s
    against 5.1-8.5, and the dense weights and the KV take half the memory. "fp32" stays for exact
    comparisons."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[dtype]


def load_torch_experts(source, device: torch.device, dtype: torch.dtype) -> TorchExperts:
    """Stack every MoE layer's routed experts into gate/up [E, I, H] and down [E, H, I] on device."""
    c = source.config
    layers = {}
    for layer_id in c.moe_layer_ids:
        stacks = []
        for proj, shape in (
            ("gate", (c.moe_intermediate_size, c.hidden_size)),
            ("up", (c.moe_intermediate_size, c.hidden_size)),
            ("down", (c.hidden_size, c.moe_intermediate_size)),
        ):
            stacks.append(
                torch.stack(
                    [
                        source.weight(f"model.layers.{layer_id}.mlp.experts.{e}.{proj}_proj.weight", shape, dtype)
                        for e in range(c.num_experts)
                    ]
                ).to(device)
            )
        layers[layer_id] = tuple(stacks)
    return TorchExperts(layers)


def load_model(
    source,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    experts: ExpertBackend | None = None,
    absorb: str = "auto",
) -> CausalLM:
    """Build the model from a weight source; routed experts run on `experts` (default: torch) unless a
    forward is handed another backend."""
    c: ModelConfig = source.config
    device = torch.device(device)
    dtype = resolve_dtype(dtype)
    family = importlib.import_module(f"hmoe.workers.model.{c.family}")
    if experts is None:
        experts = load_torch_experts(source, device, dtype)

    def loader(prefix: str):
        return lambda name, shape, as_dtype=dtype: source.weight(f"{prefix}.{name}", shape, as_dtype).to(device)

    layers = []
    for i in range(c.num_layers):
        load = loader(f"model.layers.{i}")
        attn = family.build_attention(c, i, loader(f"model.layers.{i}.self_attn"), absorb)
        if i in c.moe_layer_ids:
            mlp = _moe(c, i, load)
        else:
            mlp = _mlp(load, "mlp", c.intermediate_size, c.hidden_size)
        norms = (
            RMSNorm(load(n, (c.hidden_size,)), c.rms_norm_eps)
            for n in ("input_layernorm.weight", "post_attention_layernorm.weight")
        )
        layers.append(DecoderLayer(attn, mlp, *norms))
        log.debug("loaded layer %d/%d", i + 1, c.num_layers)
    top = loader("model")
    embed = top("embed_tokens.weight", (c.vocab_size, c.hidden_size))
    lm_head = (
        embed
        if c.tie_word_embeddings
        else source.weight("lm_head.weight", (c.vocab_size, c.hidden_size), dtype).to(device)
    )
    norm = RMSNorm(top("norm.weight", (c.hidden_size,)), c.rms_norm_eps)
    rotary_dim = c.qk_rope_head_dim if c.is_mla else c.head_dim
    return CausalLM(c, embed, layers, norm, lm_head, Rotary(c.rope, rotary_dim, device), device, dtype, experts)


def _mlp(load, prefix: str, inter: int, hidden: int) -> MLP:
    return MLP(
        load(f"{prefix}.gate_proj.weight", (inter, hidden)),
        load(f"{prefix}.up_proj.weight", (inter, hidden)),
        load(f"{prefix}.down_proj.weight", (hidden, inter)),
    )


def _moe(c: ModelConfig, layer_id: int, load) -> MoE:
    gate = load("mlp.gate.weight", (c.num_experts, c.hidden_size))
    # The correction bias stays float32: it separates near-tied sigmoid scores.
    bias = load("mlp.gate.e_score_correction_bias", (c.num_experts,), torch.float32) if c.use_correction_bias else None
    shared = None
    if c.n_shared_experts:
        shared = _mlp(load, "mlp.shared_experts", c.moe_intermediate_size * c.n_shared_experts, c.hidden_size)
    return MoE(layer_id, Router(c, gate, bias), shared)
