"""``verl-r3 wandb-dashboard``: a saved W&B workspace comparing R3 with its baselines.

    verl-r3 wandb-dashboard --entity E --project P [--group G] [--name NAME] [--dry-run [--json]]

The workspace (built with ``wandb-workspaces``) groups the project's runs by job type -- the
variant, as ``verl_r3.wandb_naming`` names runs -- so each variant is one line (the mean of its
runs, min-max band), x axis = training step (verl logs every metric with ``step=global_steps``).
``--group G`` keeps only the runs of one launch (W&B run group ``G``); without it, every run of
the project joins its variant's line.

Panels (every key comes from ``verl_r3.keys``, the names runs log):

- Training: reward (``critic/score/mean``), step time (``timing_s/step``).
- Rollout vs trainer mismatch: k3 KL (``r3/k3_kl`` with verl's ``rollout_corr/k3_kl``, logged when
  verl's rollout correction is on), F(2) (``r3/extreme_frac_2``).
- Router disagreement: overall (``r3/router_disagree``, ``r3/router_disagree_token``), for the
  experts the trainer used (``r3/router_disagree_replayed``; 0 under R3), and per decoder layer
  (every ``r3/router_disagree_layer/NN`` key, through the panel's metric regex
  :data:`LAYER_REGEX`, so any number of layers is plotted).
- Replay: replayed and fallback fractions (``r3/replay_active_frac``, ``r3/fallback_frac``),
  metrics cost (``r3/metrics_time_frac``, the share of ``timing_s/step`` spent on these figures).

``build_workspace`` builds the ``wandb_workspaces.workspaces.Workspace`` and touches no network;
``main`` saves it (``Workspace.save()``: needs ``wandb login`` or ``WANDB_API_KEY`` and access to
the W&B server) and prints its URL. Saving runs in a child process under ``--timeout`` (120 s by
default): the W&B client can wait on an unreachable server for much longer, and its exit handlers
can hang after a failed request. ``--dry-run`` prints the panels instead, ``--dry-run --json``
the workspace spec that saving would send.

The CLI parser is cheap to build: ``wandb_workspaces`` is imported only when a workspace is built.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

from verl_r3 import keys, wandb_naming
from verl_r3.child import run_child

__all__ = ["DEFAULT_NAME", "LAYER_REGEX", "PANELS", "PanelSpec", "add_arguments", "build_workspace", "main",
           "panel_table", "save_workspace", "workspace_spec"]

DEFAULT_NAME = "R3 vs baselines"
DEFAULT_SAVE_TIMEOUT_S = 120.0

#: Matches every ``r3/router_disagree_layer/NN`` key (two digits or more) and nothing else verl_r3 logs.
LAYER_REGEX = "^" + re.escape(keys.ROUTER_DISAGREE_LAYER_PREFIX) + r"[0-9]{2,}$"


@dataclass(frozen=True)
class PanelSpec:
    section: str
    title: str
    keys: tuple[str, ...] = ()
    regex: str | None = None
    y_title: str | None = None


PANELS: tuple[PanelSpec, ...] = (
    PanelSpec("Training", "Reward", (keys.REWARD,), y_title="mean score"),
    PanelSpec("Training", "Step time", (keys.STEP_TIME,), y_title="seconds"),
    PanelSpec("Rollout vs trainer mismatch", "k3 KL (rollout || trainer)", (keys.K3_KL, keys.VERL_K3_KL)),
    PanelSpec("Rollout vs trainer mismatch", "F(2): share of tokens with ratio outside [1/2, 2]",
              (keys.EXTREME_FRAC_2,)),
    PanelSpec("Router disagreement", "Router disagreement (token-layer pairs, tokens)",
              (keys.ROUTER_DISAGREE, keys.ROUTER_DISAGREE_TOKEN)),
    PanelSpec("Router disagreement", "Disagreement of the experts the trainer used (0 under R3)",
              (keys.ROUTER_DISAGREE_REPLAYED,)),
    PanelSpec("Router disagreement", "Router disagreement per layer", regex=LAYER_REGEX),
    PanelSpec("Replay", "Replayed and fallback fractions", (keys.REPLAY_ACTIVE_FRAC, keys.FALLBACK_FRAC)),
    PanelSpec("Replay", "Metrics cost (share of step time)", (keys.METRICS_TIME_FRAC,)),
)


def _require(name: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if value != value.strip():
        raise ValueError(f"{name} must not start or end with whitespace, got {value!r}")
    return value


def build_workspace(entity: str, project: str, *, name: str = DEFAULT_NAME, group: str | None = None):
    """The workspace (``wandb_workspaces.workspaces.Workspace``, not saved; no network)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    if re.search(r"[\s/]", _require("entity", entity)):
        raise ValueError(f"entity must not contain whitespace or '/', got {entity!r}")
    wandb_naming.check_name("project", project)
    _require("name", name)
    if group is not None:
        wandb_naming.check_name("group", group)  # also keeps the run filter free of quotes
    sections: dict[str, list] = {}
    for spec in PANELS:
        sections.setdefault(spec.section, []).append(wr.LinePlot(
            title=spec.title, x="Step", y=list(spec.keys), metric_regex=spec.regex, title_x="step",
            title_y=spec.y_title, groupby_aggfunc="mean", groupby_rangefunc="minmax"))
    try:
        return ws.Workspace(
            entity=entity,
            project=project,
            name=name,
            sections=[ws.Section(name=title, panels=panels, is_open=True) for title, panels in sections.items()],
            settings=ws.WorkspaceSettings(x_axis="Step", max_runs=50),
            runset_settings=ws.RunsetSettings(
                groupby=[ws.Metric("JobType")],
                filters=[ws.Metric("Group") == group] if group is not None else "",
            ),
        )
    except Exception as exc:  # pydantic's validation error, e.g. an emoji in the name
        raise ValueError(f"invalid W&B workspace: {exc}") from exc


