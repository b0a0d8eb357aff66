"""Turn the quickstart's per-variant verl metric files into summary.json, report.md and curves.png.

A run directory holds one ``<variant>.jsonl`` per trained variant (``VARIANTS``), written by
verl's ``FileLogger`` (``verl/utils/tracking.py``): one JSON object per line,
``{"step": int, "data": {metric_key: value}}``. Lines for the same step are merged (verl logs
the pre-training validation at step 0 on its own line). An optional ``<variant>.meta.json``
holds figures the runner measured, e.g. ``{"seconds_per_step": float, "steps": int}``.

The metric keys read per step are the module constants below. A key absent from a variant's
file is reported as null in ``summary.json`` and "n/a" in ``report.md``, with a note naming
the key and the variant: never as a silent 0.

Usage::

    python -m verl_r3.quickstart.report RUN_DIR
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "VARIANTS", "REWARD_KEY", "K3_KL_KEY", "EXTREME_FRAC_2_KEY", "ROUTER_DISAGREE_KEY",
    "ROUTER_DISAGREE_REPLAYED_KEY", "STEP_TIME_KEY", "SUMMARY_FIELDS", "VariantRun", "load_jsonl", "load_run",
    "summarize_variant", "render_markdown", "plot_curves", "summarize", "main",
]

VARIANTS = ("grpo", "grpo_r3", "grpo_tis", "gspo", "gspo_r3")

#: Mean sequence reward of the step's rollouts (verl's ``compute_data_metrics``).
REWARD_KEY = "critic/score/mean"
#: k3 KL estimate between rollout and trainer log-probs over response tokens.
K3_KL_KEY = "rollout_corr/k3_kl"
#: F(2): fraction of response tokens whose rollout/trainer probability ratio is beyond 2 either way.
EXTREME_FRAC_2_KEY = "actor/r3/extreme_frac_2"
#: Fraction of (response token, MoE layer) pairs where the trainer's own top-k set differs from the rollout's.
ROUTER_DISAGREE_KEY = "actor/r3/router_disagree"
#: The same fraction for the experts the trainer actually used (zero when routing is replayed exactly).
ROUTER_DISAGREE_REPLAYED_KEY = "actor/r3/router_disagree_replayed"
#: Wall-clock seconds of one training step (verl's ``timing_s/step``).
STEP_TIME_KEY = "timing_s/step"

# Summary field -> metric key averaged over the logged steps.
_MEAN_FIELDS = {
    "mean_k3_kl": K3_KL_KEY,
    "mean_extreme_frac_2": EXTREME_FRAC_2_KEY,
    "mean_router_disagree": ROUTER_DISAGREE_KEY,
    "mean_router_disagree_replayed": ROUTER_DISAGREE_REPLAYED_KEY,
}

SUMMARY_FIELDS = ("steps", "final_reward", "best_reward", "first_k3_kl", *_MEAN_FIELDS, "seconds_per_step")

# (summary field, column header) of report.md, in order.
_COLUMNS = (
    ("steps", "steps"),
    ("final_reward", "final reward"),
    ("best_reward", "best reward"),
    ("first_k3_kl", "k3 KL, step 1"),
    ("mean_k3_kl", "k3 KL"),
    ("mean_extreme_frac_2", "F(2)"),
    ("mean_router_disagree", "router disagree"),
    ("mean_router_disagree_replayed", "router disagree (replayed)"),
    ("seconds_per_step", "s/step"),
)

_LEGEND = (
    "- **final reward** / **best reward**: `critic/score/mean` (mean rule reward of the step's rollouts) "
    "at the last step, and its maximum over steps.",
    "- **k3 KL, step 1**: the k3 KL of the first step. Every variant starts from the same weights, "
    "prompts and seeds. With `ROLLOUT_ENGINE=hf` (requests seeded by prompt) they score the same "
    "rollouts at step 1: the cleanest side-by-side figure. vLLM and SGLang sample from one "
    "engine-wide stream, so with them the step-1 rollouts differ from variant to variant.",
    "- **k3 KL**: mean over steps of the k3 KL estimate between the rollout engine's and the trainer's "
    "log-probs of the response tokens (`rollout_corr/k3_kl`).",
    "- **F(2)**: mean over steps of the fraction of response tokens whose rollout/trainer probability "
    "ratio is beyond 2 either way, i.e. above 2 or below 1/2 (`actor/r3/extreme_frac_2`).",
    "- **router disagree**: mean over steps of the fraction of (response token, MoE layer) pairs where "
    "the trainer's own top-k expert set differs from the rollout's (`actor/r3/router_disagree`).",
    "- **router disagree (replayed)**: the same fraction for the experts the trainer actually used; "
    "0 when the rollout's routing is replayed (`actor/r3/router_disagree_replayed`).",
    "- **s/step**: median of `timing_s/step` over the steps after the first (or the runner's "
    "`seconds_per_step` from `<variant>.meta.json`).",
    "- **n/a**: the metric was not logged for that variant (see the notes).",
)

# (metric key, panel title) of curves.png.
_PANELS = (
    (REWARD_KEY, "reward (critic/score/mean)"),
    (K3_KL_KEY, "k3 KL rollout vs trainer"),
    (EXTREME_FRAC_2_KEY, "F(2): ratio beyond 2 either way"),
    (ROUTER_DISAGREE_KEY, "router disagreement"),
)


@dataclass
class VariantRun:
    """One variant's metrics: ``steps[step][metric_key] = value`` plus its meta file (or {})."""

    name: str
    steps: dict[int, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of ``key`` in step order, skipping steps without a finite number for it."""
        return [(s, float(d[key])) for s, d in sorted(self.steps.items()) if _is_number(d.get(key))]

    def has(self, key: str) -> bool:
        return bool(self.series(key))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_jsonl(path: str | Path) -> dict[int, dict[str, Any]]:
    """A FileLogger file as ``{step: merged data}``; a malformed line raises naming file and line."""
    path = Path(path)
    steps: dict[int, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({err.msg})") from None
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)
                    and isinstance(record.get("data"), dict)):
                raise ValueError(f"{path}:{lineno}: expected a FileLogger record "
                                 '{"step": int, "data": {...}}, got ' + line.strip()[:80])
            steps.setdefault(record["step"], {}).update(record["data"])
    return steps


def _load_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def load_run(run_dir: str | Path) -> tuple[dict[str, VariantRun], list[str]]:
    """The variants in ``run_dir`` (in ``VARIANTS`` order) and notes on stray meta files.

    Raises when the directory is missing, holds no variant file, or holds a ``.jsonl`` whose
    name is not a known variant.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    names = sorted(p.stem for p in run_dir.glob("*.jsonl"))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant file(s) {', '.join(n + '.jsonl' for n in unknown)} in {run_dir}; "
                         f"variants are {', '.join(VARIANTS)}")
    if not names:
        raise FileNotFoundError(f"no <variant>.jsonl in {run_dir}; variants are {', '.join(VARIANTS)}")
    runs: dict[str, VariantRun] = {}
    for name in VARIANTS:
        if name in names:
            meta_path = run_dir / f"{name}.meta.json"
            meta = _load_meta(meta_path) if meta_path.exists() else {}
            runs[name] = VariantRun(name, load_jsonl(run_dir / f"{name}.jsonl"), meta)
    notes = [f"`{p.name}` has no `{p.name[:-len('.meta.json')]}.jsonl`; skipped."
             for p in sorted(run_dir.glob("*.meta.json")) if p.name[:-len(".meta.json")] not in runs]
    return runs, notes


