"""A checkpoint directory's steps through Orbax, and the manifest that checks every saved array.

    checkpoint/router/1/ 2/ 3/ (committed steps)   4.orbax-checkpoint-tmp/ (a save in progress or killed)

``manager`` opens an Orbax ``CheckpointManager`` over a directory (atomic rename, keep-last-N on
write, no async saves); ``list_steps`` and ``unfinished`` list the committed steps and what killed
saves left behind; ``quiet`` and ``muffled_async_leftovers`` keep Orbax's logging and a failed
restore's late async noise off stderr. ``array_manifest`` records each leaf's shape, dtype and
CRC-32, and ``verify_arrays`` checks a restored tree against it (a ``CheckpointError`` naming the
array). What a step holds and how a router is saved and restored: ``checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
import zlib
from pathlib import Path

import jax
import numpy as np

DEFAULT_DIR = Path("checkpoints")
ARRAY_ITEMS = ("state", "head", "extras", "encoder")
TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
    """A checkpoint is missing, unfinished, corrupted, or does not fit what is asked of it."""


# --------------------------------------------------------------------------------------------
# Orbax plumbing


@contextlib.contextmanager
def quiet():
    """Silence Orbax's absl INFO/WARNING lines while we call it (errors still pass)."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


@contextlib.contextmanager
def muffled_async_leftovers(quiet_s: float = 0.3, max_s: float = 3.0):
    """When an Orbax restore fails on a damaged file, its other pending reads still finish on
    worker threads and call back into the event loop Orbax has closed ("Event loop is closed"
    tracebacks), and its failed tasks are logged when collected: noise on stderr after our clear
    error. On failure only, wait until `quiet_s` passes without such a leftover (at most `max_s`)
    with exactly those two kinds of message filtered out, then re-raise."""
    try:
        yield
    except Exception:
        old_hook = sys.unraisablehook
        alog = logging.getLogger("asyncio")
        old_level = alog.level
        last = [time.monotonic()]

        def hook(u):
            if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
                last[0] = time.monotonic()
            else:
                old_hook(u)

        sys.unraisablehook = hook
        alog.setLevel(logging.CRITICAL)
        try:
            start = time.monotonic()
            while time.monotonic() - last[0] < quiet_s and time.monotonic() - start < max_s:
                time.sleep(0.05)
            gc.collect()
        finally:
            sys.unraisablehook = old_hook
            alog.setLevel(old_level)
        raise


def manager(directory: Path, *, keep: int | None = None, write: bool = False):
    import orbax.checkpoint as ocp

    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in ARRAY_ITEMS:
        registry.add(item, ocp.args.StandardSave)
        registry.add(item, ocp.args.StandardRestore)
    registry.add("meta", ocp.args.JsonSave)
    registry.add("meta", ocp.args.JsonRestore)
    kw = {}
    if hasattr(ocp.options, "AtomicityOptions"):  # older Orbax: atomic rename is the local default
        kw["atomicity_options"] = ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.ATOMIC_RENAME)
    if write and hasattr(ocp.checkpoint_managers, "LatestN"):
        kw["preservation_policy"] = ocp.checkpoint_managers.LatestN(keep)
    elif write:
        kw["max_to_keep"] = keep
    options = ocp.CheckpointManagerOptions(
        create=write,
        cleanup_tmp_directories=write,  # a save removes what a killed save left behind
        enable_async_checkpointing=False,  # save() returns once the step is committed
        **kw,
    )
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def unfinished(directory: Path) -> list[Path]:
    """Folders of saves that never committed (killed mid-save)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if TMP_MARK in p.name)


def list_steps(directory: str | Path = DEFAULT_DIR / "router") -> list[int]:
    """The committed steps in `directory`, oldest first ([] when there are none)."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        return []
    with quiet(), manager(directory) as mngr:
        return sorted(int(s) for s in mngr.all_steps())


# --------------------------------------------------------------------------------------------
# Array manifest: shape, dtype and CRC-32 of every leaf, keyed by a normalized path


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_path(keypath) -> str:
    """'a/b/0' for a key path; the same for a namedtuple and the dict Orbax restores it as."""
    return "/".join(_key_name(k) for k in keypath)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def to_host(tree, what: str):
    """Every leaf as a numpy array of a numeric or bool dtype."""
    def conv(path, leaf):
        a = np.asarray(jax.device_get(leaf))
        if a.dtype.kind not in "biufc":
            raise ValueError(f"{what} leaf {leaf_path(path)!r} must be a numeric or bool array, got {a.dtype}")
        return a
    return jax.tree_util.tree_map_with_path(conv, tree)


def array_manifest(tree) -> dict:
    return {leaf_path(p): {"shape": list(a.shape), "dtype": a.dtype.name, "crc32": _crc(a)}
            for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def verify_arrays(tree, manifest: dict, item: str, where: str) -> None:
    leaves = {leaf_path(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(tree)}
    missing = sorted(set(manifest) - set(leaves))
    extra = sorted(set(leaves) - set(manifest))
    if missing or extra:
        raise CheckpointError(f"{where} is corrupted: item {item!r} has arrays {extra} not in its manifest "
                              f"and lacks {missing}")
    for name, want in manifest.items():
        a = leaves[name]
        if list(a.shape) != want["shape"] or a.dtype.name != want["dtype"]:
            raise CheckpointError(f"{where} is corrupted: array {item}/{name} is {a.dtype.name}{list(a.shape)}, "
                                  f"the manifest says {want['dtype']}{want['shape']}")
        if _crc(a) != want["crc32"]:
            raise CheckpointError(f"{where} is corrupted: array {item}/{name} fails its checksum "
                                  f"(the file holding it was changed or damaged)")
