"""Benchmarks: each prints a table of figures measured in one run, with the machine it ran on.

Run from the repository root as ``python -m bench.NAME`` (``bench/cpu.sh``, ``bench/gpu.sh``).
"""
