"""The documentation points at things that exist: every relative link and its anchor, every
repository path and ``verl_r3.`` name in backticks, and every ``verl-r3`` command and flag the
docs show (README.md, docs/, the patch ledger and the recipe READMEs); and every ``verl_r3.``
name the package's and the patches' own docstrings give."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from verl_r3.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted({REPO / "README.md", REPO / "patches" / "README.md", REPO / "recipes" / "README.md",
               *(REPO / "docs").glob("*.md"), *(REPO / "recipes").glob("*/README.md")})

LINK = re.compile(r"\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:verl_r3|patches|tests|recipes|scripts|docs|requirements)/[^`\s]*)`")
DOTTED = re.compile(r"`(verl_r3(?:\.\w+)+)")
#: ``verl-r3 <command> [<benchmark>]`` and the options after it (``--flag``, ``--flag value``, ``[--flag]``)
COMMAND = re.compile(r"verl-r3 ([a-z][\w-]*)(?: ([a-z][\w-]*))?"
                     r"((?: (?:--?[\w-]+(?:[ =](?!-)[^`\s|\]]+)?|\[[^\]]*\]))*)")


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


def _lines(doc: Path):
    """(line number, line, inside a fenced block) for every line of a markdown file."""
    fenced = False
    for number, line in enumerate(doc.read_text().split("\n"), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        yield number, line, fenced


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file (headings inside code blocks are not)."""
    anchors = set()
    for _, line, fenced in _lines(doc):
        heading = re.match(r"#+ (.*)", line)
        if heading and not fenced:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_docs_are_found():
    assert REPO / "README.md" in DOCS and REPO / "docs" / "capture-cost.md" in DOCS
    assert len(DOCS) >= 7, [_id(d) for d in DOCS]


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_links_and_anchors_resolve(doc):
    broken = []
    for number, line, _ in _lines(doc):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path) if path else doc
            if not resolved.exists():
                broken.append(f"line {number}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"line {number}: {target} (no heading with that anchor in {_id(resolved)})")
    assert not broken, broken


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_repository_paths_exist(doc):
    missing = []
    for number, line, _ in _lines(doc):
        for path in REPO_PATH.findall(line):
            if re.search(r"[<>{}*|\[\]]", path):  # a pattern, not one path
                continue
            path = path.split("::")[0].rstrip(".,:;")
            if not (REPO / path).exists() and not (doc.parent / path).exists():
                missing.append(f"line {number}: {path}")
    assert not missing, missing


def _resolve(name: str) -> None:
    """Import the longest module prefix of a dotted name and read the rest as attributes."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for cut in range(1, len(parts)):
        try:
            obj = importlib.import_module(".".join(parts[:cut + 1]))
        except ModuleNotFoundError as err:
            if not name.startswith(err.name or "\0"):
                raise  # the module exists and failed to import
            break
    else:
        return
    for attribute in parts[cut:]:
        obj = getattr(obj, attribute)


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_verl_r3_names_resolve(doc):
    unknown = []
    for number, line, _ in _lines(doc):
        for name in DOTTED.findall(line):
            try:
                _resolve(name)
            except AttributeError as err:
                unknown.append(f"line {number}: {name} ({err})")
    assert not unknown, unknown


def _subcommands(parser: argparse.ArgumentParser) -> dict | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return None


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_cli_commands_and_flags_exist(doc):
    commands, wrong, seen = _subcommands(build_parser()), [], 0
    for number, line, _ in _lines(doc):
        for command, second, rest in COMMAND.findall(line):
            if command not in commands:
                wrong.append(f"line {number}: no command `verl-r3 {command}`")
                continue
            target, name = commands[command], f"verl-r3 {command}"
            nested = _subcommands(target)
            if nested is not None and second:  # `verl-r3 bench <benchmark>`
                if second not in nested:
                    wrong.append(f"line {number}: no command `{name} {second}`")
                    continue
                target, name = nested[second], f"{name} {second}"
            options = {option for action in target._actions for option in action.option_strings}
            for flag in re.findall(r"--[\w-]+", rest):
                seen += 1
                if flag not in options:
                    wrong.append(f"line {number}: `{name}` has no {flag}")
    assert not wrong, wrong
    if doc == REPO / "README.md":
        assert seen > 20  # the pattern still finds the README's commands


CODE = sorted([*(REPO / "verl_r3").rglob("*.py"), *(REPO / "patches").glob("*.py")])
CODE_NAME = re.compile(r"``(verl_r3(?:\.\w+)+)(?::(\w+))?``")


def test_code_names_real_verl_r3_objects():
    """Docstrings and comments that name a ``verl_r3.`` module or object (``module:attribute``
    included, as entry points write it) name one that exists."""
    unknown, seen = [], 0
    for path in CODE:
        for number, line in enumerate(path.read_text().split("\n"), 1):
            for module, attribute in CODE_NAME.findall(line):
                seen += 1
                name = f"{module}.{attribute}" if attribute else module
                try:
                    _resolve(name)
                except AttributeError as err:
                    unknown.append(f"{_id(path)}:{number}: {name} ({err})")
    assert not unknown, unknown
    assert seen > 30  # the pattern still finds them
