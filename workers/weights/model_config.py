"""ModelConfig: a Hugging Face config.json resolved into one frozen, validated description.

Real checkpoints spell things in several generations of keys (`rope_scaling` + `rope_theta` in
DeepSeek's and Qwen's releases, `rope_parameters` from transformers 5); this module is the one
place that reads them, so the models only see resolved fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from hmoe.workers.weights.errors import CheckpointError

ARCHITECTURES = {
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV2ForCausalLM": "deepseek_v3",  # same graph; softmax scoring and greedy top-k are config fields
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
ROPE_TYPES = ("default", "yarn")
QUANT_METHODS = ("fp8",)


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True
    interleave: bool = False  # DeepSeek rotates (x0, x1), (x2, x3) ... pairs


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "deepseek_v3" | "qwen3_moe": one model file each
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # qwen3: attention head dim; deepseek: qk_nope + qk_rope
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_layer_ids: tuple[int, ...]
    rope: RopeConfig
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # Router.
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    use_correction_bias: bool = False  # DeepSeek-V3 noaux_tc: e_score_correction_bias steers the choice
    n_shared_experts: int = 0
    # MLA (DeepSeek).
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Checkpoint quantization.
    fp8_block: tuple[int, int] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def is_mla(self) -> bool:
        return self.family == "deepseek_v3"

    @property
    def attn_softmax_scale(self) -> float:
        """1/sqrt(d) times YaRN's mscale(all_dim)^2 for DeepSeek (its softmax-side correction)."""
        scale = self.head_dim**-0.5
        if self.is_mla and self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _field(cfg: dict, key: str, kind: type | tuple, default: Any = ..., where: str = "config.json") -> Any:
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise CheckpointError("config_field", f"{where}: required field {key!r} is missing")
        return default
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError("config_field", f"{where}: field {key!r} = {value!r} should be {kind}")
    return value


def _rope(cfg: dict, interleave: bool) -> RopeConfig:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            "unsupported_rope",
            f"config.json: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})",
        )
    if rope_type == "default":
        return RopeConfig(theta=float(theta), interleave=interleave)
    where = "config.json rope scaling"
    max_pos = _field(cfg, "max_position_embeddings", int)
    original = params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / original
    return RopeConfig(
        theta=float(theta),
        type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(_field(params, "mscale", float, 0.0, where)),
        mscale_all_dim=float(_field(params, "mscale_all_dim", float, 0.0, where)),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        interleave=interleave,
    )


def _fp8_block(cfg: dict) -> tuple[int, int] | None:
    quant = cfg.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method not in QUANT_METHODS:
        raise CheckpointError(
            "unsupported_quant",
            f"config.json: quantization_config.quant_method {method!r} is not supported "
            f"(supported: {', '.join(QUANT_METHODS)}, or an unquantized bf16/fp16/fp32 checkpoint)",
        )
    fmt = quant.get("fmt", "e4m3")
    block = quant.get("weight_block_size", [128, 128])
    if fmt != "e4m3" or list(block) != [128, 128]:
        raise CheckpointError(
            "unsupported_quant",
            f"config.json: fp8 fmt {fmt!r} with weight_block_size {block} is not supported "
            "(supported: e4m3 with [128, 128] blocks, as DeepSeek ships)",
        )
    return (128, 128)


