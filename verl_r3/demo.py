"""Replay demo on a tiny MoE, on CPU, in a minute or two (what ``make quickstart`` runs).

1. Build a tiny Qwen3-MoE (byte vocabulary) and warm-start it with next-token training on
   generated arithmetic ("17+25=42"), so that its outputs are peaked like a real policy.
2. Run the inference side in bf16, as rollout engines do, on held-out arithmetic text
   (16 prompt tokens, 112 response tokens a sequence): record its routing and the log-probs
   of the response tokens.
3. Recompute the log-probs in fp32, as the trainer does, three ways: native routing, R3
   (replaying the rollout's routing) and a second native pass.
4. Print the training-inference mismatch of each (k3 KL, extreme-token fraction F(tau),
   router disagreement) and check that the router still gets gradients under replay.
"""

from __future__ import annotations

import copy
import json
import time

import torch
import torch.nn.functional as F

from verl_r3 import RouterReplay
from verl_r3.core.metrics import expert_sets_differ, logprob_mismatch, router_disagreement
from verl_r3.tiny import tiny_model

__all__ = ["main", "run"]


def arithmetic_lines(count: int, generator: torch.Generator) -> list[str]:
    a = torch.randint(0, 100, (count,), generator=generator).tolist()
    b = torch.randint(0, 100, (count,), generator=generator).tolist()
    return [f"{x}+{y}={x + y}" for x, y in zip(a, b)]


def _batch(lines: list[str], length: int) -> torch.Tensor:
    text = ("\n".join(lines) + "\n").encode()
    usable = len(text) // length * length
    return torch.tensor(list(text[:usable]), dtype=torch.long).view(-1, length)


