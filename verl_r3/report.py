"""``verl-r3 report``: compare verl runs from their W&B offline directories or local metric files.

Writes ``report.md`` (one table row per run), ``summary.json`` (the same figures) and
``curves.png`` (reward, k3 KL, F(2) and router disagreement over steps) so that the comparison
can be read without a W&B account. Every ``RUN_DIR`` may be:

- a verl ``FileLogger`` file (``VERL_FILE_LOGGER_PATH``): one JSON object per line,
  ``{"step": int, "data": {metric_key: value}}``, lines of the same step merged. The run is
  named by the file's stem; an optional ``<stem>.meta.json`` beside it may give ``group``,
  ``variant``, ``project``, ``steps`` and ``seconds_per_step`` (the quickstart writes one);
- a directory of such files (each one run, e.g. a quickstart run directory);
- a W&B run directory (``offline-run-*/`` or ``run-*/`` holding ``run-*.wandb``) or a
  ``run-*.wandb`` file: the run name, group, job type (the variant) and project come from the
  run's own record;
- a directory holding W&B run directories: a ``wandb/`` directory, ``WANDB_DIR`` (with
  ``wandb/`` inside) or a directory whose ``wandb/`` is ``WANDB_DIR`` (a quickstart run).

The same run found twice (its ``.jsonl`` and its W&B run, or one path given twice) is reported
once: a ``.jsonl`` file and a W&B run are the same run when their names match (stem = run
name, variant, or the run name's ``-<stem>`` ending) and every metric they both logged at a
step they both logged agrees. ``prefer`` picks which of the two is read (``jsonl`` by default:
verl's exact values); the notes say which.

``.wandb`` files are read with the reader wandb ships: ``wandb-core leet inspect --json`` (what
``wandb leet inspect`` runs). wandb 0.31 has no Python reader of its transaction log any more
(``wandb.sdk.internal.datastore`` is gone); the records it prints are the
``wandb_internal_pb2.Record`` messages as JSON.

Metric keys come from ``verl_r3.keys``. A key a run did not log is reported as null in
``summary.json`` and "n/a" in ``report.md`` with a note naming the key and the run, never as a
silent 0. k3 KL falls back to verl's own ``rollout_corr/k3_kl`` (with a note) when
``r3/k3_kl`` is absent, and every ``r3/`` key to its name before verl_r3 moved its keys out of
``actor/`` (``actor/r3/...``, also with a note).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verl_r3 import keys
from verl_r3.jsonl import read_jsonl

__all__ = [
    "SUMMARY_FIELDS", "COLUMNS", "LEGEND", "PANELS", "Run", "Report", "load_jsonl", "load_wandb_run", "find_runs",
    "load_runs", "summarize_run", "summarize", "render_table", "render_markdown", "plot_curves", "write_report",
    "add_arguments", "main",
]

#: Summary field -> metric key averaged over the steps that logged it.
_MEAN_FIELDS = {
    "mean_k3_kl": keys.K3_KL,
    "mean_extreme_frac_2": keys.EXTREME_FRAC_2,
    "mean_router_disagree": keys.ROUTER_DISAGREE,
    "mean_router_disagree_replayed": keys.ROUTER_DISAGREE_REPLAYED,
    "mean_replay_active_frac": keys.REPLAY_ACTIVE_FRAC,
    "mean_metrics_time_frac": keys.METRICS_TIME_FRAC,
}

#: The fields of every run in ``summary.json``, in order.
SUMMARY_FIELDS = ("run", "group", "variant", "project", "source", "steps", "final_reward", "best_reward",
                  "first_k3_kl", *_MEAN_FIELDS, "seconds_per_step")

#: (summary field, column header) of the table, in order.
COLUMNS = (
    ("run", "run"),
    ("group", "group"),
    ("variant", "variant"),
    ("steps", "steps"),
    ("final_reward", "final reward"),
    ("best_reward", "best reward"),
    ("first_k3_kl", "k3 KL, step 1"),
    ("mean_k3_kl", "k3 KL"),
    ("mean_extreme_frac_2", "F(2)"),
    ("mean_router_disagree", "router disagree"),
    ("mean_router_disagree_replayed", "router disagree (replayed)"),
    ("mean_replay_active_frac", "replay active"),
    ("seconds_per_step", "s/step"),
    ("mean_metrics_time_frac", "metrics cost"),
)

#: Column legend of report.md: summary field -> text. Callers may replace entries (the quickstart does).
LEGEND = {
    "run": "**run**, **group**, **variant**: the W&B run name (verl's `trainer.experiment_name`) or the "
           "`.jsonl` file's stem, its W&B group and its job type (or `<stem>.meta.json`); n/a when unknown.",
    "steps": "**steps**: training steps logged (steps with a reward or a step time).",
    "final_reward": f"**final reward** / **best reward**: `{keys.REWARD}` (mean reward of the step's rollouts) "
                    "at the last step, and its maximum over steps.",
    "first_k3_kl": "**k3 KL, step 1**: the k3 KL of the first step that logged it.",
    "mean_k3_kl": f"**k3 KL**: mean over steps of the k3 KL between the rollout engine's and the trainer's "
                  f"log-probs of the response tokens (`{keys.K3_KL}`, else verl's `{keys.VERL_K3_KL}`).",
    "mean_extreme_frac_2": "**F(2)**: mean over steps of the fraction of response tokens whose rollout/trainer "
                           f"probability ratio is beyond 2 either way, above 2 or below 1/2 (`{keys.EXTREME_FRAC_2}`).",
    "mean_router_disagree": "**router disagree**: mean over steps of the fraction of (response token, MoE layer) "
                            "pairs where the trainer's own top-k expert set differs from the rollout's "
                            f"(`{keys.ROUTER_DISAGREE}`).",
    "mean_router_disagree_replayed": "**router disagree (replayed)**: the same fraction for the experts the trainer "
                                     "actually used; 0 when the rollout's routing is replayed "
                                     f"(`{keys.ROUTER_DISAGREE_REPLAYED}`).",
    "mean_replay_active_frac": "**replay active**: mean over steps of the fraction of (response token, MoE layer) "
                               f"pairs replayed (`{keys.REPLAY_ACTIVE_FRAC}`).",
    "seconds_per_step": f"**s/step**: median of `{keys.STEP_TIME}` over the steps after the first (or "
                        "`seconds_per_step` from `<stem>.meta.json`).",
    "mean_metrics_time_frac": "**metrics cost**: mean over steps of the share of the step's time spent computing "
                              f"verl_r3's metrics (`{keys.METRICS_TIME_FRAC}`).",
    "n/a": "**n/a**: not logged by that run (see the notes).",
}

#: (metric key, panel title) of curves.png.
PANELS = (
    (keys.REWARD, f"reward ({keys.REWARD})"),
    (keys.K3_KL, "k3 KL rollout vs trainer"),
    (keys.EXTREME_FRAC_2, "F(2): ratio beyond 2 either way"),
    (keys.ROUTER_DISAGREE, "router disagreement"),
)

_TITLE = "verl_r3 report"
_WRITTEN = ("report.md", "summary.json", "curves.png")


@dataclass
class Run:
    """One run's metrics, ``steps[step][metric_key] = value``, and what is known about it."""

    name: str
    steps: dict[int, dict[str, Any]]
    source: str  # the file the metrics were read from
    kind: str  # "jsonl" or "wandb"
    group: str | None = None
    variant: str | None = None
    project: str | None = None
    tags: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # the run's key in summary.json (``name`` unless two runs share it)

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of ``key`` in step order, over the steps with a finite number for it."""
        return [(s, float(d[key])) for s, d in sorted(self.steps.items()) if _is_number(d.get(key))]

    def unusable_steps(self, key: str) -> list[int]:
        """Steps that logged ``key`` with no finite number (NaN, inf, null)."""
        return [s for s, d in sorted(self.steps.items()) if key in d and not _is_number(d[key])]


@dataclass
class Report:
    summary: dict[str, dict[str, Any]]
    notes: list[str]
    runs: list[Run]
    files: list[Path]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------ reading


def load_jsonl(path: str | Path) -> dict[int, dict[str, Any]]:
    """A FileLogger file as ``{step: merged data}``; a malformed line raises naming file and line."""
    path = Path(path)
    steps: dict[int, dict[str, Any]] = {}
    for lineno, record in read_jsonl(path):
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)
                and not isinstance(record["step"], bool) and isinstance(record.get("data"), dict)):
            raise ValueError(f"{path}:{lineno}: expected a FileLogger record "
                             '{"step": int, "data": {...}}, got ' + json.dumps(record)[:80])
        steps.setdefault(record["step"], {}).update(record["data"])
    return steps


def _load_jsonl_run(path: Path) -> Run:
    meta_path = path.with_name(path.stem + ".meta.json")
    meta: dict[str, Any] = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path}: not valid JSON ({err.msg})") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{meta_path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    text = {k: meta[k] if isinstance(meta.get(k), str) and meta[k] else None for k in ("group", "variant", "project")}
    return Run(path.stem, load_jsonl(path), str(path), "jsonl", meta=meta, **text)


def _wandb_core() -> str:
    """The wandb-core binary of the installed wandb (found without importing wandb)."""
    import importlib.util

    spec = importlib.util.find_spec("wandb")
    if spec is None or not spec.origin:
        raise RuntimeError("reading W&B runs needs the wandb package (pip install wandb)")
    core = Path(spec.origin).parent / "bin" / "wandb-core"
    if not core.is_file():
        raise RuntimeError(f"reading W&B runs needs wandb's wandb-core binary, not found at {core}")
    return str(core)


def load_wandb_run(path: str | Path) -> tuple[Run, list[str]]:
    """One W&B run (a ``run-*.wandb`` file or the directory holding it) and notes on reading it.

    Reads the transaction log with ``wandb-core leet inspect --json``; raises ``ValueError``
    naming the file when wandb cannot read it.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("run-*.wandb"))
        if len(found) != 1:
            raise ValueError(f"{path}: expected one run-*.wandb file in a W&B run directory, found {len(found)}")
        path = found[0]
    path = path.resolve()
    cmd = [_wandb_core(), "leet", "inspect", "--no-observability", "--json", "--run-file", str(path),
           str(path.parent.parent)]
    info: dict[str, Any] = {}
    steps: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as stderr, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, encoding="utf-8",
                             errors="replace") as proc:
        try:
            for line in proc.stdout:
                head = line[:60]  # {"num":N,"type":"...": skip console output and stats unparsed
                if '"type":"history"' in head:
                    history = json.loads(line)["history"]
                    item = history.get("item", {})
                    step = item.get("_step", history.get("step", {}).get("num", 0))
                    steps.setdefault(int(step), {}).update(item)
                elif '"type":"run"' in head:
                    info.update({k: v for k, v in json.loads(line)["run"].items() if v not in ("", None)})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            proc.kill()
            raise ValueError(f"{path}: unexpected record from wandb's reader ({err!r})") from None
        proc.wait()
        stderr.seek(0)
        err = stderr.read().strip()
    if proc.returncode != 0:
        why = err or f"wandb-core exited with {proc.returncode}"
        raise ValueError(f"{path}: wandb cannot read this W&B run: {why}")
    if not info:
        raise ValueError(f"{path}: no run record in this W&B run")
    notes = [f"`{path}`: {err.splitlines()[-1]}"] if err else []
    name = info.get("display_name") or info.get("run_id") or path.stem
    group = info.get("run_group")
    variant = info.get("job_type")
    if variant is None and group and name.startswith(f"{group}-"):
        variant = name[len(group) + 1:]  # verl_r3's runs are named <group>-<variant>
    tags = tuple(str(t) for t in info.get("tags") or ())
    return Run(name, steps, str(path), "wandb", group=group, variant=variant, project=info.get("project"),
               tags=tags), notes


