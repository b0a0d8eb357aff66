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
    version = importlib.metadata.version("vllm-cpu")
    assert engines["vllm"]["front_end"] == (f"vllm_front_end_routing_0_32 (vLLM {version}): each request's routing "
                                            "rows copied into a buffer of its own every 8 steps")
    assert engines["sglang"]["capture"] == "unsupported" and "could not be inspected" in engines["sglang"]["reason"]


def test_doctor_names_the_window_when_vllm_is_outside_the_patch(capsys, monkeypatch):
    pytest.importorskip("vllm")
    from verl_r3.patches import vllm_cpu_capture_0_32

    monkeypatch.setattr(vllm_cpu_capture_0_32, "installed_vllm_version", lambda: "0.33.1")
    report = _json(capsys, ["doctor", "--json"])
    assert report["engines"]["vllm"]["capture"] == "unsupported"
    assert ">=0.32.0,<0.33.0" in report["engines"]["vllm"]["reason"] and "0.33.1" in report["engines"]["vllm"]["reason"]
    assert report["engines"]["vllm"]["front_end"] == (
        "vLLM's own accumulation (views of whole messages until each request ends): vllm_front_end_routing_0_32 "
        "supports vllm >=0.32.0,<0.33.0, found vllm 0.33.1; check whether that version's output processor still "
        "keeps decoded views of each step's routing (RequestState.routed_experts_chunks) and add a patch module for "
        "its version window if it does")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "vllm   unsupported" in out
    assert "\n         front end   vLLM's own accumulation (views of whole messages until each request ends): " in out


@pytest.mark.parametrize("engine,rounds,control", [("hf", 1, False), ("hf", 2, True),
                                                   pytest.param("vllm", 2, False, marks=pytest.mark.slow),
                                                   pytest.param("sglang", 1, True, marks=pytest.mark.slow)])
def test_bench_capture_measures_both_sides_and_reports_their_ratio(capsys, engine, rounds, control):
    """vLLM: 2 rounds, one per engine start order (4 engine starts), with --stages (timers inside the
    engines' processes; see ``check_stages``). --control adds a second instance without capture, one
    more entry in the sides every engine's round loop walks; it is checked on hf, where it costs no
    engine start, and on SGLang (three engines in SGLang's environment, driven from a subprocess)."""
    if engine == "vllm":
        pytest.importorskip("vllm")
    argv = [a if prev != "--rounds" else str(rounds) for prev, a in zip([None] + SMALL, SMALL)]
    allowed = os.sched_getaffinity(0)
    extra = (["--control"] if control else []) + (["--stages"] if engine in ("vllm", "hf") else [])
    result = _json(capsys, ["bench", "capture", "--engine", engine, "--json", *argv] + extra)
    if engine == "hf":
        check_hf_stages(result, rounds=rounds, prompts=4, new_tokens=6)
    if engine == "vllm":
        check_stages(result["stages"], layers=2, prompts=4)
        check_stage_share(result["stages"], result["stages_share"])
        from verl_r3.bench.capture import format_result

        table = format_result(result)
        assert "StepCommit: rows into blocks and outputs" in table and "(2.0 calls per step; median call " in table
        commit = result["stages"]["capture"]["worker.commit"]
        assert f"(median call {commit['us_median_call']:.1f})" in table
        # The front end's CPU and collector time, every timed round of every side; the warm-ups are left out.
        front_end = result["front_end"]
        assert set(front_end) == {"capture", "plain"}
        for f in front_end.values():
            assert len(f["cpu_ms"]) == len(f["gc_ms"]) == rounds and all(x > 0 for x in f["cpu_ms"])
            assert all(x >= 0 for x in f["gc_ms"])
        assert f"medians: capture {statistics.median(front_end['capture']['cpu_ms']):.1f}, plain " in table
        assert f"longest round's milliseconds: capture {max(front_end['capture']['gc_ms']):.1f}, plain " in table
        assert f"by the stages alone the ratio would be {result['stages_share']['stages_ratio']:.4f}" in table
        # Both engine starts: the front end (this process) and the engine cores on the CPUs vLLM's workers
        # left free, and this process back on all of its CPUs afterwards.
        where = result["machine"]["placement"]
        assert where["pinned"] and where["worker_cpus"], where
        assert not set(where["pinned"]) & set(where["worker_cpus"])
        assert set(where["pinned"]) | set(where["worker_cpus"]) <= allowed
        assert os.sched_getaffinity(0) == allowed
    if engine == "sglang":  # verl_r3's compact routing, the default: one byte per id as SGLang sent it
        assert result["shape"]["routing_bytes_per_id"] == [1]
    assert result["engine"] == engine and result["rounds"] == rounds and result["target"] == 0.99
    assert len(result["capture_runs"]) == len(result["plain_runs"]) == rounds
    assert result["tokens_per_s_capture"] > 0 and result["tokens_per_s_plain"] > 0
    assert result["ratio"] == pytest.approx(statistics.median(result["capture_runs"]) /
                                            statistics.median(result["plain_runs"]))
    assert result["paired_ratio"] == pytest.approx(statistics.median(
        c / p for c, p in zip(result["capture_runs"], result["plain_runs"])))
    if control:
        assert len(result["control_runs"]) == rounds
        assert result["control_ratio"] == pytest.approx(statistics.median(result["control_runs"]) /
                                                        statistics.median(result["plain_runs"]))
        assert result["control_paired_ratio"] == pytest.approx(statistics.median(
            c / p for c, p in zip(result["control_runs"], result["plain_runs"])))
    else:
        assert "control_ratio" not in result and "control_paired_ratio" not in result