def _seconds_per_step(run: VariantRun) -> float | None:
    times = [v for _, v in run.series(STEP_TIME_KEY)]
    if times:
        return statistics.median(times[1:] if len(times) > 1 else times)
    meta = run.meta.get("seconds_per_step")
    return float(meta) if _is_number(meta) else None


def _step_count(run: VariantRun) -> int | None:
    trained = {s for key in (REWARD_KEY, STEP_TIME_KEY) for s, _ in run.series(key)}
    if trained:
        return len(trained)
    meta = run.meta.get("steps")
    return int(meta) if isinstance(meta, int) and not isinstance(meta, bool) else None


def summarize_variant(run: VariantRun) -> tuple[dict[str, float | int | None], list[str]]:
    """The summary figures of one variant (``SUMMARY_FIELDS``) and notes on missing metrics."""
    notes: list[str] = []

    def missing(key: str, fields: str) -> None:
        notes.append(f"`{key}` missing from `{run.name}.jsonl`: {fields} is n/a.")

    rewards = [v for _, v in run.series(REWARD_KEY)]
    if not rewards:
        missing(REWARD_KEY, "final_reward, best_reward")
    out: dict[str, float | int | None] = {
        "steps": _step_count(run),
        "final_reward": rewards[-1] if rewards else None,
        "best_reward": max(rewards) if rewards else None,
    }
    k3 = run.series(K3_KL_KEY)
    out["first_k3_kl"] = k3[0][1] if k3 else None  # step 1: the same rollouts for every variant with hf
    for name, key in _MEAN_FIELDS.items():
        values = [v for _, v in run.series(key)]
        out[name] = statistics.fmean(values) if values else None
        if not values:
            missing(key, name)
    out["seconds_per_step"] = _seconds_per_step(run)
    if out["seconds_per_step"] is None:
        notes.append(f"`{STEP_TIME_KEY}` missing from `{run.name}.jsonl` and no `seconds_per_step` "
                     f"in `{run.name}.meta.json`: seconds_per_step is n/a.")
    if out["steps"] is None:
        notes.append(f"no training step in `{run.name}.jsonl` and no `steps` in `{run.name}.meta.json`: "
                     "steps is n/a.")
    return out, notes


