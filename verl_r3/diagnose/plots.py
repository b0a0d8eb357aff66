"""The four figures of ``verl-r3 diagnose`` (the paper's views), written with matplotlib."""

from __future__ import annotations

from pathlib import Path

COMPARISONS = (("no_replay", "rollout vs trainer, native routing"),
               ("replay", "rollout vs trainer, R3 replay"),
               ("forward_twice", "trainer vs trainer, forward twice"))
FIGURES = ("prob_scatter.png", "extreme_frac.png", "router_disagreement_per_layer.png", "differing_layers_hist.png")


def plot_figures(out: Path, series: dict, metrics: dict, title: str) -> list[Path]:
    """The four PNGs of ``FIGURES``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    paths = [out / name for name in FIGURES]

    def save(fig, path: Path) -> None:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    # Training vs inference probability of each response token, without and with R3.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), sharey=True)
    p_rollout, flip = np.exp(series["rollout"]), series["flipped"]
    for ax, key, label in ((axes[0], "no_replay", "without R3"), (axes[1], "replay", "with R3")):
        p_train = np.exp(series[key])
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.scatter(p_rollout[~flip], p_train[~flip], s=4, alpha=0.35, label="same experts in every layer")
        ax.scatter(p_rollout[flip], p_train[flip], s=8, alpha=0.8, color="C3",
                   label="trainer's own routing differs in some layer")
        m = metrics[key]
        ax.set_title(f"{label}: k3 KL {m['k3_kl']:.2e}, F(2) {m['extreme_frac_2']:.2e}")
        ax.set_xlabel("inference probability (rollout)")
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    axes[0].set_ylabel("training probability (trainer)")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=9)
    save(fig, paths[0])

    # F(tau) of the three comparisons.
    curves = metrics["extreme_frac_curve"]
    taus = np.asarray(curves["tau"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for key, label in COMPARISONS:
        values = np.asarray(curves[key], dtype=float)
        ax.plot(taus, np.where(values > 0, values, np.nan), label=f"{key}: {label}" + ("" if values.any() else
                                                                                        " (0 at every tau)"))
    ax.set_xscale("log")
    if any(np.asarray(curves[key]).any() for key, _ in COMPARISONS):
        ax.set_yscale("log")  # F spans decades; with every value 0 a log axis has nothing to show
    ticks = [t for t in (1.1, 1.5, 2, 5, 10, 20, 50, 100) if taus[0] <= t <= taus[-1]]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlim(taus[0], taus[-1])
    ax.set_xlabel("tau (probability ratio, either direction)")
    ax.set_ylabel("F(tau): fraction of tokens beyond tau")
    ax.set_title("extreme token distribution (zero values not drawn)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, paths[1])

    # Router disagreement per decoder layer.
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    layers = np.arange(len(metrics["no_replay"]["router_disagree_per_layer"]))
    for j, (key, _) in enumerate(COMPARISONS):
        per_layer = [np.nan if v is None else v for v in metrics[key]["router_disagree_per_layer"]]
        for bar, v in zip(ax.bar(layers + (j - 1) * 0.27, per_layer, width=0.27, label=key), per_layer):
            if v == 0:  # an empty bar is the point of R3: say so
                ax.text(bar.get_x() + bar.get_width() / 2, 0, "0", ha="center", va="bottom", fontsize=7)
    for layer, v in enumerate(metrics["no_replay"]["router_disagree_per_layer"]):
        if v is None:
            ax.text(layer, 0, "dense", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("(token, layer) pairs with a different expert set")
    ax.set_title("router disagreement per layer (replay: experts actually used)", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, paths[2])

    # How many MoE layers flip per response token, without R3.
    histogram = metrics["differing_layers_hist"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.bar_label(ax.bar(np.arange(len(histogram)), histogram), fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)  # a bar of one token stays visible on the log axis
    ax.set_xticks(np.arange(len(histogram)))
    ax.set_xlabel("MoE layers whose expert set differs (rollout vs trainer, without R3)")
    ax.set_ylabel("response tokens")
    ax.set_title(f"{sum(histogram[1:])} of {sum(histogram)} response tokens differ in at least one layer", fontsize=10)
    save(fig, paths[3])
    return paths


