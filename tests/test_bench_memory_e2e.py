"""``verl-r3 bench memory`` against the tensors the code builds, and ``verl-r3 bench e2e`` end to end
on the quickstart (one short run per side). No timing assertions: the figures are the benchmark's."""

from __future__ import annotations

import json

import pytest
import torch

from verl_r3.bench import memory
from verl_r3.cli import main

pytest.importorskip("verl")

SMALL = dict(layers=3, top_k=2, experts=16, prompts=4, n=2, dp=2, max_prompt=16, max_response=64,
             max_token_len=200, mini_batches=2)
LENGTHS = [(5, 20), (16, 64), (3, 1), (9, 40), (7, 7), (12, 33), (1, 64), (4, 10)]


def test_memory_figures_are_the_sizes_of_the_tensors_the_code_stores():
    from verl_r3.core.record import compact_rows

    r = memory.run(**SMALL, lengths=LENGTHS)
    ids_per_row = 3 * 2
    payload = sum(p + q - 1 for p, q in LENGTHS) * ids_per_row
    # verl_r3 stores what compact_rows makes of each sample's [n, L, K] block (ids below 16: uint8).
    blocks = [compact_rows(torch.randint(0, 16, (p + q, 3, 2))) for p, q in LENGTHS]
    ours, verls, padded = (r["layouts"][k] for k in ("verl_r3", "verl", "verl_padded"))
    assert ours["dtype"] == "uint8" and ours["stored_bytes"] == sum(b.nbytes for b in blocks)
    assert verls["stored_bytes"] == 2 * ours["stored_bytes"] and padded["stored_bytes"] == 8 * 80 * ids_per_row * 2
    assert ours["payload_bytes"] == verls["payload_bytes"] == payload
    assert (ours["bytes_per_id"], verls["bytes_per_id"], padded["bytes_per_id"]) == (1.0, 2.0, 2.0)
    assert r["bytes_per_id"] == 1.0 and r["peak_over_unpadded"] == ours["peak_over_unpadded"]
    assert ours["peak_over_unpadded"] < verls["peak_over_unpadded"] < padded["peak_over_unpadded"]
    assert ours["store_over_unpadded"] == pytest.approx(sum(p + q for p, q in LENGTHS) / sum(p + q - 1 for p, q in LENGTHS))


@pytest.mark.parametrize("experts,compact,server", [(16, torch.uint8, torch.uint8), (256, torch.int16, torch.uint8),
                                                     (300, torch.int16, torch.uint16)])
def test_transport_figures_are_the_sizes_of_what_each_engine_sends(experts, compact, server):
    """The longest sample's routing as SGLang sends it (int32 rows and their base64), as SGLang sends
    it with compact routing, as verl's server hands it on; and an SGLang host buffer of 100 KV slots."""
    import base64

    from verl_r3.patches.sglang_compact_routing_0_5 import compact_ids

    r = memory.run(**dict(SMALL, experts=experts), lengths=LENGTHS, kv_slots=100)
    t = r["transport"]
    assert t["tokens"] == 80 and t["kv_slots"] == 100
    rows = torch.randint(0, experts, (79, 3, 2), dtype=torch.int32)  # the 80-token sample's N - 1 rows
    sent = {"sglang": rows, "sglang_compact": compact_ids(rows, experts, compact), "server": rows.to(server)}
    for name, tensor in sent.items():
        form = t["forms"][name]
        assert form["dtype"] == str(tensor.dtype).removeprefix("torch.")
        assert form["sample_bytes"] == tensor.nbytes and form["bytes_per_id"] == tensor.element_size()
        if name != "server":
            assert form["base64_bytes"] == len(base64.b64encode(tensor.numpy().tobytes()))
            assert form["host_buffer_bytes"] == torch.empty((100, 3, 2), dtype=tensor.dtype).nbytes


def test_memory_over_256_experts_is_two_bytes_and_bad_input_is_refused():
    r = memory.run(**dict(SMALL, experts=300), lengths=LENGTHS)
    assert r["layouts"]["verl_r3"]["dtype"] == "int16" and r["bytes_per_id"] == 2.0
    with pytest.raises(ValueError, match=r"sample 1: lengths \(16, 65\) outside"):
        memory.run(**SMALL, lengths=[(5, 20), (16, 65)])
    with pytest.raises(ValueError, match="max_token_len 50 is below the longest sequence"):
        memory.run(**dict(SMALL, max_token_len=50), lengths=LENGTHS)


def test_memory_cli_paper_shape(capsys):
    assert main(["bench", "memory", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["shape"]["layers"] == 48 and r["shape"]["samples"] == 2048 and r["layouts"]["verl_r3"]["dtype"] == "uint8"
    assert set(r["layouts"]) == {"verl_padded", "verl", "verl_r3"}
    assert r["transport"]["kv_slots"] == 1_000_000 and r["transport"]["forms"]["sglang_compact"]["bytes_per_id"] == 1
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "memory", "--dp", "0"])
    assert exit_.value.code == 2 and "--dp: must be a positive integer" in capsys.readouterr().err


@pytest.mark.slow
def test_e2e_runs_both_sides_and_reports_verls_step_timings(tmp_path, capsys):
    assert main(["bench", "e2e", "--json", "--runs", "1", "--steps", "2", "--skip", "1", "--prompts", "4",
                 "--samples", "2", "--engine", "hf", "--out", str(tmp_path), "--timeout", "420",
                 "--warm-start-steps", "20"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [len(r["step_s"][side]) for side in ("grpo", "grpo_r3")] == [1, 1]
    assert r["config"]["warm_start_steps"] == 20
    assert json.loads((tmp_path / "model" / "warm_start.json").read_text())["warm_start_steps"] == 20
    assert r["ratio"] == pytest.approx(r["medians"]["grpo_r3"]["timing_s/step"] / r["medians"]["grpo"]["timing_s/step"])
    assert all(v > 0 for side in r["medians"].values() for v in side.values())
    r3 = [json.loads(line) for line in (tmp_path / "run0" / "grpo_r3.jsonl").read_text().splitlines()]
    assert all(step["data"]["r3/replay_active_frac"] == 1.0 for step in r3)  # the R3 side did replay
    assert main(["bench", "e2e", "--steps", "2", "--skip", "2"]) == 2
    assert "must exceed the skipped warm-up steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "e2e", "--warm-start-steps", "-1"])
    assert "--warm-start-steps" in capsys.readouterr().err