def test_paired_ratio_is_the_median_of_each_rounds_own_ratio():
    """Sides that run at the same speed within each round while the machine slows round after round,
    and one round disturbed on the capturing side: the rounds' own ratios say 1 (one outlier among
    five), where the disturbed round moves the capturing side's median down a place in the drift.
    Rounds of unequal count are refused."""
    from verl_r3.bench.capture import format_result, paired_ratio, summary

    plain = [1000.0, 900.0, 800.0, 700.0, 600.0]
    capture = [1000.0, 900.0, 100.0, 700.0, 600.0]  # one round disturbed on the capture side
    control = [1000.0, 900.0, 800.0, 700.0, 600.0]
    result = summary("hf", {"capture": capture, "plain": plain, "control": control}, {}, {})
    assert result["paired_ratio"] == 1.0 and result["control_paired_ratio"] == 1.0
    assert result["ratio"] == pytest.approx(700.0 / 800.0)  # the disturbed round moved the capture side's median
    assert paired_ratio([990.0, 500.0, 1010.0], [1000.0, 500.0, 1000.0]) == 1.0
    assert paired_ratio([98.0, 99.0], [100.0, 100.0]) == pytest.approx(0.985)
    assert "paired   capture / plain 1.0000, control / plain 1.0000  (the median of each round's own ratio" in \
        format_result(result)
    with pytest.raises(ValueError, match="3 and 2 rounds"):
        paired_ratio([1.0, 2.0, 3.0], [1.0, 2.0])


def check_hf_stages(result: dict, *, rounds: int, prompts: int, new_tokens: int) -> None:
    """``--stages`` on hf: the capturing generator's hooks, counted in its timed rounds only (the
    warm-up and the other sides run none): one prefill and a decode per further token each round,
    each forward beginning and ending once and calling the router hook once per MoE layer, and the
    batch's routing cut once a round."""
    from verl_r3.bench.capture import HF_STAGES, format_result

    stages, share = result["stages"], result["stages_share"]
    forwards = rounds * new_tokens  # the prefill samples the first token, a decode each further one
    assert stages["forwards"] == forwards
    figures = stages["stages"]
    assert list(figures) == [key for key, *_ in HF_STAGES]
    assert figures["begin"]["calls"] == figures["end"]["calls"] == forwards
    assert figures["route"]["calls"] == 2 * forwards and figures["route"]["calls_per_forward"] == 2
    assert figures["gather"]["calls"] == rounds
    assert all(f["us_per_forward"] > 0 for f in figures.values())
    routing = sum(f["us_per_forward"] for f in figures.values())
    assert share["routing_us"] == pytest.approx(routing)
    assert share["share"] == pytest.approx(routing / share["plain_step_us"])
    assert share["stages_ratio"] == pytest.approx(share["plain_step_us"] / (share["plain_step_us"] + routing))
    # The plain side's time per forward: its timed rounds' seconds over the same number of forwards.
    plain_seconds = sum(prompts * new_tokens / tps for tps in result["plain_runs"])
    assert share["plain_step_us"] == pytest.approx(plain_seconds / forwards * 1e6, rel=1e-6)
    table = format_result(result)
    assert f"({forwards} forwards)" in table and "(2.00 calls per forward)" in table
    assert f"by the stages alone the ratio would be {share['stages_ratio']:.4f}" in table