def workspace_spec(workspace) -> dict:
    """The view spec ``Workspace.save()`` sends (its ``spec`` argument), as a dict; no network."""
    return json.loads(workspace._to_model().spec.model_dump_json(by_alias=True, exclude_none=True))


def panel_table(workspace) -> str:
    """One line per panel: section, title, the keys (or regex) it plots."""
    lines = [f"workspace {workspace.name!r} in {workspace.entity}/{workspace.project}; runs grouped by "
             f"{', '.join(g.name for g in workspace.runset_settings.groupby)}"
             + (f"; filter: {workspace.runset_settings.filters}" if workspace.runset_settings.filters else "")
             + f"; x axis {workspace.settings.x_axis}"]
    for section in workspace.sections:
        lines.append(f"[{section.name}]")
        for panel in section.panels:
            plotted = list(panel.y) + ([f"regex {panel.metric_regex}"] if panel.metric_regex else [])
            lines.append(f"  {panel.title}: {', '.join(map(str, plotted))}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``wandb-dashboard`` options (cheap: imports nothing from W&B)."""
    parser.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"),
                        help="W&B entity (user or team) owning the project (default: $WANDB_ENTITY)")
    parser.add_argument("--project", required=True, help="W&B project of the runs (trainer.project_name)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"workspace name (default {DEFAULT_NAME!r})")
    parser.add_argument("--group", default=None, help="only the runs of this W&B run group (one launch)")
    parser.add_argument("--dry-run", action="store_true", help="print the panels, save nothing (no network)")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the workspace spec as JSON")
    parser.add_argument("--timeout", type=float, default=DEFAULT_SAVE_TIMEOUT_S,
                        help=f"seconds to wait for the W&B server when saving (default {DEFAULT_SAVE_TIMEOUT_S:.0f})")
    return parser


def _save_child() -> None:
    """Child side of :func:`save_workspace`: build, save, print ``{"url"}`` or ``{"error"}``, exit at once.

    ``os._exit`` skips the W&B client's exit handlers, which wait on its service process and can
    outlast any timeout after a failed request.
    """
    args = json.loads(sys.argv[1])
    try:
        workspace = build_workspace(args["entity"], args["project"], name=args["name"], group=args["group"])
        workspace.save()
        out = {"url": workspace.url}
    except Exception as exc:  # network, authentication, permission: whatever the W&B client raises
        out = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)


def save_workspace(entity: str, project: str, *, name: str = DEFAULT_NAME, group: str | None = None,
                   timeout_s: float = DEFAULT_SAVE_TIMEOUT_S) -> str:
    """Save the workspace in a child process; returns its URL.

    Raises ``RuntimeError`` with the W&B client's error, or when no answer came within
    ``timeout_s`` (the child and the W&B service it started are then killed).
    """
    payload = json.dumps({"entity": entity, "project": project, "name": name, "group": group})
    cmd = [sys.executable, "-c", "from verl_r3.wandb_dashboard import _save_child; _save_child()", payload]
    # The child's process group holds the W&B service process (wandb-core) too.
    child = run_child(cmd, timeout_s=timeout_s, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if child.timed_out:
        raise RuntimeError(f"no answer from the W&B server within {timeout_s:g} s (--timeout)")
    out, err = child.stdout, child.stderr
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"the W&B client exited with {child.returncode}: {(err or '').strip()[-2000:]}") from None
    if "error" in result:
        raise RuntimeError(result["error"])
    return result["url"]


def main(args: argparse.Namespace) -> int:
    prog = "verl-r3 wandb-dashboard"
    if not args.entity:
        print(f"{prog}: error: no W&B entity: pass --entity or set WANDB_ENTITY", file=sys.stderr)
        return 2
    if args.json and not args.dry_run:
        print(f"{prog}: error: --json goes with --dry-run", file=sys.stderr)
        return 2
    if not args.timeout > 0:
        print(f"{prog}: error: --timeout must be > 0, got {args.timeout:g}", file=sys.stderr)
        return 2
    try:
        workspace = build_workspace(args.entity, args.project, name=args.name, group=args.group)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(workspace_spec(workspace), indent=2) if args.json else panel_table(workspace))
        return 0

    host = wandb_naming.wandb_host()
    if not wandb_naming.api_key_available():
        print(f"{prog}: error: no W&B API key for {host}: run `wandb login` (or set WANDB_API_KEY) and retry; "
              "--dry-run shows the workspace without saving", file=sys.stderr)
        return 1
    try:
        url = save_workspace(args.entity, args.project, name=args.name, group=args.group, timeout_s=args.timeout)
    except RuntimeError as exc:
        print(f"{prog}: error: could not save the workspace to {host} ({exc}). Saving needs "
              f"network access to the W&B server, a valid API key (`wandb login`) and write access to "
              f"{args.entity}/{args.project}.", file=sys.stderr)
        return 1
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main(add_arguments(argparse.ArgumentParser(prog="python -m verl_r3.wandb_dashboard")).parse_args()))
