"""Benchmarks of hobbit_mlx (scripts; see bench/README.md). A package so the scripts share code."""
