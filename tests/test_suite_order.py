"""tests/conftest.py: modules holding a ``slow`` test are collected first, each in one piece."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]


def test_modules_with_a_slow_test_come_first_in_their_collected_order(pytester):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: long\n")
    pytester.makepyfile(
        test_a="def test_a1(): pass\ndef test_a2(): pass\n",
        test_b="import pytest\ndef test_b1(): pass\n@pytest.mark.slow\ndef test_b2(): pass\n",
        test_c="def test_c1(): pass\n",
        test_d="import pytest\n@pytest.mark.parametrize('x', [1, pytest.param(2, marks=pytest.mark.slow)])\n"
               "def test_d1(x): pass\n",
    )
    result = pytester.runpytest("--collect-only", "-q")
    order = [line for line in result.outlines if "::" in line]
    assert order == ["test_b.py::test_b1", "test_b.py::test_b2", "test_d.py::test_d1[1]", "test_d.py::test_d1[2]",
                     "test_a.py::test_a1", "test_a.py::test_a2", "test_c.py::test_c1"]
    # and ``-m "not slow"`` leaves out exactly the marked tests
    result = pytester.runpytest("-q", "-m", "not slow")
    result.assert_outcomes(passed=5, deselected=2)
