"""The metric keys verl_r3 logs in every verl run, and the verl keys it reads beside them.

One place for the names, so that what runs log, what ``verl-r3 report`` reads and what
``verl-r3 wandb-dashboard`` plots cannot drift apart. Plain strings, no imports.

Each training step logs (``verl_r3.integration.step_metrics``):

``r3/k3_kl``, ``r3/extreme_frac_{1.5,2,5,10}``
    k3 KL and F(tau) between the rollout engine's log-probs and the trainer's, over response
    tokens. The trainer's are those the loss uses as the behaviour policy: ``old_log_probs``
    recomputed by ``compute_log_prob``, or, in verl's bypass mode (no recomputation), the
    update's own forward.
``r3/router_disagree``, ``r3/router_disagree_token``, ``r3/router_disagree_layers_per_token``
    Rollout routing vs the trainer's native top-k choice: share of (response token, MoE layer)
    pairs whose expert sets differ, share of response tokens differing in at least one layer,
    and the mean number of differing layers of those tokens.
``r3/router_disagree_layer/NN``
    ``r3/router_disagree`` of decoder layer ``NN`` (two digits, the model's layer index).
``r3/router_disagree_replayed``
    The same as ``r3/router_disagree`` for the experts the trainer actually used (0 under R3).
``r3/replay_active_frac``, ``r3/fallback_frac``
    Share of (response token, MoE layer) pairs replayed, and share without rollout routing
    (run with native routing: the one documented fallback).
``r3/routing_bytes_per_token``
    Bytes of routing the trainer received per token, as carried in the batch.
``r3/metrics_seconds``, ``r3/metrics_time_frac``
    Seconds spent computing these figures in the step, and their share of ``timing_s/step``.
"""

PREFIX = "r3/"

K3_KL = "r3/k3_kl"
TAUS = (1.5, 2.0, 5.0, 10.0)


def extreme_frac(tau: float) -> str:
    """``r3/extreme_frac_{tau:g}``: 2.0 -> ``r3/extreme_frac_2``, 1.5 -> ``r3/extreme_frac_1.5``."""
    return f"r3/extreme_frac_{tau:g}"


EXTREME_FRAC = {tau: extreme_frac(tau) for tau in TAUS}
EXTREME_FRAC_2 = EXTREME_FRAC[2.0]

ROUTER_DISAGREE = "r3/router_disagree"
ROUTER_DISAGREE_TOKEN = "r3/router_disagree_token"
ROUTER_DISAGREE_LAYERS_PER_TOKEN = "r3/router_disagree_layers_per_token"
ROUTER_DISAGREE_LAYER_PREFIX = "r3/router_disagree_layer/"
ROUTER_DISAGREE_REPLAYED = "r3/router_disagree_replayed"
REPLAY_ACTIVE_FRAC = "r3/replay_active_frac"
FALLBACK_FRAC = "r3/fallback_frac"
ROUTING_BYTES_PER_TOKEN = "r3/routing_bytes_per_token"
METRICS_SECONDS = "r3/metrics_seconds"
METRICS_TIME_FRAC = "r3/metrics_time_frac"


def router_disagree_layer(layer: int) -> str:
    """``r3/router_disagree_layer/NN`` of decoder layer ``layer``."""
    return f"{ROUTER_DISAGREE_LAYER_PREFIX}{layer:02d}"


#: verl's own keys that reports and dashboards put beside ours.
REWARD = "critic/score/mean"
STEP_TIME = "timing_s/step"
VERL_K3_KL = "rollout_corr/k3_kl"
