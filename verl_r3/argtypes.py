"""argparse types of the command lines (``verl-r3``, ``diagnose``, the recipes' ``prepare_data.py``):
a value out of range is refused by the parser, with the option and the value named."""

from __future__ import annotations

import argparse

__all__ = ["non_negative_int", "positive_int", "positive_seconds"]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value
