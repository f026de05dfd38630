"""Test helpers for hobbit_mlx (tiny offline random-weight models)."""
