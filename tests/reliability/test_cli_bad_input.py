"""Bad input on the command line and in the files it reads: each case ends in a clear error that
names the input and the cause (exit status 2, or ``ValueError`` from the library), before any model
is loaded, engine started or training run. No traceback reaches the user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from verl_r3 import doctor
from verl_r3.bench import capture, e2e, front_end, memory
from verl_r3.cli import main
from verl_r3.core.replay import routing_dims
from verl_r3.jsonl import read_jsonl
from verl_r3.patches._window import installed_version
from verl_r3.tiny import tiny_config

REPO = Path(__file__).resolve().parents[2]


def _model_dir(path: Path, **config) -> Path:
    """A model directory as the checks see it: a config and a weights file (never loaded here)."""
    tiny_config("qwen3_moe", **config).save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a directory\n")
    return path


def _fails(argv: list[str], capsys, *expected: str) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    return err


def test_more_experts_per_token_than_the_model_has():
    config = tiny_config("qwen3_moe", num_experts=4, num_experts_per_tok=8)
    with pytest.raises(ValueError, match="'qwen3_moe': 8 experts per token of 4 experts"):
        routing_dims(config)
    assert routing_dims(tiny_config("qwen3_moe", num_experts=4, num_experts_per_tok=4))[1:] == (4, 4)


def test_diagnose_names_what_is_wrong_with_each_input(tmp_path, a_file, capsys):
    model = _model_dir(tmp_path / "model")
    too_many = _model_dir(tmp_path / "too_many", num_experts=4, num_experts_per_tok=8)
    _fails(["diagnose", "--model", str(a_file)], capsys, f"model directory {str(a_file)!r} is a file")
    _fails(["diagnose", "--model", str(too_many)], capsys, f"model directory {str(too_many)!r}",
           "8 experts per token of 4 experts")
    _fails(["diagnose", "--model", str(model), "--prompts", str(tmp_path)], capsys,
           f"prompts file {str(tmp_path)!r} is a directory")
    out = a_file / "out"
    _fails(["diagnose", "--model", str(model), "--out", str(out)], capsys,
           f"--out {str(out)!r}: cannot create the output directory (Not a directory)")
    _fails(["diagnose", "--model", str(model), "--engine", "vllm", "--timeout", "-1"], capsys,
           "timeout must be > 0 seconds, got -1.0")
    assert not (tmp_path / "runs").exists()


def test_diagnose_reads_prompt_files_that_are_not_utf8_with_the_line_named(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xff"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: not UTF-8 text \(invalid start byte at byte 15"):
        list(read_jsonl(prompts))


def test_report_names_a_metrics_file_or_its_meta_that_is_not_utf8(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    step = json.dumps({"step": 1, "data": {"critic/score/mean": 0.5}})
    (runs / "grpo.jsonl").write_bytes(step.encode() + b"\n\xff\n")
    _fails(["report", str(runs), "--out", str(tmp_path / "report")], capsys, "grpo.jsonl:2: not UTF-8 text")
    (runs / "grpo.jsonl").write_text(step + "\n")
    (runs / "grpo.meta.json").write_bytes(b'{"variant": "\xff"}')
    _fails(["report", str(runs), "--out", str(tmp_path / "report")], capsys, "grpo.meta.json: not UTF-8 text")


def test_benchmarks_refuse_values_that_cannot_be_measured(tmp_path, a_file, capsys):
    for flag in ("--response-median", "--response-sigma"):
        for value in ("nan", "inf"):
            _fails(["bench", "memory", flag, value], capsys, "all finite")
    with pytest.raises(ValueError, match="interval_ms must be a finite number > 0, got nan"):
        front_end.run(interval_ms=float("nan"))
    _fails(["bench", "commit", "--top-k", "9", "--experts", "8"], capsys, "top_k (9) must not exceed experts (8)")
    _fails(["bench", "e2e", "--out", str(a_file / "runs")], capsys,
           f"--out {str(a_file / 'runs')!r}: cannot create the output directory (Not a directory)")
    with pytest.raises(SystemExit):
        main(["bench", "e2e", "--timeout", "-5"])
    assert "must be a positive number of seconds, got -5" in capsys.readouterr().err
    with pytest.raises(ValueError, match="timeout must be > 0 seconds, got 0"):
        e2e.run(timeout_s=0)
    with pytest.raises(ValueError, match="all finite; got nan"):
        memory.draw_lengths(8, prompt_min=1, prompt_max=8, response_median=float("nan"), response_sigma=0.5,
                       max_response=64, seed=0)


def test_an_sglang_interpreter_that_is_not_one_is_named(tmp_path, a_file, monkeypatch, capsys):
    for named, cause in ((tmp_path / "nowhere" / "python", "no such file"), (a_file, "not an executable file")):
        monkeypatch.setenv("VERL_R3_SGLANG_PYTHON", str(named))
        with pytest.raises(ValueError, match=f"VERL_R3_SGLANG_PYTHON={named}: {cause}"):
            capture.sglang_python()
        if installed_version("sglang") is None:  # this environment goes through the variable
            _fails(["bench", "capture", "--engine", "sglang"], capsys, f"VERL_R3_SGLANG_PYTHON={named}: {cause}")
            path, reason, _ = doctor._sglang()
            assert path == "unsupported" and f"VERL_R3_SGLANG_PYTHON ({named})" in reason, reason


def test_stress_checks_the_model_directory_before_any_engine_starts(tmp_path, capsys):
    too_many = _model_dir(tmp_path / "too_many", num_experts=4, num_experts_per_tok=8)
    _fails(["stress", "--engine", "hf", "--model", str(too_many)], capsys, f"model directory {str(too_many)!r}",
           "8 experts per token of 4 experts")


@pytest.mark.parametrize(("recipe", "args", "message"), [
    ("math", ["--train", ""], "--train: no source named (got '')"),
    ("code", ["--test", ","], "--test: no source named (got ',')"),
    ("math", ["--smoke", "--out", "{file}/data"], "--out '{file}/data': cannot write there (Not a directory)"),
    ("code", ["--smoke", "--out", "{file}/data"], "--out '{file}/data': cannot write there (Not a directory)"),
    ("math", ["--limit", "0"], "argument --limit: must be a positive integer, got 0"),
    ("code", ["--limit", "-1"], "argument --limit: must be a positive integer, got -1"),
])
def test_prepare_data_names_the_option_at_fault(recipe, args, message, tmp_path, a_file):
    args = [a.replace("{file}", str(a_file)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "data")]
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / recipe / "prepare_data.py"), *args],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert message.replace("{file}", str(a_file)) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
