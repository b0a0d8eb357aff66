"""A tiny warm-started Qwen3-MoE and a byte-level tokenizer, saved as a verl model directory.

RL from a random model gets no reward signal, and the quickstart cannot download a checkpoint,
so ``build_model_dir`` builds everything locally:

1. a byte-level tokenizer (256 byte symbols plus ``<pad>``, ``<bos>`` and Qwen's
   ``<|im_start|>``/``<|im_end|>``) with a ChatML chat template, so verl's
   ``apply_chat_template(messages, add_generation_prompt=True)`` and its Qwen3 agent-loop token
   builder work;
2. a tiny Qwen3-MoE from ``verl_r3.tiny.tiny_config`` with every layer MoE;
3. a short supervised warm start on generated word problems (loss on the answer tokens only),
   which leaves the model partly right: enough reward for GRPO/GSPO to have signal, and room
   to improve;
4. ``save_pretrained`` of model (fp32 safetensors), tokenizer and generation config, plus
   ``warm_start.json`` with the figures ``build_model_dir`` returns.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

from verl_r3.quickstart.data import word_problems
from verl_r3.quickstart.reward import compute_score
from verl_r3.tiny import tiny_config

__all__ = ["CHAT_TEMPLATE", "GENERATION_PROMPT", "build_tokenizer", "build_config", "render_prompt", "warm_start",
           "greedy_accuracy", "sampled_signal", "build_model_dir", "main"]

GENERATION_PROMPT = "<|im_start|>assistant\n"

# Qwen's ChatML turns: verl's agent loop picks its Qwen3 token builder for model_type qwen3_moe,
# which needs "<|im_end|>" (the end of an assistant turn, also the EOS) and "\n" as one token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

HEAD_DIM = 32
HOLDOUT_SIZE = 64


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per byte, plus ``<pad>``, ``<bos>``, ``<|im_start|>`` and
    ``<|im_end|>`` (the EOS); with CHAT_TEMPLATE."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for name in ("<pad>", "<bos>", "<|im_start|>", "<|im_end|>"):
        vocab[name] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                     eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build_config(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 64, layers: int = 4, experts: int = 8,
                 top_k: int = 2, max_positions: int = 256):
    """Qwen3-MoE config for ``tokenizer``: every layer MoE, head_dim 32, untied embeddings, a context of
    ``max_positions`` tokens (bytes)."""
    if hidden_size < HEAD_DIM or hidden_size % HEAD_DIM:
        raise ValueError(f"hidden_size must be a positive multiple of {HEAD_DIM}, got {hidden_size}")
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")
    if max_positions < 16:
        raise ValueError(f"max_positions must be >= 16, got {max_positions}")
    heads = hidden_size // HEAD_DIM
    return tiny_config(
        "qwen3_moe", num_experts=experts, num_experts_per_tok=top_k,
        vocab_size=8 * math.ceil(len(tokenizer) / 8), head_dim=HEAD_DIM, hidden_size=hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, mlp_only_layers=[],
        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )


def render_prompt(tokenizer: PreTrainedTokenizerFast, question: str) -> str:
    """The prompt text verl renders for ``question`` (a ChatML user turn and the assistant header)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def _encode(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _training_batches(tokenizer: PreTrainedTokenizerFast, problems: Sequence[dict[str, str]],
                      batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask, labels) batches; labels are -100 except answer + eos."""
    prompts = _encode(tokenizer, [render_prompt(tokenizer, p["question"]) for p in problems])
    answers = _encode(tokenizer, [p["answer"] for p in problems])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    batches = []
    for start in range(0, len(problems) - batch_size + 1, batch_size):
        seqs = [(prompts[i], answers[i] + [eos]) for i in range(start, start + batch_size)]
        width = max(len(p) + len(a) for p, a in seqs)
        ids = torch.full((batch_size, width), pad)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (p, a) in enumerate(seqs):
            n = len(p) + len(a)
            ids[row, :n] = torch.tensor(p + a)
            labels[row, len(p):n] = torch.tensor(a)
            mask[row, :n] = 1
        batches.append((ids, mask, labels))
    return batches


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10%."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def warm_start(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, problems: Sequence[dict[str, str]], *,
               steps: int, batch_size: int = 32, lr: float = 3e-3, log: Callable[[str], None] = print) -> float:
    """Supervised fine-tuning on ``problems`` (answer tokens only); returns the mean loss of the last steps.

    The loss is next-token cross-entropy on the answer and eos; Qwen3-MoE's load-balancing loss
    is added with the config's coefficient so the experts stay in use.
    """
    batches = _training_batches(tokenizer, problems, batch_size)
    if len(batches) < steps:
        raise ValueError(f"{len(problems)} problems make {len(batches)} batches of {batch_size}; {steps} needed")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0))
    model.train()
    recent: list[float] = []
    for step, (ids, mask, labels) in enumerate(batches[:steps]):
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=aux_coef > 0)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        total = loss + aux_coef * out.aux_loss if getattr(out, "aux_loss", None) is not None else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-20:]
        if log is not None and (step + 1) % max(1, steps // 10) == 0:
            log(f"warm start step {step + 1}/{steps}: answer loss {sum(recent) / len(recent):.3f}")
    model.eval()
    return sum(recent) / len(recent) if recent else float("nan")


def _generate_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, questions: Sequence[str], *,
                    max_new_tokens: int, **generate_kw) -> list[str]:
    """Decoded completions (special tokens skipped, as verl's reward managers decode), prompts left-padded."""
    enc = tokenizer([render_prompt(tokenizer, q) for q in questions], add_special_tokens=False, padding=True,
                    padding_side="left", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **generate_kw)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def greedy_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, problems: Sequence[dict[str, str]],
                    *, max_new_tokens: int = 6, batch_size: int = 64) -> float:
    """Fraction of ``problems`` whose greedy answer scores 1.0 under ``reward.compute_score``."""
    if not problems:
        raise ValueError("greedy_accuracy needs at least one problem")
    was_training = model.training
    model.eval()
    scores: list[float] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        texts = _generate_texts(model, tokenizer, [p["question"] for p in chunk], max_new_tokens=max_new_tokens,
                                do_sample=False)
        scores += [compute_score("", text, p["answer"]) for text, p in zip(texts, chunk)]
    model.train(was_training)
    return sum(scores) / len(scores)


@torch.no_grad()
def sampled_signal(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, problems: Sequence[dict[str, str]],
                   *, samples: int = 4, temperature: float = 1.0, max_new_tokens: int = 6, seed: int = 0
                   ) -> dict[str, float]:
    """What a GRPO group sees: ``samples`` answers per problem at ``temperature`` (no top-k/top-p).

    Returns ``sampled_accuracy`` (mean reward over all samples) and ``mixed_groups`` (fraction of
    problems whose samples got different rewards, i.e. a non-zero group advantage). Reseeds
    torch's global generator with ``seed`` so the figures repeat.
    """
    if not problems or samples < 2:
        raise ValueError(f"sampled_signal needs problems and samples >= 2, got {len(problems)} and {samples}")
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    texts = _generate_texts(model, tokenizer, [p["question"] for p in problems], max_new_tokens=max_new_tokens,
                            do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                            num_return_sequences=samples)
    model.train(was_training)
    groups = [[compute_score("", texts[i * samples + j], p["answer"]) for j in range(samples)]
              for i, p in enumerate(problems)]
    return {"sampled_accuracy": sum(map(sum, groups)) / (samples * len(groups)),
            "mixed_groups": sum(len(set(g)) > 1 for g in groups) / len(groups)}


def build_model_dir(out_dir: str | Path, *, hidden_size: int = 64, layers: int = 4, experts: int = 8, top_k: int = 2,
                    seed: int = 0, warm_start_steps: int = 1200, batch_size: int = 32, lr: float = 3e-3,
                    max_positions: int = 256, log: Callable[[str], None] | None = print) -> dict:
    """Build, warm-start and save the quickstart model to ``out_dir``; returns the warm-start figures.

    The figures (also written to ``out_dir/warm_start.json``): ``params``, ``warm_start_steps``,
    ``batch_size``, ``lr``, ``warm_start_loss`` (answer-token loss over the last steps),
    ``greedy_accuracy`` on ``HOLDOUT_SIZE`` held-out problems, ``sampled_accuracy`` and
    ``mixed_groups`` on the same problems (see ``sampled_signal``), and ``seconds``.
    ``max_positions`` is the model's context in tokens (one per byte). The default budget (1200 steps of 32 problems) takes ~1.5 min on 2 CPU cores and leaves the
    model roughly 25-60% right greedily, depending on the seed.
    """
    if warm_start_steps < 0:
        raise ValueError(f"warm_start_steps must be >= 0, got {warm_start_steps}")
    log = log or (lambda _msg: None)
    began = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, hidden_size=hidden_size, layers=layers, experts=experts, top_k=top_k,
                          max_positions=max_positions)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    log(f"built {config.model_type} with {params:,} parameters ({layers} MoE layers, {experts} experts, top-{top_k})")

    # One stream of distinct problems: the hold-out comes first so it does not depend on the step count.
    problems = word_problems(HOLDOUT_SIZE + warm_start_steps * batch_size, seed=10_000 + seed)
    holdout, train = problems[:HOLDOUT_SIZE], problems[HOLDOUT_SIZE:]
    loss = warm_start(model, tokenizer, train, steps=warm_start_steps, batch_size=batch_size, lr=lr,
                      log=log) if warm_start_steps else float("nan")
    accuracy = greedy_accuracy(model, tokenizer, holdout)
    signal = sampled_signal(model, tokenizer, holdout, seed=seed)

    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    figures = {
        "params": params, "warm_start_steps": warm_start_steps, "batch_size": batch_size, "lr": lr,
        "warm_start_loss": None if math.isnan(loss) else round(loss, 4),
        "greedy_accuracy": accuracy, **signal, "holdout_size": HOLDOUT_SIZE,
        "seconds": round(time.perf_counter() - began, 1),
    }
    (out / "warm_start.json").write_text(json.dumps(figures, indent=2) + "\n")
    log(f"warm start: {warm_start_steps} steps, loss {figures['warm_start_loss']}, greedy accuracy {accuracy:.2f} "
        f"on {HOLDOUT_SIZE} held-out problems (sampled {signal['sampled_accuracy']:.2f}, "
        f"{signal['mixed_groups']:.0%} of 4-sample groups mixed), {figures['seconds']} s")
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m verl_r3.quickstart.model --out DIR``: build (and warm-start) a tiny model directory."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m verl_r3.quickstart.model", description=main.__doc__.split(": ", 1)[1])
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (a multiple of 32)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (all MoE)")
    p.add_argument("--experts", type=int, default=8, help="routed experts per layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--max-positions", type=int, default=256, help="context length in tokens (bytes)")
    p.add_argument("--warm-start-steps", type=int, default=1200, help="supervised warm-start steps (0: random weights)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        build_model_dir(args.out, hidden_size=args.hidden, layers=args.layers, experts=args.experts, top_k=args.top_k,
                        seed=args.seed, warm_start_steps=args.warm_start_steps, max_positions=args.max_positions)
    except ValueError as exc:
        p.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
