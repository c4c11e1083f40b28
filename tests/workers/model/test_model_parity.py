"""hmoe's models against Hugging Face transformers on random checkpoints (the oracle).

transformers builds each config (no download), re-initializes it with O(1) activations and a
random expert-score correction bias, and save_pretrained()s it; hmoe loads the same folder.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hmoe.runtime.sampling_params import SamplingParams  # noqa: E402
from hmoe.workers.model.batch import ForwardBatch  # noqa: E402
from hmoe.workers.model.causal_lm import load_model  # noqa: E402
from hmoe.workers.model.deepseek_v3 import absorbed_is_cheaper  # noqa: E402
from hmoe.workers.model.generate import generate  # noqa: E402
from hmoe.workers.model.kv_cache import KVPool  # noqa: E402
from hmoe.workers.weights.checkpoint import Checkpoint  # noqa: E402

YARN = {
    "rope_type": "yarn",
    "factor": 8.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
}
DS_COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=256,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)
CONFIGS = {
    # V2-Lite style: no q_lora_rank, YaRN with mscale != mscale_all_dim, grouped top-k, unnormalized
    # top-k weights, two shared experts, first layer dense.
    "deepseek_v3-nolora-yarn-groups": (
        "DeepseekV3",
        dict(
            DS_COMMON,
            q_lora_rank=None,
            rope_parameters=dict(YARN, rope_theta=10000.0),
            rope_interleave=True,
            n_group=4,
            topk_group=2,
            norm_topk_prob=False,
            routed_scaling_factor=2.5,
            n_shared_experts=2,
            first_k_dense_replace=1,
        ),
    ),
    # V3 style: q_lora_rank, plain rope laid out in halves, normalized top-k, one group, no dense layer.
    "deepseek_v3-lora-halfrope": (
        "DeepseekV3",
        dict(
            DS_COMMON,
            q_lora_rank=24,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
            rope_interleave=False,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            n_shared_experts=1,
            first_k_dense_replace=0,
        ),
    ),
    # DeepSeek-V2 (V2-Lite style): softmax scores, group-limited greedy top-k, YaRN mscale 0.707.
    "deepseek_v2-softmax-groups": (
        "DeepseekV2",
        dict(
            DS_COMMON,
            q_lora_rank=None,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            norm_topk_prob=False,
            routed_scaling_factor=1.5,
            n_shared_experts=2,
            first_k_dense_replace=1,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
                "rope_theta": 10000.0,
            },
        ),
    ),
    # GQA 8/2 with head_dim != hidden/heads, every second layer sparse, layer 1 forced dense, YaRN.
    "qwen3_moe-sparse-step-yarn": (
        "Qwen3Moe",
        dict(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=2,
            mlp_only_layers=[1],
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 10000.0,
            },
            eos_token_id=None,
            bos_token_id=None,
        ),
    ),
    "qwen3_moe-normtopk-bias": (
        "Qwen3Moe",
        dict(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            attention_bias=True,
            max_position_embeddings=256,
            eos_token_id=None,
            bos_token_id=None,
        ),
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_pair(request, tmp_path_factory):
    family, kwargs = CONFIGS[request.param]
    config = getattr(transformers, f"{family}Config")(**kwargs)
    torch.manual_seed(sum(map(ord, request.param)))
    hf = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, Checkpoint.open(path), request.param


def _pool(model) -> KVPool:
    return KVPool(model.config, num_blocks=64, block_size=4, dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("prompt_len", [1, 5, 23])
def test_logits_match_transformers(hf_pair, prompt_len):
    """fp32 logits of every prompt position; MLA in both its plain and its absorbed form."""
    hf, checkpoint, name = hf_pair
    ids = torch.randint(
        0, checkpoint.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(prompt_len)
    ).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    for absorb in ("never", "always") if checkpoint.config.is_mla else ("never",):
        model = load_model(checkpoint, "cpu", "fp32", absorb=absorb)
        kv = _pool(model)
        kv.reserve("s", prompt_len)
        ours = model.forward(ForwardBatch.build(kv, [("s", ids, 0)]), kv, all_logits=True)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max(), absorb


def test_chunked_prefill_and_batch_match_whole_prompt(hf_pair):
    """Prompt in two chunks, next to another sequence in the same batch: same logits as alone."""
    _, checkpoint, _ = hf_pair
    model = load_model(checkpoint, "cpu", "fp32")
    ids = list(range(3, 20))
    kv = _pool(model)
    kv.reserve("whole", len(ids))
    whole = model.forward(ForwardBatch.build(kv, [("whole", ids, 0)]), kv, all_logits=True)
    kv.reserve("chunked", len(ids))
    kv.reserve("other", 6)
    first = model.forward(ForwardBatch.build(kv, [("chunked", ids[:9], 0), ("other", ids[:6], 0)]), kv, all_logits=True)
    second = model.forward(ForwardBatch.build(kv, [("other", [1], 6), ("chunked", ids[9:], 9)]), kv, all_logits=True)
    chunked = torch.cat([first[:9], second[1:]])
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5 * whole.abs().max().item())


def test_one_token_sequences_attend_together_as_alone(hf_pair):
    """Decode steps of several sequences (contexts 1..40, one padded group) equal each one alone."""
    _, checkpoint, _ = hf_pair
    for absorb in ("never", "always") if checkpoint.config.is_mla else ("auto",):
        model = load_model(checkpoint, "cpu", "fp32", absorb=absorb)
        kv = KVPool(model.config, num_blocks=96, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
        prompts = {f"s{n}": list(range(2, 2 + n)) for n in (1, 7, 40)}
        for sid, prompt in prompts.items():
            kv.reserve(sid, len(prompt) + 1)
            model.forward(ForwardBatch.build(kv, [(sid, prompt, 0)]), kv)
        items = [(sid, [9], len(prompt)) for sid, prompt in prompts.items()]
        batch = ForwardBatch.build(kv, items)
        assert batch.decode is not None and not batch.seqs
        together = model.forward(batch, kv)
        alone = torch.cat([model.forward(ForwardBatch.build(kv, [item]), kv) for item in items])
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-5 * alone.abs().max().item())


def test_greedy_generation_matches_transformers_generate(hf_pair):
    hf, checkpoint, _ = hf_pair
    model = load_model(checkpoint, "cpu", "fp32")
    prompt = [5, 17, 42, 8, 3, 60, 11]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False)[
            0, len(prompt) :
        ]
    result = generate(model, _pool(model), prompt, SamplingParams(max_tokens=40))
    assert list(result.token_ids) == ref.tolist()
    assert result.finish_reason == "length"
    assert len(set(result.token_ids)) > 1  # a real continuation, not one repeated token


@pytest.mark.gpu
def test_cuda_matches_transformers(hf_pair):
    """The same model on a GPU: fp32 logits match transformers, greedy tokens match the CPU run."""
    hf, checkpoint, _ = hf_pair
    ids = list(range(3, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    model = load_model(checkpoint, "cuda", "fp32")
    kv = KVPool(model.config, num_blocks=64, block_size=4, dtype=torch.float32, device=torch.device("cuda"))
    kv.reserve("s", len(ids))
    ours = model.forward(ForwardBatch.build(kv, [("s", ids, 0)]), kv, all_logits=True).cpu()
    assert (ours - ref).abs().max() <= 1e-3 * ref.abs().max()
    kv.free("s")
    cpu_model = load_model(checkpoint, "cpu", "fp32")
    params = SamplingParams(max_tokens=32)
    assert (
        generate(model, kv, ids[:7], params).token_ids
        == generate(cpu_model, _pool(cpu_model), ids[:7], params).token_ids
    )


def test_mla_attends_in_the_absorbed_form_only_where_it_costs_fewer_flops():
    """DeepSeek-V3's widths cross at 314 queries, whatever the context: a long prompt's 2K chunks attend
    in the plain form (which SDPA's flash kernel takes), decode and short chunks in the absorbed one."""
    v3 = SimpleNamespace(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
    assert absorbed_is_cheaper(v3, 1) and absorbed_is_cheaper(v3, 314)
    assert not absorbed_is_cheaper(v3, 315) and not absorbed_is_cheaper(v3, 2048)
