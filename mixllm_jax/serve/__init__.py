"""The HTTP router service (`mixllm-jax serve`, `python -m mixllm_jax.serve`); see app.py.

Importing the package is light: ServeConfig and its CLI options come from options.py at once; the
rest (JAX, the web stack) loads on first use of a name below, e.g. ``serve.create_app``.
"""

from __future__ import annotations

import importlib

from mixllm_jax.serve.options import ROUTE_ON, ServeConfig, add_serve_arguments, config_from_args

_LAZY = {"create_app": "app", "run": "app", "main": "app", "RouterService": "service", "ApiError": "http",
         "Backend": "backends", "load_backends": "backends", "Metrics": "prometheus"}

__all__ = ["ROUTE_ON", "ServeConfig", "add_serve_arguments", "config_from_args", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