def _eos(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def parse_model_config(cfg: dict) -> ModelConfig:
    """Resolve a config.json dict; unsupported architectures or fields raise CheckpointError."""
    archs = cfg.get("architectures") or []
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None:
        raise CheckpointError(
            "unsupported_architecture",
            f"config.json: architectures {archs} are not supported (supported: {', '.join(ARCHITECTURES)})",
        )
    hidden_act = cfg.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise CheckpointError("config_field", f"config.json: hidden_act {hidden_act!r} is not supported (silu)")
    num_layers = _field(cfg, "num_hidden_layers", int)
    num_heads = _field(cfg, "num_attention_heads", int)
    common = dict(
        architecture=archs[0],
        vocab_size=_field(cfg, "vocab_size", int),
        hidden_size=_field(cfg, "hidden_size", int),
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=_field(cfg, "intermediate_size", int),
        moe_intermediate_size=_field(cfg, "moe_intermediate_size", int),
        num_experts_per_tok=_field(cfg, "num_experts_per_tok", int),
        rms_norm_eps=_field(cfg, "rms_norm_eps", float, 1e-6),
        max_position_embeddings=_field(cfg, "max_position_embeddings", int, 4096),
        tie_word_embeddings=_field(cfg, "tie_word_embeddings", bool, False),
        attention_bias=_field(cfg, "attention_bias", bool, False),
        norm_topk_prob=_field(cfg, "norm_topk_prob", bool, False),
        fp8_block=_fp8_block(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos(cfg),
    )
    if family == "qwen3_moe":
        num_experts = _field(cfg, "num_experts", int, None) or _field(cfg, "num_local_experts", int)
        step = _field(cfg, "decoder_sparse_step", int, 1)
        mlp_only = set(_field(cfg, "mlp_only_layers", list, []))
        moe_ids = tuple(i for i in range(num_layers) if i not in mlp_only and num_experts > 0 and (i + 1) % step == 0)
        head_dim = _field(cfg, "head_dim", int, common["hidden_size"] // num_heads)
        return ModelConfig(
            family=family,
            num_kv_heads=_field(cfg, "num_key_value_heads", int, num_heads),
            head_dim=head_dim,
            num_experts=num_experts,
            moe_layer_ids=moe_ids,
            rope=_rope(cfg, interleave=False),
            scoring="softmax",
            **common,
        )
    num_experts = _field(cfg, "n_routed_experts", int)
    first_dense = _field(cfg, "first_k_dense_replace", int, 0)
    moe_freq = _field(cfg, "moe_layer_freq", int, 1)
    moe_ids = tuple(i for i in range(first_dense, num_layers) if i % moe_freq == 0)
    scoring = _field(cfg, "scoring_func", str, "sigmoid" if archs[0] == "DeepseekV3ForCausalLM" else "softmax")
    if scoring not in ("sigmoid", "softmax"):
        raise CheckpointError("config_field", f"config.json: scoring_func {scoring!r} is not supported")
    topk_method = _field(cfg, "topk_method", str, "noaux_tc" if scoring == "sigmoid" else "greedy")
    if topk_method not in ("noaux_tc", "group_limited_greedy", "greedy"):
        raise CheckpointError("config_field", f"config.json: topk_method {topk_method!r} is not supported")
    n_group = _field(cfg, "n_group", int, 1) if topk_method != "greedy" else 1
    topk_group = _field(cfg, "topk_group", int, 1) if topk_method != "greedy" else 1
    if num_experts % n_group or not 1 <= topk_group <= n_group:
        raise CheckpointError(
            "config_field",
            f"config.json: n_group={n_group}, topk_group={topk_group} do not divide {num_experts} experts",
        )
    qk_nope = _field(cfg, "qk_nope_head_dim", int)
    qk_rope = _field(cfg, "qk_rope_head_dim", int)
    return ModelConfig(
        family=family,
        num_kv_heads=num_heads,
        head_dim=qk_nope + qk_rope,
        num_experts=num_experts,
        moe_layer_ids=moe_ids,
        rope=_rope(cfg, interleave=_field(cfg, "rope_interleave", bool, True)),
        scoring=scoring,
        routed_scaling_factor=_field(cfg, "routed_scaling_factor", float, 1.0),
        n_group=n_group,
        topk_group=topk_group,
        use_correction_bias=topk_method == "noaux_tc",
        n_shared_experts=_field(cfg, "n_shared_experts", int, 0),
        q_lora_rank=_field(cfg, "q_lora_rank", int, None),
        kv_lora_rank=_field(cfg, "kv_lora_rank", int),
        qk_nope_head_dim=qk_nope,
        qk_rope_head_dim=qk_rope,
        v_head_dim=_field(cfg, "v_head_dim", int),
        **common,
    )
