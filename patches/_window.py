"""Version windows of the patches: one check, one error text."""

from __future__ import annotations

import importlib.metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version


def installed_version(distribution: str) -> str | None:
    """The installed ``distribution``'s version, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_window(patch: str, distribution: str, found: str | None, supported: str, hint: str) -> str:
    """Return ``found`` if its release lies in ``supported`` (e.g. ">=0.9.0,<0.10.0"), else raise
    RuntimeError naming the patch, the window, the version found and ``hint`` (what to check)."""
    if found is None:
        raise RuntimeError(f"{patch} patches {distribution} {supported}, but {distribution} is not installed")
    # Compare the release only, so local builds such as 0.9.1+cpu or 0.9.2.dev0 stay inside.
    if Version(Version(found).base_version) not in SpecifierSet(supported):
        raise RuntimeError(f"{patch} supports {distribution} {supported}, found {distribution} {found}; {hint}")
    return found
