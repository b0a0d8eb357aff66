"""``verl-r3 report``: verl FileLogger files and real W&B offline runs in, report.md / summary.json / curves.png out.

The W&B runs are made here with wandb itself (offline, in a temporary directory), logging the
keys of ``verl_r3.keys`` the way verl does (``wandb.log(data, step=step)``). Expected figures are
computed from the values logged.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest

from verl_r3 import keys, report

# Two W&B runs of one group, as verl_r3 names them: run name <group>-<variant>, job type = variant.
WANDB_RUNS = {
    "g1-grpo": {
        "variant": "grpo",
        "steps": {
            keys.REWARD: [0.25, 0.5, 0.375],
            keys.K3_KL: [0.004, 0.002, 0.006],
            keys.EXTREME_FRAC_2: [0.01, 0.03, 0.02],
            keys.ROUTER_DISAGREE: [0.1, 0.2, 0.3],
            keys.ROUTER_DISAGREE_REPLAYED: [0.1, 0.2, 0.3],
            keys.REPLAY_ACTIVE_FRAC: [0.0, 0.0, 0.0],
            keys.METRICS_TIME_FRAC: [0.02, 0.01, 0.03],
            keys.STEP_TIME: [30.0, 5.0, 7.0],
            keys.router_disagree_layer(3): [0.2, 0.1, 0.4],
        },
    },
    "g1-grpo_r3": {
        "variant": "grpo_r3",
        "steps": {  # no r3/metrics_time_frac; r3/k3_kl NaN at step 2
            keys.REWARD: [0.125, 0.75, 0.625, 0.5],
            keys.K3_KL: [0.001, math.nan, 0.003, 0.002],
            keys.EXTREME_FRAC_2: [0.0, 0.0, 0.01, 0.0],
            keys.ROUTER_DISAGREE: [0.12, 0.18, 0.24, 0.3],
            keys.ROUTER_DISAGREE_REPLAYED: [0.0, 0.0, 0.0, 0.0],
            keys.REPLAY_ACTIVE_FRAC: [1.0, 1.0, 1.0, 1.0],
            keys.STEP_TIME: [20.0, 4.0, 6.0, 8.0],
        },
    },
}


def _rows(columns: dict[str, list[float]]) -> list[dict[str, float]]:
    n = len(next(iter(columns.values())))
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


@pytest.fixture(scope="module")
def wandb_root(tmp_path_factory):
    """A directory whose ``wandb/`` holds the W&B offline runs of ``WANDB_RUNS`` (made once)."""
    wandb = pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb_root")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("WANDB_RUN_GROUP", raising=False)
        mp.delenv("WANDB_JOB_TYPE", raising=False)
        for name, spec in WANDB_RUNS.items():
            run = wandb.init(project="r3-report-test", name=name, group="g1", job_type=spec["variant"],
                             dir=str(root), mode="offline", config={"variant": spec["variant"]},
                             settings=wandb.Settings(console="off", x_disable_stats=True, x_save_requirements=False,
                                                     disable_git=True))
            run.log({"val-core/acc": 0.5}, step=0)  # verl's validation before training, a step of its own
            for step, row in enumerate(_rows(spec["steps"]), 1):
                run.log(row, step=step)
            run.finish()
        wandb.teardown()
    assert len(list((root / "wandb").glob("offline-run-*/run-*.wandb"))) == len(WANDB_RUNS)
    return root


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _filelogger(columns: dict[str, list[float]]) -> list[dict]:
    return [{"step": s, "data": row} for s, row in enumerate(_rows(columns), 1)]


def _mean(values):
    return statistics.fmean(v for v in values if math.isfinite(v))


# A quickstart-like directory of FileLogger files: ppo_a logs everything (r3/k3_kl absent: verl's
# rollout_corr/k3_kl instead); ppo_b has no router metrics and no step time, and a .meta.json.
JSONL_A = {
    keys.REWARD: [0.1, 0.4, 0.2, 0.3],
    keys.VERL_K3_KL: [0.01, 0.02, 0.04, 0.03],
    keys.EXTREME_FRAC_2: [0.1, 0.0, 0.2, 0.1],
    keys.ROUTER_DISAGREE: [0.3, 0.3, 0.6, 0.2],
    keys.ROUTER_DISAGREE_REPLAYED: [0.0, 0.0, 0.0, 0.0],
    keys.REPLAY_ACTIVE_FRAC: [1.0, 0.5, 1.0, 1.0],
    keys.METRICS_TIME_FRAC: [0.05, 0.01, 0.02, 0.03],
    keys.STEP_TIME: [9.0, 2.0, 4.0, 3.0],
    "actor/pg_loss": [1.0, 2.0, 3.0, 4.0],
}
JSONL_B = {keys.REWARD: [0.6, 0.2], keys.K3_KL: [0.5, 0.25], keys.EXTREME_FRAC_2: [0.0, 0.5]}


@pytest.fixture()
def jsonl_dir(tmp_path):
    d = tmp_path / "jsonl_runs"
    d.mkdir()
    # verl logs the pre-training validation at step 0 on its own line; a step's lines are merged.
    records = [{"step": 0, "data": {"val-core/acc": 0.1}}] + _filelogger(JSONL_A)
    records.insert(3, {"step": 2, "data": {"training/extra": 1.0}})
    _write_jsonl(d / "ppo_a.jsonl", records)
    _write_jsonl(d / "ppo_b.jsonl", _filelogger(JSONL_B))
    (d / "ppo_b.meta.json").write_text(json.dumps({"group": "gB", "variant": "ppo", "seconds_per_step": 1.5}))
    return d


# ---------------------------------------------------------------------------------- FileLogger


def test_jsonl_directory_figures_table_and_notes(jsonl_dir, tmp_path):
    out = tmp_path / "out"
    result = report.write_report([jsonl_dir], out)
    summary = result.summary
    assert list(summary) == ["ppo_a", "ppo_b"]
    assert json.loads((out / "summary.json").read_text()) == summary

    a = summary["ppo_a"]
    assert set(a) == set(report.SUMMARY_FIELDS)
    assert a["steps"] == 4  # step 0 (validation only) is not a training step
    assert a["final_reward"] == JSONL_A[keys.REWARD][-1] and a["best_reward"] == max(JSONL_A[keys.REWARD])
    assert a["first_k3_kl"] == JSONL_A[keys.VERL_K3_KL][0]
    assert a["mean_k3_kl"] == pytest.approx(_mean(JSONL_A[keys.VERL_K3_KL]))
    assert a["mean_extreme_frac_2"] == pytest.approx(_mean(JSONL_A[keys.EXTREME_FRAC_2]))
    assert a["mean_router_disagree"] == pytest.approx(_mean(JSONL_A[keys.ROUTER_DISAGREE]))
    assert a["mean_router_disagree_replayed"] == 0.0
    assert a["mean_replay_active_frac"] == pytest.approx(_mean(JSONL_A[keys.REPLAY_ACTIVE_FRAC]))
    assert a["mean_metrics_time_frac"] == pytest.approx(_mean(JSONL_A[keys.METRICS_TIME_FRAC]))
    assert a["seconds_per_step"] == statistics.median(JSONL_A[keys.STEP_TIME][1:])  # the first step left out
    assert (a["group"], a["variant"], a["source"]) == (None, None, str(jsonl_dir / "ppo_a.jsonl"))

    b = summary["ppo_b"]
    assert (b["group"], b["variant"]) == ("gB", "ppo")  # from ppo_b.meta.json
    assert b["steps"] == 2 and b["final_reward"] == 0.2 and b["best_reward"] == 0.6
    assert b["mean_k3_kl"] == pytest.approx(0.375) and b["mean_extreme_frac_2"] == pytest.approx(0.25)
    assert b["seconds_per_step"] == 1.5  # no timing_s/step: the meta file's figure
    for field in ("mean_router_disagree", "mean_router_disagree_replayed", "mean_replay_active_frac",
                  "mean_metrics_time_frac"):
        assert b[field] is None, field

    text = (out / "report.md").read_text()
    assert "| run | group | variant | steps | final reward | best reward |" in text
    row_b = next(line for line in text.splitlines() if line.startswith("| ppo_b |"))
    assert row_b == "| ppo_b | gB | ppo | 2 | 0.2 | 0.6 | 0.5 | 0.375 | 0.25 | n/a | n/a | n/a | 1.5 | n/a |"
    notes = text.split("## Notes")[1]
    assert f"`{keys.K3_KL}` not logged by run `ppo_a`: k3 KL read from verl's `{keys.VERL_K3_KL}`." in notes
    for key, field in ((keys.ROUTER_DISAGREE, "mean_router_disagree"), (keys.REPLAY_ACTIVE_FRAC,
                                                                         "mean_replay_active_frac")):
        assert f"`{key}` not logged by run `ppo_b`: {field} is n/a." in notes
    assert f"`{keys.STEP_TIME}` not logged by run `ppo_b`: seconds_per_step from `<stem>.meta.json`." in notes
    assert notes.count("`ppo_a`") == 1  # nothing else is missing from ppo_a
    for words in ("k3 KL", "F(2)", "beyond 2 either way", "top-k expert set", "actually used", "metrics cost"):
        assert words in text


def test_null_and_legacy_keys_are_noted(tmp_path):
    legacy = {keys.REWARD: [0.5, 0.25], "actor/" + keys.ROUTER_DISAGREE: [0.2, 0.4],
              keys.K3_KL: [0.1, None], keys.EXTREME_FRAC_2: [None, None]}  # orjson writes NaN as null
    _write_jsonl(tmp_path / "old.jsonl", _filelogger(legacy))
    summary, notes = report.summarize(report.load_runs([tmp_path / "old.jsonl"])[0])
    assert summary["old"]["mean_router_disagree"] == pytest.approx(0.3)
    assert summary["old"]["mean_k3_kl"] == 0.1
    assert f"`{keys.K3_KL}` is not a finite number at step(s) 2 of run `old`: left out." in notes
    assert any("former names `actor/r3/...`" in n and "run `old`" in n for n in notes)
    assert summary["old"]["mean_extreme_frac_2"] is None
    assert f"`{keys.EXTREME_FRAC_2}` of run `old` is never a finite number: mean_extreme_frac_2 is n/a." in notes


def test_curves_png_is_readable(jsonl_dir, tmp_path):
    import matplotlib.image

    report.write_report([jsonl_dir], tmp_path / "out")
    png = tmp_path / "out" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    height, width, _ = image.shape
    assert width > 800 and height > 600
    assert image[..., :3].std() > 0.05  # not a blank canvas


# ------------------------------------------------------------------------------------------ W&B


def _check_wandb_figures(summary: dict, name: str) -> None:
    spec = WANDB_RUNS[name]
    cols = spec["steps"]
    row = summary[name]
    assert (row["run"], row["group"], row["variant"], row["project"]) == (name, "g1", spec["variant"], "r3-report-test")
    assert row["source"].endswith(".wandb")
    assert row["steps"] == len(cols[keys.REWARD])
    assert row["final_reward"] == cols[keys.REWARD][-1] and row["best_reward"] == max(cols[keys.REWARD])
    assert row["first_k3_kl"] == cols[keys.K3_KL][0]
    assert row["mean_k3_kl"] == pytest.approx(_mean(cols[keys.K3_KL]))
    for field, key in (("mean_extreme_frac_2", keys.EXTREME_FRAC_2), ("mean_router_disagree", keys.ROUTER_DISAGREE),
                       ("mean_router_disagree_replayed", keys.ROUTER_DISAGREE_REPLAYED),
                       ("mean_replay_active_frac", keys.REPLAY_ACTIVE_FRAC)):
        assert row[field] == pytest.approx(_mean(cols[key])), field
    assert row["seconds_per_step"] == statistics.median(cols[keys.STEP_TIME][1:])
    if keys.METRICS_TIME_FRAC in cols:
        assert row["mean_metrics_time_frac"] == pytest.approx(_mean(cols[keys.METRICS_TIME_FRAC]))
    else:
        assert row["mean_metrics_time_frac"] is None


def test_wandb_offline_runs(wandb_root, tmp_path):
    result = report.write_report([wandb_root], tmp_path / "out")
    assert list(result.summary) == ["g1-grpo", "g1-grpo_r3"]
    for name in WANDB_RUNS:
        _check_wandb_figures(result.summary, name)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| g1-grpo_r3 | g1 | grpo_r3 | 4 | 0.5 | 0.75 | 0.001 | 0.002 | 0.0025 | 0.21 | 0 | 1 | 6 | n/a |" in text
    assert f"`{keys.METRICS_TIME_FRAC}` not logged by run `g1-grpo_r3`: mean_metrics_time_frac is n/a." in text
    assert f"`{keys.K3_KL}` is not a finite number at step(s) 2 of run `g1-grpo_r3`: left out." in text
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "out" / "curves.png").ndim == 3


def test_every_way_to_point_at_wandb_runs(wandb_root):
    wandb_dir = wandb_root / "wandb"
    run_dir = sorted(wandb_dir.glob("offline-run-*"))[0]
    one = report.load_wandb_run(run_dir)[0].name
    assert one in WANDB_RUNS
    for paths, expected in (
        ([wandb_dir], list(WANDB_RUNS)),  # the wandb/ directory (its latest-run link is not a run of its own)
        ([run_dir], [one]),  # one run directory
        ([next(run_dir.glob("run-*.wandb"))], [one]),  # its .wandb file
        ([wandb_dir, run_dir, wandb_root], list(WANDB_RUNS)),  # the same runs twice: each once
    ):
        assert [r.name for r in report.load_runs(paths)[0]] == expected, paths


def test_mixed_jsonl_and_wandb_inputs(jsonl_dir, wandb_root, tmp_path):
    out = tmp_path / "out"
    result = report.write_report([jsonl_dir / "ppo_b.jsonl", wandb_root / "wandb", jsonl_dir], out)
    assert list(result.summary) == ["ppo_b", "g1-grpo", "g1-grpo_r3", "ppo_a"]  # in the order given
    assert result.summary["ppo_b"]["best_reward"] == 0.6
    _check_wandb_figures(result.summary, "g1-grpo")
    assert not any("found both" in n for n in result.notes)  # different runs: nothing left out


def _same_run_dir(wandb_root: Path, tmp_path: Path) -> Path:
    """A quickstart-like directory: W&B runs under wandb/ and grpo.jsonl, the FileLogger file of g1-grpo."""
    d = tmp_path / "both"
    shutil.copytree(wandb_root / "wandb", d / "wandb" / "wandb", symlinks=True)
    _write_jsonl(d / "grpo.jsonl", [{"step": 0, "data": {"val-core/acc": 0.5}}]
                 + _filelogger(WANDB_RUNS["g1-grpo"]["steps"]))
    # same stem, different values: another run, reported beside g1-grpo_r3
    other = dict(WANDB_RUNS["g1-grpo_r3"]["steps"], **{keys.REWARD: [0.0, 0.0, 0.0, 1.0]})
    _write_jsonl(d / "grpo_r3.jsonl", _filelogger({k: v for k, v in other.items() if k != keys.K3_KL}))
    return d


def test_same_run_as_jsonl_and_wandb_is_reported_once(wandb_root, tmp_path):
    d = _same_run_dir(wandb_root, tmp_path)
    result = report.write_report([d], tmp_path / "out")
    assert list(result.summary) == ["grpo", "grpo_r3", "g1-grpo_r3"]
    grpo = result.summary["grpo"]
    assert grpo["source"] == str(d / "grpo.jsonl")
    assert (grpo["group"], grpo["variant"], grpo["project"]) == ("g1", "grpo", "r3-report-test")  # from W&B
    assert grpo["final_reward"] == WANDB_RUNS["g1-grpo"]["steps"][keys.REWARD][-1]
    assert result.summary["grpo_r3"]["final_reward"] == 1.0
    [note] = [n for n in result.notes if "found both" in n]
    assert "1 run(s)" in note and "read from the .jsonl file" in note and "`grpo.jsonl` = `offline-run-" in note

    preferred = report.write_report([d], tmp_path / "out_wandb", prefer="wandb")
    assert list(preferred.summary) == ["grpo_r3", "g1-grpo", "g1-grpo_r3"]
    assert preferred.summary["g1-grpo"]["source"].endswith(".wandb")
    assert any("read from the W&B run" in n for n in preferred.notes)


def test_runs_of_one_name_get_distinct_keys(tmp_path):
    for group in ("gA", "gB"):
        d = tmp_path / group
        d.mkdir()
        _write_jsonl(d / "grpo.jsonl", _filelogger({keys.REWARD: [0.5 if group == "gA" else 0.25]}))
        (d / "grpo.meta.json").write_text(json.dumps({"group": group}))
    summary = report.write_report([tmp_path / "gA", tmp_path / "gB"], tmp_path / "out").summary
    assert {k: v["final_reward"] for k, v in summary.items()} == {"gA/grpo": 0.5, "gB/grpo": 0.25}


# ----------------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_file_and_cause(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        report.load_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no run in it"):
        report.load_runs([tmp_path / "empty"])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt: not a verl FileLogger .jsonl file"):
        report.load_runs([tmp_path / "notes.txt"])

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"step": 1, "data": {}}\n\n{"step": 2, "data": \n')
    with pytest.raises(ValueError, match=r"bad/x.jsonl:3: not a JSON line"):
        report.load_runs([bad])
    (bad / "x.jsonl").write_text('{"step": "one", "data": {}}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1: expected a FileLogger record"):
        report.load_runs([bad])
    (bad / "x.jsonl").write_text('{"step": 1, "data": {}}\n')
    (bad / "x.meta.json").write_text("{")
    with pytest.raises(ValueError, match=r"x.meta.json: not valid JSON"):
        report.load_runs([bad])

    run_dir = tmp_path / "wandb" / "offline-run-1-abc"
    run_dir.mkdir(parents=True)
    (run_dir / "run-abc.wandb").write_bytes(b"not a transaction log" * 10)
    with pytest.raises(ValueError, match=r"run-abc.wandb: wandb cannot read this W&B run"):
        report.load_runs([tmp_path / "wandb"])
    with pytest.raises(ValueError, match="prefer must be"):
        report.load_runs([bad], prefer="both")


# ----------------------------------------------------------------------------------------- CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="verl-r3 report")
    report.add_arguments(parser)
    return parser.parse_args(argv)


def test_main_writes_files_and_prints_table(jsonl_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert report.main(_parse([str(jsonl_dir), "--out", str(out)])) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| run | group | variant | steps |")
    assert "| ppo_b | gB | ppo | 2 |" in printed
    assert f"`{keys.ROUTER_DISAGREE}` not logged by run `ppo_b`" in printed
    for name in ("report.md", "summary.json", "curves.png"):
        assert (out / name).stat().st_size > 0 and str(out / name) in printed

    assert report.main(_parse([str(tmp_path / "missing"), "--out", str(out)])) == 2
    assert "verl-r3 report: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse([str(jsonl_dir)])  # --out is required


def test_interrupted_wandb_run_is_read_up_to_where_it_stops(wandb_root, tmp_path):
    # A run killed mid-write leaves a .wandb file cut short: its records up to there, and a note.
    source = next(r for r in sorted((wandb_root / "wandb").glob("offline-run-*"))
                  if report.load_wandb_run(r)[0].name == "g1-grpo_r3")
    cut = tmp_path / "wandb" / source.name
    cut.mkdir(parents=True)
    [log] = source.glob("run-*.wandb")
    data = log.read_bytes()
    (cut / log.name).write_bytes(data[: len(data) * 2 // 3])
    run, notes = report.load_wandb_run(cut)
    assert run.name == "g1-grpo_r3" and run.variant == "grpo_r3"
    full = WANDB_RUNS["g1-grpo_r3"]["steps"][keys.REWARD]
    rewards = [v for _, v in run.series(keys.REWARD)]
    assert 1 <= len(rewards) <= len(full) and rewards == full[: len(rewards)]
    assert len(notes) == 1 and "incomplete" in notes[0] and log.name in notes[0]
