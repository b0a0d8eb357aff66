"""Run a test with a patch module reverted, and leave it as it was found (applied or not)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def reverted(patch):
    was_applied = patch.is_applied()
    patch.revert()
    try:
        yield patch
    finally:
        patch.revert()
        if was_applied:
            patch.apply()
