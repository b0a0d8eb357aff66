"""The order the suite's modules run in.

Tests marked ``slow`` run verl's trainer, start an inference engine, train a model or run a
benchmark: from about half a minute to a few minutes each on 2 CPU cores.
``-m "not slow"`` leaves them out.

``make test`` runs the main suite on two pytest-xdist workers, one module at a time per worker
(``--dist loadfile``). Modules that hold a slow test are moved to the front, in their collected
order, so the long runs start first and the many short modules fill in at the end. If the long
runs came last, one worker could go on alone for minutes.
"""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    # sort is stable: within each group, modules and the tests in them keep their collected order
    items.sort(key=lambda item: item.path not in slow_modules)
