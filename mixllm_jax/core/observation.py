"""Observations: what an answered query teaches its arm -- the targets (quality, log completion
tokens) in the state's target order (state.QUALITY, state.LOG_TOKENS). The one builder of the
offline fit, the simulator and the server's feedback."""

from __future__ import annotations

import numpy as np

from mixllm_jax.core.state import LOG_TOKENS, QUALITY

MAX_TOKENS = 10_000_000  # token counts above this (from a client, a backend or a log) are clipped or refused


def log_tokens(completion_tokens) -> np.ndarray:
    """The length target: log of completion tokens, clipped to [1, MAX_TOKENS]: any shape -> float32."""
    return np.log(np.clip(np.asarray(completion_tokens, np.float64), 1.0, MAX_TOKENS)).astype(np.float32)


def targets(quality, completion_tokens) -> np.ndarray:
    """quality [N], completion_tokens [N] -> targets [N, T] float32."""
    quality = np.asarray(quality, np.float32)
    out = np.empty(quality.shape + (2,), np.float32)
    out[..., QUALITY], out[..., LOG_TOKENS] = quality, log_tokens(completion_tokens)
    return out