def check_stages(stages: dict, *, layers: int, prompts: int) -> None:
    """``--stages``: each side's figures come from its own engines' processes. Only the capturing
    engines ran the routing stages, once per step (the routers' capture once per MoE layer per
    forward, the scheduler connector once per request that emitted output); the stages both
    engines run were timed on both. Each process writes its figures at the end of a step, so a
    step's stages are counted together."""
    from verl_r3.patches.vllm_cpu_stage_timers_0_32 import STAGES

    capture, plain = stages["capture"], stages["plain"]
    both = {"worker.execute_model", "worker.sample_tokens", "core.schedule", "core.update_from_output", "core.encode"}
    only_capture = {"worker.capture", "worker.snapshot", "worker.begin_step", "worker.commit",
                    "core.build_connector_meta", "core.take_output"}
    assert both | only_capture <= set(capture) <= set(STAGES), sorted(capture)
    # The routing store is written once a block fills (none does at this size); collections may not come.
    assert both <= set(plain) <= both | {"worker.gc", "core.gc"}, sorted(plain)
    steps = capture["worker.sample_tokens"]["calls"]
    # A step that schedules nothing calls execute_model and returns without sampling.
    assert steps > 0 and capture["worker.execute_model"]["calls"] >= steps
    assert capture["worker.commit"]["calls"] == capture["worker.snapshot"]["calls"] == steps
    assert capture["worker.capture"]["calls"] == layers * steps
    assert 0 < capture["core.take_output"]["calls_per_step"] <= prompts
    assert plain["worker.sample_tokens"]["calls"] > 0 and plain["core.update_from_output"]["calls"] > 0
    for side in (capture, plain):
        for key, f in side.items():
            assert f["calls"] > 0 and f["seconds"] > 0 and f["us_per_step"] > 0, (key, f)
            # Every wrapped stage has its median call; the collector's collections are not binned.
            assert (f["us_median_call"] is None) == key.endswith(".gc"), (key, f)
            if f["us_median_call"] is not None and f["calls"] == 1:
                assert f["us_median_call"] == pytest.approx(f["us_per_call"], rel=0.03), (key, f)


def check_stage_share(stages: dict, share: dict) -> None:
    """The summary line of ``--stages`` adds up the capturing engine's routing stages, worker and
    engine core apart, against the plain engine's whole step."""
    from verl_r3.patches.vllm_cpu_stage_timers_0_32 import ROUTING_STAGES

    capture, plain = stages["capture"], stages["plain"]
    in_worker = ("worker.capture", "worker.snapshot", "worker.begin_step", "worker.commit")
    in_core = ("core.build_connector_meta", "core.take_output")
    assert set(ROUTING_STAGES) == set(in_worker + in_core)  # the routing stages the step waits for, all of them
    worker = sum(capture[k]["us_per_step"] for k in in_worker)
    core = sum(capture[k]["us_per_step"] for k in in_core)
    step = sum(plain[k]["us_per_step"] for k in ("worker.execute_model", "worker.sample_tokens", "core.schedule",
                                                 "core.update_from_output"))
    assert share["worker_us"] == pytest.approx(worker) and share["core_us"] == pytest.approx(core)
    assert share["routing_us"] == pytest.approx(worker + core) and share["plain_step_us"] == pytest.approx(step)
    assert share["share"] == pytest.approx((worker + core) / step)
    assert share["stages_ratio"] == pytest.approx(step / (step + worker + core)) and 0 < share["stages_ratio"] < 1


