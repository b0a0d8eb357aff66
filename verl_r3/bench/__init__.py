"""Benchmarks of verl_r3 (run them through ``verl-r3 bench ...``)."""
