"""Each request's routing rows in vLLM's front end (verl_r3.patches.vllm_front_end_routing_0_32).

``RoutingRows`` must answer vLLM's output processor exactly as its list of per-step views does
(the rows appended, the last step's rows trimmed, the concatenation at the end) while owning its
rows; the benchmark runs a real engine under both and checks what each keeps alive.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import weakref

import numpy as np
import pytest

from verl_r3.cli import main
from verl_r3.patches import vllm_front_end_routing_0_32 as patch
from verl_r3.patches.vllm_front_end_routing_0_32 import FLUSH_STEPS, RoutingRows


def _steps(rng: random.Random, dtype, shape: tuple) -> list[tuple[str, np.ndarray]]:
    """A request's front-end events: a prompt chunk, then decode chunks of 1 row, some of several
    rows (a step that accepted several tokens), some of none, and trims of the last step's rows."""
    events = [("append", np.asarray(rng.choices(range(200), k=rng.randint(1, 80) * int(np.prod(shape))),
                                    dtype).reshape(-1, *shape))]
    for _ in range(rng.randint(0, 300)):
        n = rng.choice([1] * 8 + [0, 2, 5])
        chunk = np.asarray(rng.choices(range(200), k=n * int(np.prod(shape))), dtype).reshape(n, *shape)
        events.append(("append", chunk))
        if n > 1 and rng.random() < 0.3:
            events.append(("trim", chunk[:-rng.randint(1, n - 1)]))
    return events


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_routing_rows_answer_vllms_output_processor_as_its_list_does(dtype):
    rng = random.Random(0)
    for case in range(60):
        shape = (rng.randint(1, 6), rng.randint(1, 8))
        vllm_chunks, ours = [], RoutingRows(f"req-{case}")
        assert len(ours) == 0 and not ours and list(ours) == []
        for what, chunk in _steps(rng, dtype, shape):
            if what == "append":
                vllm_chunks.append(chunk)
                ours.append(chunk)
            else:
                vllm_chunks[-1] = chunk
                ours[-1] = chunk
            assert bool(ours) == bool(vllm_chunks) == (len(ours) == 1)
            # The last steps stay as handed over (at most FLUSH_STEPS of them); the rest are copied.
            pending = ours.pending
            assert 1 <= len(pending) <= FLUSH_STEPS
            assert all(a is b for a, b in zip(pending, vllm_chunks[-len(pending):]))
            held = sum(c.nbytes for c in vllm_chunks)
            copied = held - sum(c.nbytes for c in pending)
            assert ours.held_bytes == held
            # Spare room: CPython's bytearray over-allocates about an eighth when it grows.
            assert copied <= ours.nbytes <= copied * 9 // 8 + 8
        want = np.concatenate(vllm_chunks, axis=0)
        got = np.concatenate(ours, axis=0)
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        for chunk in (ours[0], ours[-1], *ours):  # each a new array, writable, over bytes of its own
            np.testing.assert_array_equal(chunk, want)
            assert chunk.flags.writeable and chunk.base is not ours._bytes
            chunk[...] = 0
        np.testing.assert_array_equal(ours[0], want)
        for _ in range(FLUSH_STEPS + 1):  # nothing handed out holds the bytearray: it can still grow
            ours.append(vllm_chunks[-1])


def test_a_steps_rows_are_copied_and_let_go_within_flush_steps():
    ours, first = RoutingRows("req-0"), np.ones((2, 3, 2), np.uint8)
    ours.append(first)
    alive = weakref.ref(first)
    for i in range(FLUSH_STEPS - 1):
        ours.append(np.full((1, 3, 2), i, np.uint8))
    assert ours.pending[0] is first and ours.nbytes == 0  # the last FLUSH_STEPS steps: vLLM's views
    ours.append(np.full((1, 3, 2), 99, np.uint8))
    assert all(c is not first for c in ours.pending) and len(ours.pending) == 1
    first[:] = 7  # vLLM's message buffer, reused or freed once decoded
    del first
    assert alive() is None  # nothing of ours keeps the step's array (and so its message) alive
    rows = np.concatenate(ours, axis=0)
    assert rows.shape == (2 + FLUSH_STEPS, 3, 2) and (rows[:2] == 1).all() and (rows[-1] == 99).all()
    assert [int(rows[2 + i, 0, 0]) for i in range(FLUSH_STEPS - 1)] == list(range(FLUSH_STEPS - 1))


def test_routing_rows_refuse_what_vllms_list_would_mix_up_naming_the_request():
    ours = RoutingRows("req-7")
    with pytest.raises(IndexError, match=r"req-7: only the last step's routing rows can be replaced \(index -1, "
                                         r"after a step\), not index -1 before any step"):
        ours[-1] = np.ones((1, 2, 2), np.uint8)
    with pytest.raises(IndexError, match=r"req-7: the routing rows read as one chunk, index 0 or -1 after a step; "
                                         r"got index 0 before any step"):
        ours[0]
    ours.append(np.ones((2, 2, 2), np.uint8))
    with pytest.raises(IndexError, match=r"got index 1$"):
        ours[1]
    with pytest.raises(IndexError, match=r"not index 0$"):
        ours[0] = np.ones((1, 2, 2), np.uint8)
    ours.append(np.ones((1, 3, 1), np.uint16))  # 6 bytes: not whole rows of 4
    with pytest.raises(ValueError, match=r"req-7: the routing rows of its last 2 steps are 14 bytes, not whole rows "
                                         r"of uint8 \(2, 2\) \(4 bytes\) as its first step's"):
        np.concatenate(ours, axis=0)
    scalar = RoutingRows("req-8")
    scalar.append(np.array(3, np.uint8))
    with pytest.raises(ValueError, match="req-8: a step's routing rows must have a row axis, got a 0-d array"):
        scalar[0]
    late = RoutingRows("req-9")
    for _ in range(FLUSH_STEPS - 1):
        late.append(np.ones((1, 2, 2), np.uint8))
    late.append(np.ones((1, 2, 3), np.uint8))
    with pytest.raises(ValueError, match=f"req-9: the routing rows of its last {FLUSH_STEPS} steps are "
                                         f"{4 * (FLUSH_STEPS - 1) + 6} bytes"):
        late.append(np.ones((1, 2, 2), np.uint8))  # the copy of the last 8 steps finds them