def test_stage_share_weighs_routing_stages_against_the_plain_step_and_needs_that_step():
    from verl_r3.bench.capture import stage_share

    def fig(us):
        return {"calls": 10, "seconds": us * 1e-5, "us_per_call": us, "us_per_step": us, "calls_per_step": 1.0}

    plain = {k: fig(us) for k, us in (("worker.execute_model", 700.0), ("worker.sample_tokens", 100.0),
                                        ("core.schedule", 120.0), ("core.update_from_output", 80.0))}
    capture = dict(plain, **{"worker.commit": fig(30.0), "core.take_output": fig(20.0),
                             "core.encode": fig(500.0), "worker.store_put": fig(400.0)})  # beside the step: left out
    share = stage_share({"capture": capture, "plain": plain})
    assert share == {"routing_us": 50.0, "worker_us": 30.0, "core_us": 20.0, "plain_step_us": 1000.0,
                     "share": 0.05, "stages_ratio": pytest.approx(1000 / 1050)}
    del plain["core.schedule"]
    with pytest.raises(RuntimeError, match="plain engine's processes timed no core.schedule"):
        stage_share({"capture": capture, "plain": plain})


def test_stage_timers_apply_only_in_vllms_own_processes_and_read_sums_them(monkeypatch, tmp_path):
    from verl_r3.patches import vllm_cpu_stage_timers_0_32 as stage_times

    monkeypatch.setenv(stage_times.ENV, str(tmp_path))
    assert stage_times.apply() is False  # this process starts engines: its front end is every engine's
    assert not stage_times.is_applied() and not list(tmp_path.iterdir())
    for pid, (steps, commits, seconds) in {11: (10, 10, 0.002), 12: (30, 30, 0.004)}.items():
        (tmp_path / f"{pid}.json").write_text(json.dumps({"pid": pid, "stages": {
            "worker.sample_tokens": [steps, 0.1], "worker.commit": [commits, seconds], "core.take_output": [0, 0.0]}}))
    figures = stage_times.read(tmp_path)
    assert set(figures) == {"worker.sample_tokens", "worker.commit"}  # a stage never called is left out
    commit = figures["worker.commit"]
    assert commit["calls"] == 40 and commit["calls_per_step"] == 1.0
    assert commit["us_per_step"] == pytest.approx(0.006 / 40 * 1e6) == commit["us_per_call"]
    assert commit["us_median_call"] is None  # figures written without bins


def test_stage_timers_bin_every_call_and_read_gives_the_median_call_of_all_processes(monkeypatch, tmp_path):
    """Each wrapped call is counted in a bin 5% wide; ``read`` merges the bins of every process and
    gives the middle call's bin, which the mean does not show when a few calls are long."""
    from verl_r3.patches import vllm_cpu_stage_timers_0_32 as stage_times

    durations = {21: [20e-6] * 9 + [1e-3], 22: [30e-6] * 5 + [2e-3] * 2}  # median call 30 µs, mean 200 µs
    for pid, seconds in durations.items():
        bins = {}
        for d in seconds:
            bins[stage_times._bin(d)] = bins.get(stage_times._bin(d), 0) + 1
        (tmp_path / f"{pid}.json").write_text(json.dumps({"pid": pid, "stages": {
            "worker.sample_tokens": [len(seconds), 0.1, {}], "worker.commit": [len(seconds), sum(seconds), bins]}}))
    commit = stage_times.read(tmp_path)["worker.commit"]
    assert commit["calls"] == 17 and commit["us_per_call"] == pytest.approx(sum(map(sum, durations.values())) / 17 * 1e6)
    assert commit["us_median_call"] == pytest.approx(20.0, rel=0.05)  # 9 of 17 calls took 20 µs
    for d in (1e-7, 3e-6, 31e-6, 0.4):
        middle = stage_times._median_us({stage_times._bin(d): 1})
        assert middle == pytest.approx(d * 1e6, rel=0.05), d
    assert stage_times._bin(0.0) == stage_times._bin(1e-9) == 0  # at or below the floor: the first bin


