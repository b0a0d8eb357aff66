"""``verl-r3 bench startup``: fresh interpreters import verl without and with verl_r3 activated."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("verl")

from verl_r3.cli import main  # noqa: E402


@pytest.mark.slow
def test_startup_bench_imports_both_sides_and_activation_loads_no_engine(capsys):
    assert main(["bench", "startup", "--json", "--repeats", "1", "--cpu-platform"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["module"], r["cpu_platform"], r["repeats"]) == ("verl", True, 1)
    assert len(r["plain_runs"]) == len(r["activated_runs"]) == 1
    assert r["ratio"] == pytest.approx(r["seconds_activated"] / r["seconds_plain"])
    # Activation loads verl_r3's own modules, and none of verl's engines, rollouts or agent loops.
    assert r["modules_activated"] > r["modules_plain"]
    assert r["heavy_plain"] == [] and r["heavy_activated"] == []
    assert r["machine"]["verl"]


def test_startup_bench_reports_a_failing_import(capsys):
    assert main(["bench", "startup", "--repeats", "1", "--module", "no_such_module_here"]) == 2
    err = capsys.readouterr().err
    assert "importing no_such_module_here (plain) failed" in err and "ModuleNotFoundError" in err
