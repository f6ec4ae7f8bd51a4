"""Benchmarks of this project. `python -m bench` compares reference and fast numerics (bench/run.py)."""
