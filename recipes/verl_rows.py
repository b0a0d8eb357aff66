"""verl's RL parquet rows, shared by the recipes' ``prepare_data.py`` scripts.

A row has the columns ``verl.utils.dataset.rl_dataset.RLHFDataset`` and verl's reward managers read
(the layout of verl's ``examples/data_preprocess/gsm8k.py``): ``data_source``, ``prompt`` (chat
messages), ``ability``, ``reward_model`` (``{"style": "rule", "ground_truth": str}``) and
``extra_info`` (``split``, ``index`` and the source's own fields). Multi-turn rows add
``agent_name`` (the agent loop verl runs for the row).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

__all__ = ["HubUnavailable", "load_hub", "verl_row", "write_split", "write_splits"]


class HubUnavailable(RuntimeError):
    """A hub data set could not be loaded (no network, a wrong id); the message says which and how."""


def verl_row(data_source: str, messages: Sequence[dict], ground_truth: str, *, ability: str, split: str,
             index: int, extra: dict | None = None, agent_name: str | None = None) -> dict:
    """One verl row; raises ``ValueError`` naming the sample when a field is empty or malformed."""
    where = f"{data_source} {split} sample {index}"
    if not messages or any(not isinstance(m.get("content"), str) or not m["content"].strip() for m in messages):
        raise ValueError(f"{where}: empty prompt message")
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise ValueError(f"{where}: empty ground truth")
    row = {
        "data_source": data_source,
        "prompt": [{"role": m["role"], "content": m["content"]} for m in messages],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"split": split, "index": index, **(extra or {})},
    }
    if agent_name is not None:
        row["agent_name"] = agent_name
    return row


def write_split(rows: Iterable[dict], path: str | Path) -> int:
    """Write ``rows`` to the parquet file ``path`` (folders created); returns the row count."""
    import pandas as pd

    rows = list(rows)
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    print(f"wrote {len(rows)} rows to {path}", file=sys.stderr)
    return len(rows)


def write_splits(out: str | Path, sources: dict[str, str], rows_for: Callable[[str, str], list[dict]]) -> int:
    """``out/<split>.parquet`` for each ``split: "name,name,..."`` of ``sources``, from ``rows_for(name, split)``.

    Returns the exit status of a ``prepare_data.py``: 0, or 1 with the reason on standard error when
    a hub data set could not be loaded.
    """
    try:
        for split, names in sources.items():  # every split's sources before any is loaded
            if not any(name.strip() for name in names.split(",")):
                raise ValueError(f"--{split}: no source named (got {names!r})")
        for split, names in sources.items():
            rows = [row for name in names.split(",") if name.strip() for row in rows_for(name.strip(), split)]
            write_split(rows, Path(out) / f"{split}.parquet")
    except HubUnavailable as exc:
        print(f"prepare_data: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a split with no rows (no source named, or every row filtered out)
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"prepare_data: error: --out {str(out)!r}: cannot write there ({exc.strerror})", file=sys.stderr)
        return 2
    return 0


def load_hub(hub_id: str, *, config: str | None = None, split: str):
    """``datasets.load_dataset(hub_id, config, split=split)``, with an error that says what to do offline."""
    import datasets

    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # connection, authentication, a wrong id or split
        raise HubUnavailable(
            f"could not load {hub_id}{f' ({config})' if config else ''} split {split!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}). This needs network access to the hub (or HF_DATASETS_OFFLINE=1 with "
            "the data set in the local cache); --smoke writes offline data instead") from exc
