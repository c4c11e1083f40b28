"""make_model: write a random-weight checkpoint in exactly the Hugging Face layout.

config.json, generation_config.json, tokenizer.json (a byte-level BPE built with `tokenizers`, plus
the family's role and think markers), tokenizer_config.json and the family's chat template
(chat_templates.py), and safetensors (sharded with an index past --shard-mb). Deterministic per
seed. Values are non-trivial on purpose: weights scaled 1/sqrt(fan_in) so activations stay O(1),
norms around 1, a non-zero expert-score correction bias, YaRN rope scaling and grouped top-k. FP8
writes E4M3 weights with a float32 weight_scale_inv per 128x128 block, as DeepSeek ships them.
Past 400 lines because a quarter of it is data (the presets' shapes, the tokenizer's corpus).
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from hmoe.runtime.errors import HmoeError
from hmoe.workers.weights.chat_templates import family_template
from hmoe.workers.weights.checkpoint import FP8_DTYPE
from hmoe.workers.weights.model_config import parse_model_config

E4M3_MAX = 448.0
BOS, EOS = "<|begin|>", "<|end|>"

_YARN = {
    "rope_type": "yarn",
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 1024,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

PRESETS: dict[str, dict[str, dict]] = {
    "deepseek_v3": {
        "tiny": dict(
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            kv_lora_rank=64,
            q_lora_rank=96,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            vocab_size=0,
        ),
        "small": dict(
            hidden_size=1024,
            intermediate_size=2816,
            moe_intermediate_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            kv_lora_rank=256,
            q_lora_rank=384,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            n_routed_experts=64,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            first_k_dense_replace=1,
            vocab_size=8192,
        ),
        # The real DeepSeek-V3 shape; pick --layers to fit the machine (each MoE layer is ~11 GB in FP8).
        "v3": dict(
            hidden_size=7168,
            intermediate_size=18432,
            moe_intermediate_size=2048,
            num_hidden_layers=61,
            num_attention_heads=128,
            kv_lora_rank=512,
            q_lora_rank=1536,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=256,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            first_k_dense_replace=3,
            vocab_size=129280,
        ),
    },
    "qwen3_moe": {
        "tiny": dict(
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            num_experts=16,
            num_experts_per_tok=4,
            mlp_only_layers=[0],
            vocab_size=0,
        ),
        "small": dict(
            hidden_size=1024,
            intermediate_size=2816,
            moe_intermediate_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=64,
            num_experts_per_tok=8,
            mlp_only_layers=[],
            vocab_size=8192,
        ),
        # Qwen3-30B-A3B's shape (~30 GB in FP8 with all 48 layers).
        "30b-a3b": dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            mlp_only_layers=[],
            vocab_size=151936,
            max_position_embeddings=40960,
        ),
    },
}

_CORPUS = """\
hmoe serves mixture of experts language models on one machine. The routed experts stay in the
memory of the processor and run on vector kernels; attention, norms and the router run on the
graphics card. A prompt is prefilled in one process and decoded in another, so a long prompt never
stalls the tokens that are already streaming. The weights live once in shared memory and every
worker maps the same pages. Hello world! The quick brown fox jumps over the lazy dog, 0123456789.
Numbers, punctuation: commas, periods; colons? and (brackets) [all] {kinds} <tags> "quotes" 'too'.
"""


def build_tokenizer(vocab_size: int, added: tuple[str, ...] = (), pad_to: int = 0):
    """A deterministic byte-level BPE: every byte is a token, so any text round-trips; `added` markers
    (chat roles, think tags) become single tokens after the trained ones."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    # Every id up to pad_to gets a plain-text token, so whatever a random model samples decodes to visible text.
    tok.add_tokens([AddedToken(f"<|t{i}|>", normalized=False) for i in range(tok.get_vocab_size(), pad_to)])
    return tok


def hf_config(arch: str, preset: str, dtype: str, vocab_size: int, num_layers: int | None) -> dict:
    shape = dict(PRESETS[arch][preset])
    shape["vocab_size"] = vocab_size
    if num_layers is not None:
        shape["num_hidden_layers"] = num_layers
    common = dict(
        bos_token_id=0,
        eos_token_id=1,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        hidden_act="silu",
        max_position_embeddings=4096,
        attention_bias=False,
        torch_dtype="bfloat16" if dtype != "fp32" else "float32",
        use_cache=True,
    )
    if arch == "deepseek_v3":
        cfg = dict(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            rope_theta=10000.0,
            rope_scaling=dict(_YARN),
            rope_interleave=True,
            num_key_value_heads=shape["num_attention_heads"],
            **(common | shape),  # a preset's own values (its context) win
        )
    else:
        cfg = dict(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            norm_topk_prob=True,
            decoder_sparse_step=1,
            rope_theta=1000000.0,
            rope_scaling=None,
            sliding_window=None,
            use_sliding_window=False,
            **(common | shape),  # a preset's own values (its context) win
        )
    if dtype == "fp8":
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    return cfg