def _wandb_files(directory: Path) -> list[Path]:
    """The ``run-*.wandb`` files of a W&B run directory, a ``wandb/`` directory, WANDB_DIR or its parent."""
    patterns = ("run-*.wandb", "*/run-*.wandb", "wandb/*/run-*.wandb", "wandb/wandb/*/run-*.wandb")
    found: dict[Path, None] = {}
    for pattern in patterns:
        for p in sorted(directory.glob(pattern)):
            if "latest-run" not in p.relative_to(directory).parts[:-1]:  # a link to a run seen beside it
                found.setdefault(p.resolve())
    return list(found)


def find_runs(path: str | Path) -> tuple[list[Path], list[Path]]:
    """The ``.jsonl`` files and ``.wandb`` files ``path`` stands for; raises when it holds no run."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".jsonl":
            return [path], []
        if path.suffix == ".wandb":
            return [], [path.resolve()]
        raise ValueError(f"{path}: not a verl FileLogger .jsonl file, a W&B run-*.wandb file or a directory")
    jsonl = sorted(path.glob("*.jsonl"))
    wandb_files = _wandb_files(path)
    if not jsonl and not wandb_files:
        raise FileNotFoundError(f"{path}: no run in it: no *.jsonl file, and no W&B run (run-*.wandb) in it, "
                                "in its subdirectories or under wandb/")
    return jsonl, wandb_files


def _names_match(jsonl_run: Run, wandb_run: Run) -> bool:
    stem = jsonl_run.name
    return stem in (wandb_run.name, wandb_run.variant) or wandb_run.name.endswith(f"-{stem}")


def _same_history(a: Run, b: Run) -> bool:
    """Whether ``a`` and ``b`` agree on every number both logged at a step both logged (at least one)."""
    shared = 0
    for step in a.steps.keys() & b.steps.keys():
        da, db = a.steps[step], b.steps[step]
        for key in da.keys() & db.keys():
            x, y = da[key], db[key]
            if key.startswith("_") or not (_is_number(x) and _is_number(y)):
                continue
            if not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12):
                return False
            shared += 1
    return shared > 0


def _merge_duplicates(runs: list[Run], prefer: str) -> tuple[list[Run], list[str]]:
    """Each run once: of a ``.jsonl`` run and a W&B run holding the same run, only the preferred one."""
    pairs: list[tuple[Run, Run]] = []
    paired: set[int] = set()
    dropped: set[int] = set()
    wandb_runs = [r for r in runs if r.kind == "wandb"]
    for j in (r for r in runs if r.kind == "jsonl"):
        w = next((w for w in wandb_runs if id(w) not in paired and _names_match(j, w) and _same_history(j, w)), None)
        if w is None:
            continue
        pairs.append((j, w))
        paired.add(id(w))
        keep, other = (j, w) if prefer == "jsonl" else (w, j)
        dropped.add(id(other))
        for attr in ("group", "variant", "project"):
            setattr(keep, attr, getattr(keep, attr) or getattr(other, attr))
        keep.meta = {**other.meta, **keep.meta}
    notes = []
    if pairs:
        which = "the .jsonl file" if prefer == "jsonl" else "the W&B run"
        listed = ", ".join(f"`{Path(j.source).name}` = `{Path(w.source).parent.name}`" for j, w in pairs)
        notes.append(f"{len(pairs)} run(s) found both as a .jsonl file and as a W&B run, each reported once, "
                     f"read from {which}: {listed}.")
    return [r for r in runs if id(r) not in dropped], notes


def load_runs(paths: Iterable[str | Path], *, prefer: str = "jsonl") -> tuple[list[Run], list[str]]:
    """The runs of every path (see the module's docstring) in order, each run once, and notes."""
    if prefer not in ("jsonl", "wandb"):
        raise ValueError(f"prefer must be 'jsonl' or 'wandb', got {prefer!r}")
    runs: list[Run] = []
    notes: list[str] = []
    seen: set[Path] = set()
    for path in paths:
        jsonl_files, wandb_files = find_runs(path)
        for f in jsonl_files:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                runs.append(_load_jsonl_run(f))
        loaded = []
        for f in wandb_files:
            if f not in seen:
                seen.add(f)
                run, run_notes = load_wandb_run(f)
                loaded.append(run)
                notes += run_notes
        runs += sorted(loaded, key=lambda r: (r.group or "", r.name))
    runs, merge_notes = _merge_duplicates(runs, prefer)
    _label(runs)
    return runs, notes + merge_notes


def _label(runs: list[Run]) -> None:
    """Unique keys for summary.json: a shared name gets its group, else its directory, else a number."""
    def clashes() -> set[str]:
        labels = [r.label for r in runs]
        return {x for x in labels if labels.count(x) > 1}

    for prefix in (lambda r: r.group, lambda r: Path(r.source).parent.name):
        shared = clashes()
        for r in runs:
            if r.label in shared and prefix(r):
                r.label = f"{prefix(r)}/{r.name}"
    seen: dict[str, int] = {}
    for r in runs:
        if r.label in clashes():
            seen[r.label] = seen.get(r.label, 0) + 1
            r.label = f"{r.label} #{seen[r.label]}"


# --------------------------------------------------------------------------------- summarizing


def _resolve_key(run: Run, key: str) -> tuple[str | None, str | None]:
    """The key ``run`` logged ``key``'s figure under, and a note template (``{runs}``) when it is a fallback."""
    legacy = "actor/" + key if key.startswith(keys.PREFIX) else None
    candidates = [(key, None), (legacy, f"verl_r3's metrics read under their former names `actor/{keys.PREFIX}...` "
                                        f"(no `{keys.PREFIX}...` keys) for {{runs}}.")]
    if key == keys.K3_KL:
        candidates.append((keys.VERL_K3_KL,
                           f"`{key}` not logged by {{runs}}: k3 KL read from verl's `{keys.VERL_K3_KL}`."))
    for candidate, note in candidates:
        if candidate and run.series(candidate):
            return candidate, note
    return None, None


class _Notes(dict):
    """Note template (with ``{runs}``) -> labels of the runs it applies to: one note for all of them."""

    def add(self, template: str, run: Run) -> None:
        labels = self.setdefault(template, [])
        if run.label not in labels:
            labels.append(run.label)

    def merge(self, other: _Notes) -> None:
        for template, labels in other.items():
            self.setdefault(template, []).extend(x for x in labels if x not in self[template])

    def lines(self) -> list[str]:
        return [t.replace("{runs}", ("run " if len(labels) == 1 else "runs ") + ", ".join(f"`{x}`" for x in labels))
                for t, labels in self.items()]


def _summarize_run(run: Run) -> tuple[dict[str, Any], _Notes]:
    notes = _Notes()

    def values(key: str, fields: str | None) -> list[float]:
        """``key``'s values (or its fallback's); when absent, a note that ``fields`` are n/a unless None."""
        used, note = _resolve_key(run, key)
        if used is None:
            if fields and run.unusable_steps(key):
                notes.add(f"`{key}` of {{runs}} is never a finite number: {fields} n/a.", run)
            elif fields:
                notes.add(f"`{key}` not logged by {{runs}}: {fields} n/a.", run)
            return []
        if note:
            notes.add(note, run)
        bad = run.unusable_steps(used)
        if bad:
            notes.add(f"`{used}` is not a finite number at step(s) {', '.join(map(str, bad))} of {{runs}}: "
                      "left out.", run)
        return [v for _, v in run.series(used)]

    out: dict[str, Any] = {"run": run.name, "group": run.group, "variant": run.variant, "project": run.project,
                           "source": run.source}
    trained = {s for key in (keys.REWARD, keys.STEP_TIME) for s, _ in run.series(key)}
    meta_steps = run.meta.get("steps")
    if trained:
        out["steps"] = len(trained)
    elif isinstance(meta_steps, int) and not isinstance(meta_steps, bool):
        out["steps"] = meta_steps
    else:
        out["steps"] = None
        notes.add(f"no training step logged by {{runs}} (no `{keys.REWARD}`, no `{keys.STEP_TIME}`): steps n/a.", run)
    rewards = values(keys.REWARD, "final_reward, best_reward are")
    out["final_reward"] = rewards[-1] if rewards else None
    out["best_reward"] = max(rewards) if rewards else None
    k3 = values(keys.K3_KL, "first_k3_kl, mean_k3_kl are")
    out["first_k3_kl"] = k3[0] if k3 else None
    for name, key in _MEAN_FIELDS.items():
        series = k3 if key == keys.K3_KL else values(key, f"{name} is")
        out[name] = statistics.fmean(series) if series else None
    times = values(keys.STEP_TIME, None)
    meta_time = run.meta.get("seconds_per_step")
    if times:
        out["seconds_per_step"] = statistics.median(times[1:] if len(times) > 1 else times)
    elif _is_number(meta_time):
        out["seconds_per_step"] = float(meta_time)
        notes.add(f"`{keys.STEP_TIME}` not logged by {{runs}}: seconds_per_step from `<stem>.meta.json`.", run)
    else:
        out["seconds_per_step"] = None
        notes.add(f"`{keys.STEP_TIME}` not logged by {{runs}}: seconds_per_step n/a.", run)
    return {f: out[f] for f in SUMMARY_FIELDS}, notes


def summarize_run(run: Run) -> tuple[dict[str, Any], list[str]]:
    """The summary figures of one run (``SUMMARY_FIELDS``) and notes on missing or replaced metrics."""
    figures, notes = _summarize_run(run)
    return figures, notes.lines()


def summarize(runs: Sequence[Run]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``{run label: figures}`` of every run, and the notes of all of them (one per cause, naming its runs)."""
    summary: dict[str, dict[str, Any]] = {}
    notes = _Notes()
    for run in runs:
        summary[run.label], run_notes = _summarize_run(run)
        notes.merge(run_notes)
    return summary, notes.lines()


# ----------------------------------------------------------------------------------- rendering


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def render_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """The markdown table: one row per run (its summary.json key first), the columns of ``COLUMNS``."""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |",
             "|" + "---|" * 3 + "---:|" * (len(COLUMNS) - 3)]
    for label, figures in summary.items():
        cells = [_cell(label)] + [_cell(figures[f]) for f, _ in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(summary: Mapping[str, Mapping[str, Any]], notes: Sequence[str], *, title: str = _TITLE,
                    legend: Mapping[str, str] = LEGEND) -> str:
    """report.md: the title, the table, its legend and the notes."""
    parts = [f"# {title}", "", render_table(summary), "", "## Columns", "", *(f"- {t}" for t in legend.values()), ""]
    if notes:
        parts += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(parts)


def plot_curves(runs: Sequence[Run], path: str | Path) -> None:
    """curves.png: the ``PANELS`` over steps, one line per run, one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colours: dict[str, str] = {}
    styles: dict[str, str] = {}
    per_variant: dict[str, int] = {}
    for run in runs:  # runs of one variant (other groups) share its colour, told apart by the line style
        variant = run.variant or run.label
        colours.setdefault(variant, f"C{len(colours) % 10}")
        styles[run.label] = ("-", "--", ":", "-.")[per_variant.get(variant, 0) % 4]
        per_variant[variant] = per_variant.get(variant, 0) + 1
    ncol = min(len(runs), 5)
    rows = -(-len(runs) // ncol) if runs else 0
    height = 7.0 + 0.25 * rows
    fig, axes = plt.subplots(2, 2, figsize=(11, height))
    handles = {}
    for ax, (key, title) in zip(axes.flat, PANELS):
        for run in runs:
            used, _ = _resolve_key(run, key)
            points = run.series(used) if used else []
            if points:
                xs, ys = zip(*points)
                (handles[run.label],) = ax.plot(xs, ys, marker="." if len(points) < 30 else None, label=run.label,
                                                color=colours[run.variant or run.label], linestyle=styles[run.label])
            else:
                ax.text(0.02, 0.98 - 0.05 * runs.index(run), f"{run.label}: n/a, not logged", fontsize=7,
                        ha="left", va="top", transform=ax.transAxes, color="0.4")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    legend_space = (0.15 + 0.22 * rows) / height  # one legend for all panels, below them
    if handles:
        shown = [r.label for r in runs if r.label in handles]
        fig.legend([handles[label] for label in shown], shown, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_space, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(paths: Iterable[str | Path], out_dir: str | Path, *, prefer: str = "jsonl", title: str = _TITLE,
                 legend: Mapping[str, str] = LEGEND) -> Report:
    """Read the runs of ``paths`` and write report.md, summary.json and curves.png into ``out_dir``."""
    runs, notes = load_runs(paths, prefer=prefer)
    summary, run_notes = summarize(runs)
    notes += run_notes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / name for name in _WRITTEN]
    files[0].write_text(render_markdown(summary, notes, title=title, legend=legend), encoding="utf-8")
    files[1].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_curves(runs, files[2])
    return Report(summary, notes, runs, files)


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``verl-r3 report``."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a verl FileLogger .jsonl file, a directory of them (a quickstart run), a W&B run "
                             "directory or .wandb file, or a directory holding W&B runs (wandb/ or its parent)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory to write report.md, summary.json and curves.png into")
    parser.add_argument("--prefer", choices=("jsonl", "wandb"), default="jsonl",
                        help="source of a run found both as a .jsonl file and as a W&B run (default jsonl)")


def main(args: argparse.Namespace) -> int:
    """Write the report of ``args.run_dirs`` into ``args.out`` and print its table and notes."""
    try:
        report = write_report(args.run_dirs, args.out, prefer=args.prefer)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"verl-r3 report: error: {err}", file=sys.stderr)
        return 2
    print(render_table(report.summary))
    if report.notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in report.notes))
    print("\nwrote " + ", ".join(os.fspath(f) for f in report.files))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m verl_r3.report", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
