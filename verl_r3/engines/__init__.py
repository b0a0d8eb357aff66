"""Rollout engines driven directly (outside verl): how to start them with routing capture and how
to read their routing into ``verl_r3.core.record.RoutingRecord``.

Each module imports its engine lazily, so this package imports where the engine is absent.
"""
