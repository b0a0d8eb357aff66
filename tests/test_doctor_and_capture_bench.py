"""``verl-r3 doctor`` and ``verl-r3 bench capture``: what they report, run for real.

No timing assertions: the speed claim comes from the benchmark's own output (README).
"""

from __future__ import annotations

import importlib.metadata
import json

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


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_bench_capture_measures_both_sides_and_reports_their_ratio(capsys, engine):
    if engine == "vllm":
        pytest.importorskip("vllm")
    result = _json(capsys, ["bench", "capture", "--engine", engine, "--json", *SMALL])
    assert result["engine"] == engine and result["rounds"] == 1 and result["target"] == 0.99
    assert len(result["capture_runs"]) == len(result["plain_runs"]) == 1
    assert result["tokens_per_s_capture"] > 0 and result["tokens_per_s_plain"] > 0
    assert result["ratio"] == pytest.approx(result["tokens_per_s_capture"] / result["tokens_per_s_plain"])


def test_bench_capture_refuses_an_unknown_engine(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "capture", "--engine", "trtllm"])
    assert "invalid choice" in capsys.readouterr().err