def quantize_fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> E4M3 [out, in] and float32 scale_inv [ceil(out/128), ceil(in/128)] (w ~= q * s)."""
    out_dim, in_dim = w.shape
    rows, cols = -(-out_dim // 128), -(-in_dim // 128)
    padded = w.to(torch.float32)
    if (rows * 128, cols * 128) != (out_dim, in_dim):
        padded = torch.zeros(rows * 128, cols * 128, dtype=torch.float32)
        padded[:out_dim, :in_dim] = w
    blocks = padded.view(rows, 128, cols, 128)
    # amax one dim at a time: a two-dim reduction over this strided view is ~50x slower on the CPU.
    scale_inv = (blocks.abs().amax(dim=3).amax(dim=1) / E4M3_MAX).clamp(min=1e-12)  # [rows, cols]
    q = (blocks / scale_inv[:, None, :, None]).view(rows * 128, cols * 128)[:out_dim, :in_dim]
    return q.to(FP8_DTYPE), scale_inv


def _tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint with its shape, in Hugging Face names."""
    c = parse_model_config(cfg)
    h, shapes = c.hidden_size, {}
    shapes["model.embed_tokens.weight"] = (c.vocab_size, h)
    shapes["lm_head.weight"] = (c.vocab_size, h)
    shapes["model.norm.weight"] = (h,)
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        a = f"{p}.self_attn"
        if c.is_mla:
            qk = c.qk_nope_head_dim + c.qk_rope_head_dim
            if c.q_lora_rank:
                shapes[f"{a}.q_a_proj.weight"] = (c.q_lora_rank, h)
                shapes[f"{a}.q_a_layernorm.weight"] = (c.q_lora_rank,)
                shapes[f"{a}.q_b_proj.weight"] = (c.num_heads * qk, c.q_lora_rank)
            else:
                shapes[f"{a}.q_proj.weight"] = (c.num_heads * qk, h)
            shapes[f"{a}.kv_a_proj_with_mqa.weight"] = (c.kv_lora_rank + c.qk_rope_head_dim, h)
            shapes[f"{a}.kv_a_layernorm.weight"] = (c.kv_lora_rank,)
            shapes[f"{a}.kv_b_proj.weight"] = (c.num_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
            shapes[f"{a}.o_proj.weight"] = (h, c.num_heads * c.v_head_dim)
        else:
            d = c.head_dim
            shapes[f"{a}.q_proj.weight"] = (c.num_heads * d, h)
            shapes[f"{a}.k_proj.weight"] = (c.num_kv_heads * d, h)
            shapes[f"{a}.v_proj.weight"] = (c.num_kv_heads * d, h)
            shapes[f"{a}.o_proj.weight"] = (h, c.num_heads * d)
            shapes[f"{a}.q_norm.weight"] = (d,)
            shapes[f"{a}.k_norm.weight"] = (d,)
        if i in c.moe_layer_ids:
            m, inter = f"{p}.mlp", c.moe_intermediate_size
            shapes[f"{m}.gate.weight"] = (c.num_experts, h)
            if c.use_correction_bias:
                shapes[f"{m}.gate.e_score_correction_bias"] = (c.num_experts,)
            for e in range(c.num_experts):
                for proj, shape in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
                    shapes[f"{m}.experts.{e}.{proj}_proj.weight"] = shape
            if c.n_shared_experts:
                si = inter * c.n_shared_experts
                for proj, shape in (("gate", (si, h)), ("up", (si, h)), ("down", (h, si))):
                    shapes[f"{m}.shared_experts.{proj}_proj.weight"] = shape
        else:
            inter = c.intermediate_size
            for proj, shape in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
                shapes[f"{p}.mlp.{proj}_proj.weight"] = shape
    return shapes


def _stored_tensors(name: str, shape: tuple[int, ...], dtype: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A checkpoint tensor drawn from `gen`, as stored ({name: weight} plus its scale_inv in FP8)."""
    w = torch.randn(shape, generator=gen)
    if name.endswith("e_score_correction_bias"):
        return {name: w.mul_(0.05)}
    if len(shape) == 1:  # norm weights
        w.mul_(0.1).add_(1.0)
    elif not name.endswith("embed_tokens.weight"):
        w.div_(math.sqrt(shape[1]))
    if dtype == "fp8" and _is_fp8_target(name, shape):
        q, scale_inv = quantize_fp8_blocks(w)
        return {name: q, name + "_scale_inv": scale_inv}
    return {name: w.to(torch.float32 if dtype == "fp32" else torch.bfloat16)}


ONE_STREAM_MAX_VALUES = 1 << 28  # models up to this many values (the tiny and small presets) draw from one stream


def _checkpoint_tensors(shapes: dict[str, tuple[int, ...]], dtype: str, seed: int):
    """_stored_tensors of every tensor, in order.

    A model of up to ONE_STREAM_MAX_VALUES values draws every tensor in turn from one generator seeded
    with `seed`: the checkpoints tests and demos have always had. A larger one would take minutes on one
    core (torch.randn is single-threaded: 94 M values/s on a dev core, 60% of making a model), so each
    tensor gets its own generator, seeded by (seed, its index), and tensors are drawn and quantized
    ahead on one thread per core while the caller writes shards: the same checkpoint on any number of
    threads. At most two per thread wait, so memory stays bounded; each thread's torch ops run
    single-threaded (torch's thread count is the process's: restored after)."""
    if sum(math.prod(shape) for shape in shapes.values()) <= ONE_STREAM_MAX_VALUES:
        gen = torch.Generator().manual_seed(seed)
        for name, shape in shapes.items():
            yield _stored_tensors(name, shape, dtype, gen)
        return
    workers = max(1, min(16, len(os.sched_getaffinity(0))))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="make-model") as pool:
            ahead: deque = deque()
            for index, (name, shape) in enumerate(shapes.items()):
                state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
                gen = torch.Generator().manual_seed(int(state))
                ahead.append(pool.submit(_stored_tensors, name, shape, dtype, gen))
                if len(ahead) >= 2 * workers:
                    yield ahead.popleft().result()
            for tensors in ahead:
                yield tensors.result()
    finally:
        torch.set_num_threads(threads)


def _is_fp8_target(name: str, shape: tuple[int, ...]) -> bool:
    """DeepSeek quantizes every 2-D projection inside the layers; not embeddings, lm_head or router."""
    return len(shape) == 2 and name.startswith("model.layers.") and not name.endswith("mlp.gate.weight")


def make_model(
    out: str | Path,
    arch: str,
    preset: str = "tiny",
    dtype: str = "bf16",
    seed: int = 0,
    num_layers: int | None = None,
    shard_mb: int = 4096,
    progress=None,
    force: bool = False,
) -> Path:
    """Write a random checkpoint to `out` (new or empty; with force, its model files are replaced); its path."""
    if arch not in PRESETS:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(PRESETS)})")
    if preset not in PRESETS[arch]:
        raise ValueError(f"unknown preset {preset!r} for {arch} (known: {', '.join(PRESETS[arch])})")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise HmoeError("output_not_empty", f"{out} is not empty: use a new folder, or --force to replace its model")
    out.mkdir(parents=True, exist_ok=True)
    for stale in {*out.glob("*.safetensors*"), *out.glob("*.json"), *out.glob("*.jinja")}:
        stale.unlink()  # --force: no shard, index or template of the old model may survive beside the new one
    template, markers, template_file = family_template(arch)
    tokenizer = build_tokenizer(1024, markers, pad_to=PRESETS[arch][preset]["vocab_size"])  # tiny: its own vocab
    cfg = hf_config(arch, preset, dtype, tokenizer.get_vocab_size(), num_layers)
    shapes = _tensor_shapes(cfg)

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes, limit, total = 0, shard_mb << 20, 0
    weight_map: dict[str, str] = {}
    for tensors in _checkpoint_tensors(shapes, dtype, seed):
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if shard_bytes and shard_bytes + size > limit:
            _write_shard(out, shards, len(shards), weight_map)
            shards.append({})
            shard_bytes = 0
        shards[-1].update(tensors)
        shard_bytes += size
        total += size
        if progress is not None:
            progress(total)
    _finish(out, shards, weight_map, total)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen_cfg = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS}
    tok_cfg |= {"model_max_length": cfg["max_position_embeddings"], "clean_up_tokenization_spaces": False}
    if template_file == "tokenizer_config.json":
        tok_cfg["chat_template"] = template
    else:
        (out / template_file).write_text(template)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    for path in out.glob("*.safetensors"):  # safetensors writes 0600: give the weights config.json's mode
        path.chmod((out / "config.json").stat().st_mode & 0o777)
    return out


def _shard_name(index: int, count: int | None) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors" if count else f"model-{index:05d}.safetensors.part"


def _write_shard(out: Path, shards: list, index: int, weight_map: dict) -> None:
    """Write shard `index` (1-based) under a temporary name; _finish renames once the count is known."""
    tensors = shards[index - 1]
    name = _shard_name(index, None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in tensors})
    shards[index - 1] = {}


def _finish(out: Path, shards: list, weight_map: dict, total: int) -> None:
    count = len(shards)
    if count == 1:
        save_file(
            {k: v.contiguous() for k, v in shards[0].items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
        )
        return
    _write_shard(out, shards, count, weight_map)
    renames = {_shard_name(i, None): _shard_name(i, count) for i in range(1, count + 1)}
    for old, new in renames.items():
        (out / old).rename(out / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renames[v] for k, v in sorted(weight_map.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
