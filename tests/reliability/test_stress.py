"""``verl-r3 stress`` (verl_r3.stress): concurrent requests with capture and aborts, checked row by row.

The real command runs once per engine with 64 requests, each under a wall-clock limit whose
expiry kills its process group and fails the test. The check itself is shown to fail on real
routing that differs: another model's reference, and one expert id changed in an engine's row.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from verl_r3 import cli, stress
from verl_r3.bench.capture import build_model
from verl_r3.stress import workload
from verl_r3.stress.check import Reference, check_outcome

ENGINE_TIMEOUT_S = 300  # the command's own limit on its engine child
COMMAND_TIMEOUT_S = 420  # this test's limit on the whole command


def run_command(*args: str) -> tuple[int, str, str]:
    """``verl-r3 ARGS`` in a subprocess of its own process group, killed whole on timeout."""
    proc = subprocess.Popen([sys.executable, "-m", "verl_r3.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    try:
        out, err = proc.communicate(timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"verl-r3 {' '.join(args)} ran past {COMMAND_TIMEOUT_S} s; stderr tail:\n{err[-3000:]}")
    return proc.returncode, out, err


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.slow),
                                    pytest.param("sglang", marks=pytest.mark.slow)])
def test_64_concurrent_requests_with_aborts_match_the_single_request_reference(engine):
    if engine == "vllm":
        pytest.importorskip("vllm")
    code, out, err = run_command("stress", "--engine", engine, "--requests", "64", "--json",
                                 "--timeout", str(ENGINE_TIMEOUT_S))
    assert code == 0, f"exit {code}; stderr tail:\n{err[-4000:]}"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["engine"] == engine and result["requests"] == 64
    assert result["mismatched"] == 0 and result["failed"] == 0 and result["failures"] == [] and result["ok"]
    assert result["aborted"] > 0 and result["aborted_clean"] == result["aborted"]
    assert result["completed"] + result["aborted"] == result["requests"]
    assert result["aborts_sent"] == result["aborted"] + result["aborts_missed"]
    # Every request's rows were compared: completed ones always return routing, and so does
    # every aborted one on these three engines.
    assert result["aborted_with_routing"] == result["aborted"]
    assert result["rows_compared"] > 64 * 20 and result["routers_compared"] == 4 * result["rows_compared"]
    assert result["follow_up"]["ok"] and result["follow_up"]["status"] == "completed"
    if engine == "vllm":
        assert result["engine_stats"]["preemptions"] > 0  # the small KV cache forced recompute
    if engine != "hf":
        assert result["prefix_cached_requests"] > 0  # the shared prefixes hit the prefix cache


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    """The stress model (seed 0) and one with other weights (seed 1)."""
    root = tmp_path_factory.mktemp("stress_models")
    for seed in (0, 1):
        build_model(str(root / f"m{seed}"), seed=seed, **stress.MODEL)
    return str(root / "m0"), str(root / "m1")


def test_routing_checked_against_another_models_reference_fails_naming_the_requests(models):
    served, other = models
    result = stress.run("hf", 8, model=served, reference=other, timeout_s=ENGINE_TIMEOUT_S)
    assert result["requests"] == 8 and not result["ok"]
    assert result["mismatched"] > 0 and result["failed"] == 0
    assert result["aborted"] == 1 and result["aborted_clean"] == 0  # request 3: its routing differs too
    named = [msg for msg in result["failures"] if msg.startswith("request ")]
    assert len(named) == result["mismatched"]
    assert any("request 3 (aborted)" in msg for msg in named)
    assert all("expert sets differ from the single-request reference" in msg for msg in named)
    assert any(msg.startswith("follow-up request 8") for msg in result["failures"])


def _outcome(req, tokens, routing, status="completed", abort_sent=None):
    return {"index": req.index, "status": status, "finish": status, "token_ids": tokens, "abort_sent": abort_sent,
            "routing": None if routing is None else {"format": "dense", "data": routing},
            "cached_tokens": None, "error": None}


def test_one_changed_expert_id_is_a_mismatch_naming_request_row_and_layer(models):
    ref = Reference(models[0])
    req = workload.StressRequest(5, list(range(10, 30)), 8)
    tokens = [40, 41, 42, 43]
    rows = ref.routing(req.prompt_ids + tokens).numpy()  # what an exact engine returns: [23, 4, 2]
    assert check_outcome(req, _outcome(req, tokens, rows), ref).ok
    # The same experts in another order are the same set.
    assert check_outcome(req, _outcome(req, tokens, rows[:, :, ::-1]), ref).ok
    changed = rows.copy()
    changed[17, 2, 0] = next(e for e in range(8) if e not in rows[17, 2])
    verdict = check_outcome(req, _outcome(req, tokens, changed), ref)
    assert verdict.mismatch and verdict.mismatch.startswith("request 5 (completed): 1 of 92 (row, MoE layer)")
    assert "first at row 17 (of 23), layer 2" in verdict.mismatch
    short = check_outcome(req, _outcome(req, tokens, rows[:-1]), ref)
    assert "22 routing rows for 24 tokens (prompt + returned), expected 23" in short.mismatch
    bad = check_outcome(req, {**_outcome(req, tokens, None), "routing": {"format": "sglang", "data": "@@"}}, ref)
    assert bad.mismatch.startswith("request 5 (completed): undecodable routing")


def test_unclean_aborts_are_named(models):
    ref = Reference(models[0])
    req = workload.StressRequest(11, list(range(10, 30)), 32, abort_after=3)
    tokens = [40, 41]
    rows = ref.routing(req.prompt_ids + tokens).numpy()
    clean = check_outcome(req, _outcome(req, tokens + [44], None, "aborted", abort_sent=3), ref)
    assert clean.ok and clean.rows == 0  # an aborted request may return no routing
    lost = check_outcome(req, _outcome(req, tokens, rows, "aborted", abort_sent=3), ref)
    assert lost.problem == "request 11 was aborted after 3 streamed tokens but returned only 2" and lost.rows == 21
    unasked = check_outcome(req, _outcome(req, tokens, rows, "aborted"), ref)
    assert unasked.problem == "request 11 ended aborted (aborted) although no abort was sent"
    failed = check_outcome(req, {**_outcome(req, [], None, "error"), "error": "EngineDeadError: gone"}, ref)
    assert failed.problem == "request 11 failed: EngineDeadError: gone"


def test_workload_is_deterministic_and_mixed():
    reqs = workload.draw(64)
    assert reqs == workload.draw(64) and reqs != workload.draw(64, seed=1)
    lengths = [len(r.prompt_ids) for r in reqs]
    assert min(lengths) <= 5 and max(lengths) >= 90
    assert sum(r.prompt_ids[:64] == reqs[0].prompt_ids[:64] for r in reqs) == 16  # a shared prefix
    assert [r.index for r in reqs if r.abort_after is not None] == [3, 11, 19, 27, 35, 43, 51, 59]
    assert all(r.max_tokens >= 8 * r.abort_after for r in reqs if r.abort_after is not None)
    assert max(len(r.prompt_ids) + r.max_tokens for r in reqs) + workload.FOLLOW_UP_TOKENS <= workload.MAX_CONTEXT
    assert all(0 <= t < 256 for r in reqs for t in r.prompt_ids)


@pytest.mark.parametrize("argv, message", [
    (["stress", "--engine", "tgi"], "invalid choice: 'tgi'"),
    (["stress", "--requests", "4"], "the following arguments are required: --engine"),
    (["stress", "--engine", "hf", "--requests", "0"], "must be a positive integer, got 0"),
    (["stress", "--engine", "hf", "--timeout", "0"], "must be a positive number of seconds, got 0"),
])
def test_bad_arguments_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_model_directory_without_config_is_an_error_before_any_engine_starts(tmp_path, capsys):
    assert cli.main(["stress", "--engine", "vllm", "--model", str(tmp_path)]) == 2
    assert f"model directory {str(tmp_path)!r} has no config.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown engine 'tgi'"):
        stress.run("tgi")
    with pytest.raises(ValueError, match="requests must be >= 1, got 0"):
        stress.run("hf", 0)


def test_routing_of_an_engine_is_read_in_its_own_format(models):
    ref = Reference(models[0])
    ids = list(range(10, 20))
    rows = ref.routing(ids).numpy().astype("<i4")
    import base64

    from verl_r3.stress.check import engine_routing

    # SGLang's payload, int32 or one byte per id (compact routing), with the token counts that tell which.
    for width in ("<i4", "<u1"):
        sglang = {"format": "sglang", "data": base64.b64encode(rows.astype(width).tobytes()).decode(),
                  "prompt_tokens": 6, "completion_tokens": 4}
        assert np.array_equal(engine_routing(sglang, ref, "request 0").numpy(), rows)
    with pytest.raises(ValueError, match="no usable prompt_tokens and completion_tokens"):
        engine_routing({"format": "sglang", "data": sglang["data"]}, ref, "request 0")
    assert np.array_equal(engine_routing({"format": "dense", "data": rows.astype(np.uint8).tolist()}, ref,
                                         "request 0").numpy(), rows)
    with pytest.raises(ValueError, match=r"request 0: routing of shape \(9, 4, 3\)"):
        engine_routing({"format": "dense", "data": np.zeros((9, 4, 3), dtype=np.int32)}, ref, "request 0")


def test_an_engine_past_its_time_limit_is_killed_and_named(models):
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=r"the hf engine did not finish within 1 s; its process group was killed"):
        stress.run("hf", 4, model=models[0], timeout_s=1.0)
    assert time.monotonic() - began < 60
