"""``verl-r3 doctor``, ``verl-r3 bench capture`` and ``bench commit``: what they report, run for real.

No timing assertions: the speed claim comes from the benchmark's own output (README).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import statistics

import pytest

from verl_r3.cli import main

SMALL = ["--rounds", "1", "--prompts", "4", "--prompt-len", "8", "--new-tokens", "6", "--layers", "2",
         "--hidden", "64"]


def _json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_doctor_reports_installed_versions_and_each_engines_capture_path(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("VERL_R3_SGLANG_PYTHON", str(tmp_path / "no-such-python"))
    report = _json(capsys, ["doctor", "--json"])
    for name in ("verl", "torch", "transformers", "vllm-cpu"):
        assert report["versions"][name] == importlib.metadata.version(name)
    engines = report["engines"]
    assert engines["hf"]["capture"] == "native"
    assert engines["vllm"]["capture"] == "patch" and "vllm_cpu_capture_0_32" in engines["vllm"]["reason"]
    assert engines["sglang"]["capture"] == "unsupported" and "could not be inspected" in engines["sglang"]["reason"]


def test_doctor_names_the_window_when_vllm_is_outside_the_patch(capsys, monkeypatch):
    pytest.importorskip("vllm")
    from verl_r3.patches import vllm_cpu_capture_0_32

    monkeypatch.setattr(vllm_cpu_capture_0_32, "installed_vllm_version", lambda: "0.33.1")
    report = _json(capsys, ["doctor", "--json"])
    assert report["engines"]["vllm"]["capture"] == "unsupported"
    assert ">=0.32.0,<0.33.0" in report["engines"]["vllm"]["reason"] and "0.33.1" in report["engines"]["vllm"]["reason"]
    assert main(["doctor"]) == 0
    assert "vllm   unsupported" in capsys.readouterr().out


@pytest.mark.parametrize("engine,rounds,control", [("hf", 1, False), ("hf", 2, True), ("vllm", 2, False)])
def test_bench_capture_measures_both_sides_and_reports_their_ratio(capsys, engine, rounds, control):
    """vLLM: 2 rounds, one per engine start order (4 engine starts). --control adds a second instance
    without capture, one more entry in the sides every engine's round loop walks; it is checked on hf,
    where it costs no engine start."""
    if engine == "vllm":
        pytest.importorskip("vllm")
    argv = [a if prev != "--rounds" else str(rounds) for prev, a in zip([None] + SMALL, SMALL)]
    allowed = os.sched_getaffinity(0)
    result = _json(capsys, ["bench", "capture", "--engine", engine, "--json", *argv] + (["--control"] if control else []))
    if engine == "vllm":
        # Both engine starts: the front end (this process) and the engine cores on the CPUs vLLM's workers
        # left free, and this process back on all of its CPUs afterwards.
        where = result["machine"]["placement"]
        assert where["pinned"] and where["worker_cpus"], where
        assert not set(where["pinned"]) & set(where["worker_cpus"])
        assert set(where["pinned"]) | set(where["worker_cpus"]) <= allowed
        assert os.sched_getaffinity(0) == allowed
    assert result["engine"] == engine and result["rounds"] == rounds and result["target"] == 0.99
    assert len(result["capture_runs"]) == len(result["plain_runs"]) == rounds
    assert result["tokens_per_s_capture"] > 0 and result["tokens_per_s_plain"] > 0
    assert result["ratio"] == pytest.approx(statistics.median(result["capture_runs"]) /
                                            statistics.median(result["plain_runs"]))
    if control:
        assert len(result["control_runs"]) == rounds
        assert result["control_ratio"] == pytest.approx(statistics.median(result["control_runs"]) /
                                                        statistics.median(result["plain_runs"]))
    else:
        assert "control_ratio" not in result


def test_bench_capture_control_is_refused_for_sglang(capsys):
    assert main(["bench", "capture", "--engine", "sglang", "--control"]) == 2
    assert "no control instance" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["hf", "sglang"])
def test_bench_capture_pinning_is_refused_outside_vllm(capsys, engine):
    assert main(["bench", "capture", "--engine", engine, "--no-pin"]) == 2
    assert "--no-pin" in capsys.readouterr().err


def test_bench_commit_times_both_commits_on_the_same_steps_and_compares_their_outputs(capsys):
    """The vLLM patch's commit benchmark: both sides run every repeat over the same decode steps and
    give equal outputs; the ratio is the medians'. No timing is asserted."""
    pytest.importorskip("vllm")
    result = _json(capsys, ["bench", "commit", "--json", "--requests", "6", "--prompt-len", "5", "--new-tokens", "40",
                            "--block-size", "8", "--repeats", "3"])
    assert result["outputs_equal"] is True and result["repeats"] == 3
    assert len(result["vllm_runs"]) == len(result["step_commit_runs"]) == 3
    assert result["ratio"] == pytest.approx(statistics.median(result["step_commit_runs"]) /
                                            statistics.median(result["vllm_runs"]))
    assert result["shape"]["requests"] == 6 and result["machine"]["vllm"]
    assert main(["bench", "commit", "--new-tokens", "1"]) == 2
    assert "new_tokens must be >= 2" in capsys.readouterr().err
    assert main(["bench", "commit", "--experts", "300"]) == 2
    assert "experts must be in [2, 256]" in capsys.readouterr().err


def test_bench_capture_sends_new_prompts_each_round_and_the_same_to_both_sides():
    from verl_r3.bench.capture import batches

    rounds = batches(7, 3, prompts=4, prompt_len=5)
    assert len(rounds) == 4 and all(len(b) == 4 and all(len(p) == 5 for p in b) for b in rounds)
    assert len({tuple(map(tuple, b)) for b in rounds}) == 4  # warm-up and every round: a batch of its own
    assert batches(7, 3, prompts=4, prompt_len=5) == rounds  # one seed, one set: both sides get the same


def test_bench_capture_refuses_an_unknown_engine(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "capture", "--engine", "trtllm"])
    assert "invalid choice" in capsys.readouterr().err
