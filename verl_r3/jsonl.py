"""Reading JSON-lines files (verl's FileLogger metrics, prompt files) with errors that name the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl"]


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed object)`` of every non-blank line; a line that is not JSON raises
    ``ValueError`` naming ``path:line``."""
    path = Path(path)
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
