"""Every patch module follows the ledger's rules: listed in patches/README.md, a header with the
five required parts, and apply/revert/is_applied/check_version functions. Importing one
changes nothing (its is_applied() is False in a fresh interpreter)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PATCHES = Path(__file__).resolve().parents[1] / "patches"
MODULES = sorted(p.stem for p in PATCHES.glob("*.py") if not p.stem.startswith("_"))
HEADER_PARTS = ("What it patches", "Why", "Upstream reference", "Versions tested", "Remove when")


def test_there_are_patches():
    assert len(MODULES) >= 5, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_each_patch_is_in_the_ledger_and_has_its_header_and_functions(name):
    ledger = (PATCHES / "README.md").read_text()
    assert f"| `{name}.py` |" in ledger
    tree = ast.parse((PATCHES / f"{name}.py").read_text())
    header = ast.get_docstring(tree) or ""
    missing = [part for part in HEADER_PARTS if part not in header]
    assert not missing, f"{name}: header lacks {missing}"
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {"apply", "revert", "is_applied", "check_version"} <= functions, functions


def test_importing_the_patches_applies_nothing():
    code = ("import importlib, json; mods = %r; "
            "print(json.dumps({m: importlib.import_module('verl_r3.patches.' + m).is_applied() for m in mods}))")
    out = subprocess.run([sys.executable, "-c", code % MODULES], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"' in out.stdout and "true" not in out.stdout.splitlines()[-1], out.stdout