def _cell(value: float | int | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def render_table(summary: dict[str, dict]) -> str:
    """The markdown table: one row per variant, the columns of ``_COLUMNS``."""
    lines = ["| variant | " + " | ".join(h for _, h in _COLUMNS) + " |",
             "|---|" + "---:|" * len(_COLUMNS)]
    for name, figures in summary.items():
        lines.append(f"| {name} | " + " | ".join(_cell(figures[f]) for f, _ in _COLUMNS) + " |")
    return "\n".join(lines)


def render_markdown(summary: dict[str, dict], notes: Sequence[str]) -> str:
    """report.md: the table, its legend, and the notes on missing metrics."""
    parts = ["# Quickstart report", "", render_table(summary), "", "## Columns", "", *_LEGEND, ""]
    if notes:
        parts += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(parts)


def plot_curves(runs: dict[str, VariantRun], path: str | Path) -> None:
    """curves.png: reward, k3 KL, F(2) and router disagreement over steps, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # One colour per variant in every panel, whichever variants are present.
    colours = {name: f"C{i}" for i, name in enumerate(VARIANTS)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, title) in zip(axes.flat, _PANELS):
        plotted = False
        for run in runs.values():
            points = run.series(key)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if len(points) < 30 else None, label=run.name, color=colours[run.name])
                plotted = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "n/a: not logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(run_dir: str | Path) -> dict[str, dict]:
    """Summarize every variant in ``run_dir`` and write summary.json, report.md and curves.png there.

    Returns ``{variant: {field: value or None}}`` with the fields of ``SUMMARY_FIELDS``;
    ``summary.json`` holds the same mapping (its keys are exactly the variants present).
    """
    run_dir = Path(run_dir)
    runs, notes = load_run(run_dir)
    summary: dict[str, dict] = {}
    for name, run in runs.items():
        summary[name], variant_notes = summarize_variant(run)
        notes += variant_notes
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (run_dir / "report.md").write_text(render_markdown(summary, notes), encoding="utf-8")
    plot_curves(runs, run_dir / "curves.png")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m verl_r3.quickstart.report RUN_DIR``: write the three files and print the table."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m verl_r3.quickstart.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="directory holding <variant>.jsonl files")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.run_dir)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    run_dir = Path(args.run_dir)
    print(render_table(summary))
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    if "## Notes" in report:
        print("\n" + report[report.index("## Notes"):].strip())
    print(f"\nwrote {run_dir / 'summary.json'}, {run_dir / 'report.md'}, {run_dir / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
