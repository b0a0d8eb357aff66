"""Tiny random MoE models of every supported family, built from configs (no hub needed).

Used by the tests, the benchmarks and the demo. Dense layers are included where the family
has them (Qwen's ``mlp_only_layers``, DeepSeek-V3's ``first_k_dense_replace``). The DeepSeek-V3
and GPT-OSS configs also carry the fields of the published ones that serving engines read (YaRN
rope scaling; DeepSeek-V3's routing method and MoE layer frequency), so SGLang serves the tiny
DeepSeek-V3 as built (vLLM's CPU build needs its latent attention widened to the 512 + 64 it
supports).
"""

from __future__ import annotations

import torch
import transformers

__all__ = ["FAMILIES", "tiny_config", "tiny_model"]

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss")

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(family: str, *, num_experts: int = 8, **overrides) -> transformers.PretrainedConfig:
    """Config of a tiny ``family`` model with ``num_experts`` routed experts."""
    if family == "qwen3_moe":
        kw = dict(_COMMON, head_dim=16, moe_intermediate_size=32, num_experts=num_experts, mlp_only_layers=[1],
                  norm_topk_prob=True)
        cls = transformers.Qwen3MoeConfig
    elif family == "qwen2_moe":
        kw = dict(_COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=num_experts,
                  mlp_only_layers=[0], norm_topk_prob=False)
        cls = transformers.Qwen2MoeConfig
    elif family == "mixtral":
        kw = dict(_COMMON, num_local_experts=num_experts)
        cls = transformers.MixtralConfig
    elif family == "olmoe":
        kw = dict(_COMMON, num_experts=num_experts, norm_topk_prob=False)
        cls = transformers.OlmoeConfig
    elif family == "deepseek_v3":
        kw = dict(_COMMON, moe_intermediate_size=32, n_routed_experts=num_experts, n_shared_experts=1,
                  first_k_dense_replace=1, n_group=2, topk_group=1, num_experts_per_tok=3, norm_topk_prob=True,
                  routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                  qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4,
                  # Fields DeepSeek-V3's published config.json carries (its routing method, MoE layer
                  # frequency and YaRN rope scaling), which SGLang and vLLM read when they serve it.
                  topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                   "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                                   "mscale": 1.0, "mscale_all_dim": 1.0})
        cls = transformers.DeepseekV3Config
    elif family == "gpt_oss":
        # YaRN as GPT-OSS's published config sets it (factor 32 over the original context).
        kw = dict(_COMMON, head_dim=16, num_local_experts=num_experts, sliding_window=16,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                   "beta_slow": 1.0, "truncate": False,
                                   "original_max_position_embeddings": _COMMON["max_position_embeddings"] // 32},
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        cls = transformers.GptOssConfig
    else:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    kw.update(overrides)
    config = cls(**kw)
    config._attn_implementation = "eager"
    # transformers picks grouped_mm experts by default; on CPU it is several times slower than
    # the per-expert loop at a few thousand tokens.
    config._experts_implementation = "eager"
    return config


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kw):
    """A randomly initialised ``AutoModelForCausalLM`` of ``family`` in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **config_kw), dtype=dtype)
    if family == "deepseek_v3":
        # A non-zero selection bias makes the "bias for selection only" rule observable.
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)
    return model.eval()
