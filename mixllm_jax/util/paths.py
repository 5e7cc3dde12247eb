"""Where shared (non-versioned) data lives."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """The shared data folder: env ``MIXLLM_SHARED``, else ``shared/`` beside the repository root."""
    env = os.environ.get("MIXLLM_SHARED")
    if env:
        return Path(env).expanduser()
    return REPO_ROOT.parent / "shared"
