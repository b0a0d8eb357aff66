"""verl_r3.wandb_dashboard: the workspace's sections, panels and the keys they plot (all from
verl_r3.keys), grouping by job type, and the spec save() would send, built and re-read offline."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import wandb_workspaces.workspaces as ws
from wandb_workspaces.workspaces import internal

from verl_r3 import keys, wandb_dashboard

ROOT = Path(__file__).resolve().parents[1]

#: Every key verl runs with verl_r3 log, read off verl_r3.keys (its upper-case string constants but
#: the prefixes, and the F(tau) family): a key added there is covered here without an edit.
LOGGED = {value for name, value in vars(keys).items()
          if name.isupper() and isinstance(value, str) and not name.endswith("PREFIX")}
LOGGED |= set(keys.EXTREME_FRAC.values())
LAYER_KEYS = {keys.router_disagree_layer(i) for i in range(128)}

#: What the dashboard is meant to plot, one by one.
INTENDED = {
    keys.REWARD, keys.STEP_TIME,
    keys.K3_KL, keys.VERL_K3_KL, keys.EXTREME_FRAC_2,
    keys.ROUTER_DISAGREE, keys.ROUTER_DISAGREE_TOKEN, keys.ROUTER_DISAGREE_REPLAYED,
    keys.REPLAY_ACTIVE_FRAC, keys.FALLBACK_FRAC, keys.METRICS_TIME_FRAC,
}


def _panels(workspace):
    return [(section.name, panel) for section in workspace.sections for panel in section.panels]


def _spec_panels(spec: dict):
    return [(s["name"], p) for s in spec["section"]["panelBankConfig"]["sections"] for p in s["panels"]]


def test_logged_keys_are_read_off_verl_r3_keys():
    assert {keys.K3_KL, keys.REWARD, keys.STEP_TIME, keys.VERL_K3_KL, keys.extreme_frac(10.0)} <= LOGGED
    assert keys.PREFIX not in LOGGED and keys.ROUTER_DISAGREE_LAYER_PREFIX not in LOGGED


def test_workspace_plots_exactly_the_intended_keys_and_the_layer_regex():
    workspace = wandb_dashboard.build_workspace("ent", "proj")
    plotted = {key for _, panel in _panels(workspace) for key in panel.y}
    regexes = {panel.metric_regex for _, panel in _panels(workspace) if panel.metric_regex}
    assert plotted == INTENDED
    assert plotted <= LOGGED
    assert regexes == {wandb_dashboard.LAYER_REGEX}
    (layer_panel,) = [p for _, p in _panels(workspace) if p.metric_regex]
    assert layer_panel.y == []  # the regex alone chooses its lines


def test_layer_regex_matches_every_layer_key_and_no_other_logged_key():
    pattern = re.compile(wandb_dashboard.LAYER_REGEX)
    assert all(pattern.search(key) for key in LAYER_KEYS)
    assert keys.router_disagree_layer(3) == "r3/router_disagree_layer/03"
    assert not [key for key in LOGGED if pattern.search(key)]
    for near_miss in ("r3/router_disagree_layer/3", "r3/router_disagree_layer/", "actor/r3/router_disagree_layer/03",
                      "r3/router_disagree_layer/03/x", "r3/router_disagree_layerX03"):
        assert not pattern.search(near_miss), near_miss


def test_sections_and_panels():
    workspace = wandb_dashboard.build_workspace("ent", "proj")
    assert [s.name for s in workspace.sections] == ["Training", "Rollout vs trainer mismatch", "Router disagreement",
                                                    "Replay"]
    assert all(s.is_open for s in workspace.sections)
    by_title = {panel.title: set(panel.y) for _, panel in _panels(workspace)}
    assert by_title["Reward"] == {keys.REWARD}
    assert by_title["Step time"] == {keys.STEP_TIME}
    assert by_title["k3 KL (rollout || trainer)"] == {keys.K3_KL, keys.VERL_K3_KL}
    assert by_title["Metrics cost (share of step time)"] == {keys.METRICS_TIME_FRAC}
    assert by_title["Replayed and fallback fractions"] == {keys.REPLAY_ACTIVE_FRAC, keys.FALLBACK_FRAC}
    assert len(by_title) == len(wandb_dashboard.PANELS) == 9
    assert all(type(panel).__name__ == "LinePlot" and panel.x == "Step" for _, panel in _panels(workspace))


def test_runs_grouped_by_job_type_and_filtered_by_group():
    workspace = wandb_dashboard.build_workspace("ent", "proj", group="20250512-101500")
    assert [g.name for g in workspace.runset_settings.groupby] == ["JobType"]
    (runset,) = wandb_dashboard.workspace_spec(workspace)["section"]["runSets"]
    assert runset["grouping"] == [{"section": "run", "name": "jobType"}]
    assert runset["filters"]["filters"] == [{"key": {"section": "run", "name": "group"}, "op": "=",
                                             "value": "20250512-101500", "disabled": False}]
    (everything,) = wandb_dashboard.workspace_spec(wandb_dashboard.build_workspace("ent", "proj"))["section"]["runSets"]
    assert everything["filters"]["filters"] == [] and everything["grouping"] == runset["grouping"]


def test_spec_is_what_save_sends_and_reads_back():
    workspace = wandb_dashboard.build_workspace("ent", "proj", name="R3 math", group="g1")
    view = workspace._to_model()
    assert (view.entity, view.project, view.display_name) == ("ent", "proj", "R3 math")
    text = view.spec.model_dump_json(by_alias=True, exclude_none=True)  # save()'s `spec` argument
    spec = json.loads(text)
    assert spec == wandb_dashboard.workspace_spec(workspace)
    assert spec["section"]["settings"]["xAxis"] == "_step"
    panels = _spec_panels(spec)
    assert {p["viewType"] for _, p in panels} == {"Run History Line Plot"}
    assert all(p["config"]["xAxis"] == "_step" for _, p in panels)
    assert {m for _, p in panels for m in p["config"]["metrics"]} == INTENDED
    regex_panels = [p["config"] for _, p in panels if p["config"].get("useMetricRegex")]
    assert [c["metricRegex"] for c in regex_panels] == [wandb_dashboard.LAYER_REGEX]
    # the library's own loader (what Workspace.from_url runs on a saved view) reads it back
    loaded = ws.Workspace._from_model(internal.View(entity="ent", project="proj", display_name="R3 math", name="nw-x",
                                                    id="", spec=internal.WorkspaceViewspec.model_validate_json(text)))
    def summary(w):  # a loaded panel's y holds wr.Metric objects, a built one plain names
        return [(s, p.title, [getattr(m, "name", m) for m in p.y], p.metric_regex) for s, p in _panels(w)]

    assert summary(loaded) == summary(workspace)
    assert [g.name for g in loaded.runset_settings.groupby] == ["JobType"]


@pytest.mark.parametrize("kwargs, match", [
    ({"entity": ""}, "entity must be a non-empty string"),
    ({"entity": "my team"}, "entity must not contain whitespace"),
    ({"project": "a/b"}, "W&B project must be"),
    ({"group": "it's"}, "W&B group must be"),
    ({"group": ""}, "W&B group must be"),
    ({"name": "  "}, "name must be a non-empty string"),
    ({"name": "R3 \N{ROCKET}"}, "invalid W&B workspace"),
])
def test_bad_input_raises_value_error(kwargs, match):
    args = {"entity": "ent", "project": "proj", **kwargs}
    with pytest.raises(ValueError, match=match):
        wandb_dashboard.build_workspace(args.pop("entity"), args.pop("project"), **args)


# ------------------------------------------------------------------------------------------- CLI


def _args(*argv: str) -> argparse.Namespace:
    return wandb_dashboard.add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_dry_run_prints_the_panels(capsys):
    assert wandb_dashboard.main(_args("--entity", "ent", "--project", "proj", "--group", "g1", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "runs grouped by JobType" in out and "'g1'" in out
    assert all(key in out for key in INTENDED) and wandb_dashboard.LAYER_REGEX in out


def test_dry_run_json_is_the_spec(capsys):
    assert wandb_dashboard.main(_args("--entity", "ent", "--project", "proj", "--dry-run", "--json")) == 0
    spec = json.loads(capsys.readouterr().out)
    assert {m for _, p in _spec_panels(spec) for m in p["config"]["metrics"]} == INTENDED


def test_cli_errors(capsys, monkeypatch):
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    assert wandb_dashboard.main(_args("--project", "proj", "--dry-run")) == 2
    assert "pass --entity or set WANDB_ENTITY" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_ENTITY", "ent")
    assert wandb_dashboard.main(_args("--project", "proj", "--dry-run")) == 0  # the default comes from the env
    assert wandb_dashboard.main(_args("--project", "proj", "--json")) == 2
    assert "--json goes with --dry-run" in capsys.readouterr().err
    assert wandb_dashboard.main(_args("--entity", "ent", "--project", "p q", "--dry-run")) == 2
    assert "W&B project must be" in capsys.readouterr().err


def test_save_without_a_key_says_to_log_in(capsys, monkeypatch, tmp_path):
    for name in [k for k in os.environ if k.startswith("WANDB_") or k == "NETRC"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_dashboard.main(_args("--entity", "ent", "--project", "proj")) == 1
    err = capsys.readouterr().err
    assert "no W&B API key for https://api.wandb.ai" in err and "wandb login" in err


def test_save_failure_is_reported_not_raised(tmp_path):
    """A key but no reachable server (a closed local port): save() fails inside the W&B client."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(tmp_path), WANDB_API_KEY="k" * 40, WANDB_BASE_URL="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, "-m", "verl_r3.wandb_dashboard", "--entity", "ent", "--project", "proj"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert "could not save the workspace to http://127.0.0.1:9" in proc.stderr
    assert "network access to the W&B server" in proc.stderr and "Traceback" not in proc.stderr


def test_save_gives_up_on_a_server_that_never_answers(tmp_path):
    """A server that accepts connections and never replies: the command exits at --timeout, not later."""
    import socket
    import time

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
        env.update(HOME=str(tmp_path), WANDB_API_KEY="k" * 40,
                   WANDB_BASE_URL=f"http://127.0.0.1:{server.getsockname()[1]}")
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "verl_r3.wandb_dashboard", "--entity", "ent", "--project", "proj",
                               "--timeout", "5"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no answer from the W&B server within 5 s (--timeout)" in proc.stderr
    assert elapsed < 60, elapsed  # the client and its service were killed at the timeout


def test_timeout_must_be_positive(capsys):
    assert wandb_dashboard.main(_args("--entity", "ent", "--project", "proj", "--timeout", "0")) == 2
    assert "--timeout must be > 0" in capsys.readouterr().err