def warm_start(model, steps: int, generator: torch.Generator, log=print) -> float:
    """Next-token training on arithmetic text; returns the final loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        ids = _batch(arithmetic_lines(160, generator), 64)[:16]
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(steps // 5, 1) == 0:
            log(f"  warm-start step {step + 1:4d}/{steps}  loss {loss.item():.3f}")
    model.eval()
    return float(loss.detach())


def token_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for every t, as float32 [B, T-1]."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def run(*, quick: bool = False, seed: int = 0, log=print) -> dict:
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    overrides = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts_per_tok=2,
                     mlp_only_layers=[])
    trainer = tiny_model("qwen3_moe", num_experts=16, seed=seed, **overrides)
    steps = 100 if quick else 300
    log(f"[1/4] tiny Qwen3-MoE: {sum(p.numel() for p in trainer.parameters()) / 1e6:.2f}M parameters, "
        f"4 layers, 16 experts, top-2; warm start for {steps} steps")
    final_loss = warm_start(trainer, steps, generator, log)

    log("[2/4] inference side in bf16, as rollout engines run: record routing and log-probs")
    rollout = copy.deepcopy(trainer).to(torch.bfloat16)
    count = 16 if quick else 32
    sequences = _batch(arithmetic_lines(40 * count, generator), 128)[:count]  # held-out text
    prompt_len = 16
    rollout_rr = RouterReplay(rollout)
    with torch.no_grad(), rollout_rr.record() as rec:
        rollout_lp = token_log_probs(rollout(input_ids=sequences).logits, sequences)
    routing = rec.routed_experts
    response_mask = torch.zeros_like(rollout_lp, dtype=torch.bool)
    response_mask[:, prompt_len - 1 :] = True  # log-probs of the "response" tokens

    log("[3/4] trainer in fp32: log-probs with native routing, with R3 replay, and native again")
    rr = RouterReplay(trainer)
    with torch.no_grad():
        native_lp = token_log_probs(trainer(input_ids=sequences).logits, sequences)
        again_lp = token_log_probs(trainer(input_ids=sequences).logits, sequences)
        with rr.replay(routing) as handle:
            replay_lp = token_log_probs(trainer(input_ids=sequences).logits, sequences)
    replay_stats = rr.stats
    resp_tokens = torch.zeros(sequences.shape, dtype=torch.bool)
    resp_tokens[:, prompt_len - 1 : -1] = True  # positions whose routing produced a response token
    disagreement = router_disagreement(routing, handle.native_experts, token_mask=resp_tokens)
    # Response tokens whose prediction saw a routing flip in some layer at its own position.
    flipped = expert_sets_differ(routing, handle.native_experts).any(-1)[:, :-1]
    flipped_mask = response_mask & flipped

    log("[4/4] one policy-gradient-style step under replay: do routers get gradients?")
    trainer.train()
    trainer.zero_grad(set_to_none=True)
    with rr.replay(routing):
        lp = token_log_probs(trainer(input_ids=sequences).logits, sequences)
        (-(lp * response_mask).sum() / response_mask.sum()).backward()
    router_grad = [float(layer.router.weight.grad.abs().sum()) for layer in rr.layers]

    result = {
        "warm_start_loss": final_loss,
        "sequences": int(sequences.shape[0]),
        "response_tokens": int(response_mask.sum()),
        "no_replay": logprob_mismatch(rollout_lp, native_lp, response_mask),
        "replay": logprob_mismatch(rollout_lp, replay_lp, response_mask),
        "forward_twice": logprob_mismatch(native_lp, again_lp, response_mask),
        "flipped_tokens": int(flipped_mask.sum()),
        "no_replay_flipped": logprob_mismatch(rollout_lp, native_lp, flipped_mask) if flipped_mask.any() else None,
        "replay_flipped": logprob_mismatch(rollout_lp, replay_lp, flipped_mask) if flipped_mask.any() else None,
        "router_disagreement": {k: v for k, v in disagreement.items() if k != "per_layer"},
        "replay_stats": {k: v for k, v in replay_stats.items() if k != "disagree_per_layer"},
        "router_grad_abs_sum": router_grad,
        "seconds": time.perf_counter() - started,
    }
    return result


def report(result: dict) -> str:
    rows = [("", "k3 KL", "F(1.5)", "F(2)", "F(5)")]
    for key, label in (("no_replay", "rollout vs trainer, native routing"),
                       ("replay", "rollout vs trainer, R3 replay"),
                       ("forward_twice", "trainer vs itself (forward twice)"),
                       ("no_replay_flipped", "  tokens with a routing flip, native"),
                       ("replay_flipped", "  tokens with a routing flip, R3")):
        m = result[key]
        if m is None:
            continue
        rows.append((label, f"{m['k3_kl']:.2e}", f"{m['extreme_frac_1.5']:.2e}", f"{m['extreme_frac_2']:.2e}",
                     f"{m['extreme_frac_5']:.2e}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    d = result["router_disagreement"]
    no, yes = result["no_replay"]["k3_kl"], result["replay"]["k3_kl"]
    lines += [
        "",
        f"router disagreement (rollout bf16 vs trainer fp32 native top-k, response tokens): "
        f"{d['router']:.2%} of (token, layer) pairs, {d['token']:.2%} of tokens, "
        f"{d['layers_per_token']:.2f} layers per differing token",
        f"R3 replayed {result['replay_stats']['replayed']} (token, layer) pairs, "
        f"{result['replay_stats']['fallback']} fell back to native routing",
        f"k3 KL with R3 is {yes / no:.2f}x the KL without it over all response tokens; "
        f"{result['flipped_tokens']} response tokens saw a routing flip" if no > 0 else "no mismatch without replay",
        "router gradient |sum| per MoE layer under replay: "
        + ", ".join(f"{g:.3g}" for g in result["router_grad_abs_sum"]),
        f"done in {result['seconds']:.0f} s",
    ]
    return "\n".join(lines)


def main(args=None) -> int:
    quick = bool(getattr(args, "quick", False))
    seed = int(getattr(args, "seed", 0) or 0)
    result = run(quick=quick, seed=seed)
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        print()
        print(report(result))
    return 0
