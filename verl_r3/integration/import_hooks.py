"""Run a function right after a module is first imported (or now, if it already is).

verl imports its trainer lazily, inside the Ray actor that runs it, long after
``verl_r3.integration.activate`` ran during ``import verl``; importing the trainer eagerly in
every verl process (Ray workers included) would load code they never use. A finder placed
first on ``sys.meta_path`` wraps that one module's loader and removes itself once it has fired.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from typing import Callable

__all__ = ["when_imported"]

_lock = threading.Lock()


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, callbacks: list[Callable]):
        self._loader = loader
        self._callbacks = callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        for callback in self._callbacks:
            callback(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for inspect and tracebacks
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str):
        self.name = name
        self.callbacks: list[Callable] = []

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        with _lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _CallbackLoader(spec.loader, self.callbacks)
        return spec


def when_imported(name: str, callback: Callable) -> None:
    """Call ``callback(module)`` once ``name`` has been imported (immediately if it already is)."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    with _lock:
        finder = next((f for f in sys.meta_path if isinstance(f, _PostImportFinder) and f.name == name), None)
        if finder is None:
            finder = _PostImportFinder(name)
            sys.meta_path.insert(0, finder)
        finder.callbacks.append(callback)
