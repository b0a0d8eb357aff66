"""Builds verl's FSDP2 engine on the CPU platform for tests (imported inside subprocesses).

The process must have VERL_USE_EXTERNAL_MODULES=verl_r3.integration.cpu_platform,
VERL_PLATFORM=cpu and a loopback MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK.
"""

from __future__ import annotations

import tempfile

import torch
from tensordict import TensorDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from verl.trainer.config import CheckpointConfig
from verl.utils import tensordict_utils as tu
from verl.utils.distributed import initialize_global_process_group
from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
from verl.workers.config.engine import EngineRouterReplayConfig
from verl.workers.engine import EngineRegistry
from verl.workers.utils.padding import left_right_2_no_padding

from verl_r3.tiny import tiny_config


def model_dir(**config_kw):
    """A tiny Qwen3-MoE and a byte-level tokenizer saved to a temp dir: (path, config, tokenizer)."""
    torch.manual_seed(0)
    path = tempfile.mkdtemp()
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for name in ("<pad>", "<bos>", "<eos>"):
        vocab[name] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    hf_tok.save_pretrained(path)
    cfg = tiny_config("qwen3_moe", vocab_size=272, head_dim=32, pad_token_id=hf_tok.pad_token_id,
                      bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, **config_kw)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    cfg.save_pretrained(path)
    return path, cfg, hf_tok


def replay_setup(prompt_lens, resp_lens, seed=1):
    """What a replay-engine case starts from: verl's FSDP engines and FSDPReplayEngine registered for
    the CPU, the tiny model (``model_dir()``), one random sequence per (prompt, response) length pair
    and the Hugging Face model holding the same weights: (path, config, tokenizer, seqs, hf_model,
    generator), the generator advanced past the sequences for any further draws."""
    from verl_r3.integration.fsdp_cpu import register_cpu_engines
    from verl_r3.integration.fsdp_replay import register_replay_engines

    register_cpu_engines()
    register_replay_engines()
    path, cfg, tok = model_dir()
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 256, (p + r,), generator=g) for p, r in zip(prompt_lens, resp_lens)]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return path, cfg, tok, seqs, hf, g


_pg_started = False


def engine(path, *, remove_padding=True, mode="disabled", mbs=1, max_tokens=64, dynamic=False, lr=1e-2,
           forward_only=False):
    """verl's engine for ``path`` built as TrainingWorker builds it (fp32, fsdp2)."""
    global _pg_started
    if not _pg_started:
        initialize_global_process_group(timeout_second=120)
        _pg_started = True
    model_config = HFModelConfig(path=path, use_remove_padding=remove_padding,
                                 override_config={"attn_implementation": "eager"},
                                 enable_gradient_checkpointing=True)
    engine_config = FSDPEngineConfig(
        strategy="fsdp2", dtype="float32", model_dtype="fp32",
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        use_dynamic_bsz=dynamic, max_token_len_per_gpu=max_tokens, infer_max_token_len_per_gpu=max_tokens,
        micro_batch_size_per_gpu=mbs, infer_micro_batch_size_per_gpu=mbs, use_remove_padding=remove_padding,
        use_torch_compile=False, forward_only=forward_only, offload_policy=False,
        router_replay=EngineRouterReplayConfig(mode=mode),
    )
    model_config.model_type = "language_model"
    built = EngineRegistry.new(model_type="language_model", backend="fsdp2", model_config=model_config,
                               engine_config=engine_config,
                               optimizer_config=FSDPOptimizerConfig(lr=lr, total_training_steps=10, weight_decay=0.0),
                               checkpoint_config=CheckpointConfig())
    built.initialize()
    return built


def rollout_batch(seqs, prompt_lens, pad_id, *, routed=None, remove_padding=True, mbs=1, max_tokens=64,
                  dynamic=False, rollout_log_probs=None):
    """A rollout-shaped batch as verl's agent loop and trainer build it.

    ``seqs[i]`` are the token ids of sample i (prompt then response); ``routed[i]`` its
    engine routing ``[n - 1, L, K]`` (or None: no routed_experts key), written into verl's
    zero-filled ``[B, P + R, L, K]`` int16 layout, then ``left_right_2_no_padding``;
    ``rollout_log_probs[i]`` (optional) the engine's log-probs of sample i's response tokens.
    """
    resp_lens = [len(s) - p for s, p in zip(seqs, prompt_lens)]
    B, P, R = len(seqs), max(prompt_lens), max(resp_lens)
    prompts = torch.full((B, P), pad_id)
    responses = torch.full((B, R), pad_id)
    attention_mask = torch.zeros(B, P + R, dtype=torch.long)
    for i, (ids, p, r) in enumerate(zip(seqs, prompt_lens, resp_lens)):
        prompts[i, P - p:] = ids[:p]
        responses[i, :r] = ids[p:]
        attention_mask[i, P - p:P + r] = 1
    fields = {
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention_mask, "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        "response_mask": attention_mask[:, P:].clone(),
    }
    if routed is not None:
        L, K = routed[0].shape[1:]
        layout = torch.zeros(B, P + R, L, K, dtype=torch.int16)
        for i, (rows, p) in enumerate(zip(routed, prompt_lens)):
            layout[i, P - p:P - p + rows.shape[0]] = rows.to(torch.int16)
        fields["routed_experts"] = layout
    if rollout_log_probs is not None:
        lp = torch.zeros(B, R)
        for i, (row, r) in enumerate(zip(rollout_log_probs, resp_lens)):
            lp[i, :r] = row
        fields["rollout_log_probs"] = lp
    td = left_right_2_no_padding(TensorDict(fields, batch_size=[B]))
    tu.assign_non_tensor(td, temperature=1.0, use_remove_padding=remove_padding, use_dynamic_bsz=dynamic,
                         max_token_len_per_gpu=max_tokens, micro_batch_size_per_gpu=mbs, use_fused_kernels=False,
                         calculate_entropy=False, compute_loss=False)
    return td
