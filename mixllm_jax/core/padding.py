"""Row padding: the one batch-size scheme and the one way rows are padded.

``bucket`` over ``BATCH_BUCKETS`` (capped at a serving batch limit with ``top``) gives the padded
size of every batch (the encoder, ``engine``, ``mesh``, ``simulate``, the server), so the number of
compilations stays bounded; ``pad_rows`` pads an array's rows (or another axis) to that size, with
NumPy on host arrays and ``jnp`` on JAX arrays (traced ones included, inside a jit). Padding rows
carry weight 0 (no-ops) or an all-zero mask wherever they reach a computation.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

BATCH_BUCKETS = (1, 8, 32, 128, 512, 2048, 8192)  # padded batch sizes (past the last: its multiples)


def bucket(n: int, buckets: Sequence[int] = BATCH_BUCKETS, top: int | None = None) -> int:
    """The padded size of a batch of n: the smallest of the (ascending) buckets >= n, past the largest
    the next multiple of it; with `top` (a serving batch limit) at most max(top, n)."""
    size = next((int(b) for b in buckets if n <= b), None)
    if size is None:
        size = -(-n // buckets[-1]) * int(buckets[-1])
    return size if top is None else min(size, max(int(top), n))


def pad_rows(a, size: int, value=0, axis: int = 0):
    """a [n, ...] -> [size, ...], rows n..size-1 filled with `value` (`axis`: another axis padded
    instead of the rows). A JAX array (traced too) gives a JAX array, anything else a NumPy one."""
    on_device = isinstance(a, jax.Array)
    a = a if on_device else np.asarray(a)
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return (jnp if on_device else np).pad(a, widths, constant_values=value)
