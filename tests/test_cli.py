"""The ``verl-r3`` console entry point: ``bench replay`` JSON, help, errors, version.

No timing assertions: the speed claim comes from the benchmark's own output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from verl_r3 import __version__
from verl_r3.cli import main

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 2
TINY = ["--layers", "2", "--experts", "8", "--top-k", "2", "--hidden", "64", "--moe-intermediate", "32",
        "--tokens", "128", "--repeats", str(REPEATS)]


def _check_result(result: dict) -> None:
    for key in ("ratio", "native_median", "replay_median", "losses_equal", "machine", "shape", "native_s", "replay_s"):
        assert key in result, key
    assert isinstance(result["ratio"], float) and result["ratio"] > 0
    assert result["ratio"] == pytest.approx(result["replay_median"] / result["native_median"], rel=1e-12)
    assert result["losses_equal"] is True
    assert len(result["native_s"]) == len(result["replay_s"]) == REPEATS
    assert all(t > 0 for t in result["native_s"] + result["replay_s"])
    assert result["shape"]["layers"] == 2 and result["shape"]["experts"] == 8 and result["shape"]["top_k"] == 2
    assert result["shape"]["hidden"] == 64 and result["shape"]["tokens"] == 128
    assert result["disagree"] == 0 and result["fallback"] == 0
    assert result["replayed"] == 128 * 2  # tokens x MoE layers
    assert result["machine"]["threads"] >= 1 and result["machine"]["torch"]


def test_bench_replay_json_in_process(capsys):
    assert main(["bench", "replay", "--json", *TINY]) == 0
    out = capsys.readouterr().out
    _check_result(json.loads(out))


def test_bench_replay_json_subprocess():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "verl_r3.cli", "bench", "replay", "--json", *TINY],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    _check_result(json.loads(proc.stdout))


def test_bench_replay_remove_padding_packs_one_row(capsys):
    assert main(["bench", "replay", "--json", "--remove-padding", *TINY]) == 0
    result = json.loads(capsys.readouterr().out)
    _check_result(result)
    assert result["shape"]["remove_padding"] is True


def test_bench_replay_bfloat16_on_the_named_device(capsys):
    assert main(["bench", "replay", "--json", "--dtype", "bfloat16", "--device", "cpu", *TINY]) == 0
    result = json.loads(capsys.readouterr().out)
    _check_result(result)  # replay of the model's own routing is bit-identical in bfloat16 too
    assert result["shape"]["dtype"] == "bfloat16"
    assert result["machine"]["device"] == "cpu" and result["machine"]["device_name"] is None
    assert result["native_losses_equal"] is True and result["max_loss_diff"] == 0.0


@pytest.mark.parametrize(("device", "cause"), [
    ("cuda", "sees no CUDA device here"), ("mps", "runs on cpu or cuda"), ("gpu0", "not a torch device")])
def test_bench_replay_refuses_a_device_it_cannot_use(device, cause, capsys):
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device")
    assert main(["bench", "replay", "--device", device, *TINY]) == 2
    err = capsys.readouterr().err
    assert f"device {device!r}" in err and cause in err


def test_bench_replay_table(capsys):
    assert main(["bench", "replay", *TINY[:-2], "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "ratio" in out and "losses_equal True" in out and "native" in out and "replay" in out


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["bench", "replay", "--help"], ["demo", "--help"]])
def test_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: verl-r3" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"verl-r3 {__version__}"


@pytest.mark.parametrize("argv", [["frobnicate"], ["bench", "nope"], [], ["bench"], ["bench", "replay", "--repeats", "0"]])
def test_bad_usage_exits_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code not in (0, None)


def test_bench_replay_invalid_shape_is_an_error(capsys):
    assert main(["bench", "replay", "--hidden", "100", "--layers", "1", "--experts", "4", "--top-k", "2",
                 "--tokens", "16", "--repeats", "1"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    assert main(["bench", "replay", "--tokens", "9", "--batch", "4", "--repeats", "1"]) == 2
    assert "tokens (9) must be a multiple of batch (4)" in capsys.readouterr().err


def test_unknown_subcommand_subprocess():
    proc = subprocess.run([sys.executable, "-m", "verl_r3.cli", "frobnicate"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "invalid choice" in proc.stderr


def test_demo_is_lazy_and_forwards_options(monkeypatch):
    import types

    seen = {}
    fake = types.ModuleType("verl_r3.demo")
    fake.main = lambda args: seen.update(quick=args.quick, seed=args.seed) or 0
    monkeypatch.setitem(sys.modules, "verl_r3.demo", fake)
    import verl_r3

    monkeypatch.setattr(verl_r3, "demo", fake, raising=False)
    assert main(["demo", "--quick", "--seed", "3"]) == 0
    assert seen == {"quick": True, "seed": 3}


def test_demo_import_error_surfaces_only_when_invoked(monkeypatch, capsys):
    import verl_r3

    monkeypatch.setitem(sys.modules, "verl_r3.demo", None)  # makes `import verl_r3.demo` fail
    monkeypatch.delattr(verl_r3, "demo", raising=False)
    with pytest.raises(SystemExit):
        main(["--help"])  # help does not need the demo
    with pytest.raises(ImportError):
        main(["demo", "--quick"])