vllm = pytest.importorskip("vllm")


def test_request_states_get_routing_rows_only_while_applied():
    from vllm.v1.engine.output_processor import RequestState

    was = patch.is_applied()
    try:
        patch.revert()
        plain = RequestState.__init__
        assert plain is not patch._request_state_init
        assert patch.apply() is True and patch.apply() is False and patch.is_applied()
        assert RequestState.__init__ is not plain
        state = RequestState.__new__(RequestState)
        calls = []
        patch._originals["RequestState.__init__"] = lambda self, *a, **k: (calls.append((a, k)),
                                                                             setattr(self, "request_id", "req-3"))
        try:
            RequestState.__init__(state, 1, b=2)
        finally:
            patch._originals["RequestState.__init__"] = plain
        assert calls == [((1,), {"b": 2})]  # vLLM's own runs first, with the same arguments
        chunks = state.routed_experts_chunks
        assert isinstance(chunks, RoutingRows) and chunks.request_id == "req-3"
        assert patch.revert() is True and patch.revert() is False and not patch.is_applied()
        assert RequestState.__init__ is plain
    finally:
        (patch.apply if was else patch.revert)()


def test_the_entry_point_applies_it_on_every_platform_once_the_output_processor_is_imported():
    """In a fresh interpreter: vLLM's plugins loaded (as the front end does when it builds its engine
    config) apply nothing until the output processor is imported, then this patch."""
    code = ("import sys, json; from vllm.plugins import load_general_plugins; "
            "from verl_r3.patches import vllm_front_end_routing_0_32 as p; "
            "load_general_plugins(); before = [p.is_applied(), 'vllm.v1.engine.output_processor' in sys.modules]; "
            "import vllm.v1.engine.output_processor as op; "
            "print(json.dumps([before, p.is_applied(), op.RequestState.__init__ is p._request_state_init]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[False, False], True, True]


@pytest.mark.slow
def test_bench_front_end_runs_a_real_engine_under_both_and_only_vllms_keeps_whole_messages(capsys):
    assert main(["bench", "front-end", "--json", "--rounds", "1", "--prompts", "8", "--prompt-len", "16",
                 "--new-tokens", "96"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The engine's start loaded verl_r3's vLLM plugin here, which applies the patch in a front end,
    # and the benchmark leaves it as it found it once the engine had started.
    assert patch.is_applied()
    assert result["routing_equal"] is True
    assert result["shape"]["new_tokens"][0] == 96 and all(6 <= n <= 48 for n in result["shape"]["new_tokens"][1:])
    vllm_side, ours = result["memory"]["vllm"], result["memory"]["verl_r3"]
    row = 4 * 2  # 4 layers, top-2, one byte per id
    for which in ("peak", "tail"):
        x = ours[which]
        # A request's bytearray (its copied rows and about an eighth more) and its last steps'
        # messages: at most FLUSH_STEPS a request.
        assert x["buffers"] <= x["requests"] * (1 + FLUSH_STEPS)
    # vLLM's views keep every message since the longest request began: at the end, one request's
    # rows keep tens of messages alive.
    tail = vllm_side["tail"]
    assert tail["requests"] == 1 and tail["buffers"] > 20 and tail["kept"] > 10 * tail["held"]
    assert ours["tail"]["requests"] == 1 and ours["tail"]["total"] * 10 < tail["total"]
    assert result["peak_total_ratio"] == ours["peak"]["total"] / vllm_side["peak"]["total"] < 0.5
    for side in ("vllm", "verl_r3"):
        assert len(result["tokens_per_s"][side]) == len(result["cpu_ms"][side]) == 1
        assert result["tokens_per_s"][side][0] > 0 and result["cpu_ms"][side][0] > 0
    from verl_r3.bench.front_end import format_result

    table = format_result(result)
    assert f"peak total verl_r3 / vllm {result['peak_total_ratio']:.3f}; routing equal True" in table
    assert f"front-end CPU {result['cpu_ratio']:.4f} (verl_r3 / vllm)" in table


def test_outside_its_window_the_plugin_leaves_vllms_accumulation_and_says_so(monkeypatch, caplog):
    from verl_r3.integration import vllm_cpu

    was = patch.is_applied()
    patch.revert()
    try:
        with monkeypatch.context() as m, caplog.at_level("INFO", logger="verl_r3.integration.vllm_cpu"):
            m.setattr(patch, "installed_vllm_version", lambda: "0.33.0")
            vllm_cpu._apply_front_end_routing(None)  # what the import hook calls
            assert not patch.is_applied()
        assert "vllm_front_end_routing_0_32 supports vllm >=0.32.0,<0.33.0, found vllm 0.33.0" in caplog.text
    finally:
        (patch.apply if was else patch.revert)()