def test_stage_timers_wrap_every_stage_count_its_calls_and_revert_exactly(monkeypatch, tmp_path):
    """In a process taken for one of vLLM's children: apply wraps every stage's function on its class,
    a wrapped call is counted, and revert writes the figures and puts back what each class held."""
    pytest.importorskip("vllm")
    import gc
    import importlib
    import multiprocessing

    from verl_r3.patches import vllm_cpu_stage_timers_0_32 as stage_times

    monkeypatch.setenv(stage_times.ENV, str(tmp_path))
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    targets = {}
    for key, (_where, module, qualname, _what) in stage_times.STAGES.items():
        if module:
            cls_name, attr = qualname.split(".")
            cls = getattr(importlib.import_module(module), cls_name)
            targets[key] = (cls, attr, vars(cls).get(attr), getattr(cls, attr))
    assert set(targets) == {k for k in stage_times.STAGES if not k.endswith(".gc")}
    # Another patch replacing a wrapped function meanwhile keeps its replacement on revert.
    scheduler, schedule, original, _ = targets["core.schedule"]
    replacement = lambda self, *a, **k: None  # noqa: E731
    try:
        assert stage_times.apply() is True and stage_times.is_applied() and stage_times.apply() is False
        assert all(getattr(cls, attr) is not fn for cls, attr, _own, fn in targets.values())
        assert stage_times._gc_timer in gc.callbacks
        from vllm.v1.serial_utils import MsgpackEncoder

        MsgpackEncoder().encode_into({"a": 1}, bytearray())
        setattr(scheduler, schedule, replacement)
    finally:
        assert stage_times.revert() is True
        kept = vars(scheduler)[schedule]
        setattr(scheduler, schedule, original)
    assert kept is replacement
    del targets["core.schedule"]
    assert not stage_times.is_applied() and stage_times.revert() is False
    assert all(vars(cls).get(attr) is own and getattr(cls, attr) is fn for cls, attr, own, fn in targets.values())
    assert stage_times._gc_timer not in gc.callbacks
    written = json.loads((tmp_path / f"{os.getpid()}.json").read_text())["stages"]
    assert written["core.encode"][0] == 1 and written["core.encode"][1] > 0
    assert sum(written["core.encode"][2].values()) == 1  # the call's bin


def test_stage_lines_give_a_routing_stage_its_median_call_beside_its_mean_per_step():
    from verl_r3.bench.capture import format_stages

    def fig(us_per_step, calls_per_step=1.0, median=None, calls=10):
        return {"calls": calls, "seconds": 1.0, "us_per_call": us_per_step / calls_per_step, "us_per_step": us_per_step,
                "calls_per_step": calls_per_step, "us_median_call": median}

    plain = {"worker.execute_model": fig(700.0, median=690.0), "worker.gc": fig(50.0, calls=3)}
    capture = dict(plain, **{"worker.commit": fig(66.0, median=28.9), "core.take_output": fig(31.0, 31.0, 0.84),
                             "worker.gc": fig(60.0, calls=4)})
    table = format_stages({"capture": capture, "plain": plain})
    assert len(table) == 2 + 4  # the header lines, then one line per stage that ran
    lines = {what: next(line for line in table if what in line) for what in (
        "StepCommit: rows into blocks and outputs", "take_output (StepRouting): one request's rows",
        "forward (and routing snapshot when capturing)", "Python's garbage collector")}
    assert lines["StepCommit: rows into blocks and outputs"].endswith("66.0         -  (median call 28.9)")
    assert lines["take_output (StepRouting): one request's rows"].endswith("(31.0 calls per step; median call 0.8)")
    assert lines["forward (and routing snapshot when capturing)"].endswith("700.0     700.0")  # not a routing stage
    assert lines["Python's garbage collector"].endswith("(4 / 3 collections)")


def test_bench_capture_stages_without_figures_from_the_capturing_engine_is_an_error(tmp_path):
    from verl_r3.bench.capture import read_stages

    (tmp_path / "plain").mkdir()  # the capturing engine's folder never made: no timers ran there
    with pytest.raises(RuntimeError, match="wrote no stage times"):
        read_stages(str(tmp_path), ["capture", "plain"])


def test_bench_capture_stages_are_refused_on_sglang(capsys):
    assert main(["bench", "capture", "--engine", "sglang", "--stages"]) == 2
    assert "--stages is an hf and vllm option" in capsys.readouterr().err
    assert main(["bench", "capture", "--engine", "vllm", "--int32-routing"]) == 2
    assert "--int32-routing is an sglang option" in capsys.readouterr().err


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
