"""Quickstart pieces: arithmetic data, a rule reward, a tiny warm-started MoE and the run report.

``data`` writes verl's RL parquet files, ``reward`` is the custom reward function, ``model``
builds a local model directory verl can load, and ``report`` turns per-variant metric files
into ``summary.json``, ``report.md`` and ``curves.png``.
"""
