"""What the installed MLX quantizes: the widths and group sizes ``mx.quantize`` (affine) takes.

Asked of MLX itself rather than listed, so that a newer MLX's widths are accepted. The converter
checks its expert widths here, the runtime its KV cache width (``kv_bits``).
"""

from __future__ import annotations

import functools

import mlx.core as mx


@functools.lru_cache(maxsize=None)
def mlx_quantizes(bits: int, group_size: int) -> bool:
    """Whether this MLX's ``mx.quantize`` (affine) takes this width and group size."""
    if not (0 < bits <= 32 and 0 < group_size <= 4096):
        return False
    try:
        mx.eval(mx.quantize(mx.zeros((1, group_size)), group_size, bits, mode="affine"))
        return True
    except (ValueError, RuntimeError, TypeError):
        return False


def supported_bits() -> list[int]:
    return [b for b in range(1, 17) if mlx_quantizes(b, 64) or mlx_quantizes(b, 32)]


def supported_group_sizes() -> list[int]:
    return [g for g in (8, 16, 32, 64, 128, 256, 512, 1024) if mlx_quantizes(4, g)]
