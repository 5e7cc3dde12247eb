"""Offline training and evaluation over several devices and processes (hosts).

    mixllm-jax train ... --devices 4                  # one process, 4 local devices
    mixllm-jax train ... --coordinator HOST:PORT --num-processes 2 --process-id I [--devices N]

Within a process, `--devices N` builds a ("batch", "arms") mesh of N local devices
(`--arm-shards M` puts M of them on the arm axis): the encoder's batches are split over the devices,
the arms' statistics (`mesh.arm_stats`) are summed over them, and eval routes on the mesh.

Across processes (`jax.distributed.initialize`), process i of P embeds its share of the log, the
queries i, i + P, i + 2P, ... (through the embedding cache), and the shares are gathered
(`multihost_utils.process_allgather`), so every process holds the embeddings of the whole log in the
log's order; every process trains the same head on them. Each process then computes the arm
statistics (X^T W X, X^T W Y, sum w y^2, counts) of its own queries, the statistics are gathered and
summed in process order in float64 (the same sum on every process), and `train.train_router` fits
the arms from them (evidence ridge, cross-fitted folds) as from one process's: the merged state
equals the single-process state within float32 tolerance, and is the same on every process.
Process 0 writes the reports; every process takes part in saving the checkpoint (Orbax saves
collectively: the folder must be on storage every process can reach).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np


class _Lazy:
    """mixllm_jax.offline.mesh on first use: the CLI builds its parser without importing jax."""

    def __getattr__(self, name):
        from mixllm_jax.offline import mesh
        return getattr(mesh, name)


mesh_mod = _Lazy()


_INITIALIZED: tuple | None = None  # (coordinator, num_processes, process_id) of this process's run


def initialize(coordinator: str, num_processes: int, process_id: int, timeout_s: int = 300) -> None:
    """`jax.distributed.initialize` (before anything touches a device), with checked arguments.

    Once per process: a second call with the same arguments (a second command of the same run in
    one process) does nothing."""
    global _INITIALIZED
    import jax

    if not coordinator or ":" not in coordinator:
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    if not (isinstance(num_processes, int) and num_processes >= 1):
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id!r}")
    if _INITIALIZED == (coordinator, num_processes, process_id):
        return
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
    _INITIALIZED = (coordinator, num_processes, process_id)


def process_index() -> int:
    import jax
    return jax.process_index()


def process_count() -> int:
    import jax
    return jax.process_count()


def own_rows(n: int, index: int | None = None, count: int | None = None) -> np.ndarray:
    """This process's share of n rows: index, index + count, index + 2 count, ..."""
    index = process_index() if index is None else index
    count = process_count() if count is None else count
    return np.arange(index, n, count)


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """Reassemble rows shared out by `own_rows`: every process's local [n_i, ...] -> [n, ...] in order."""
    count = process_count()
    if count == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    local = np.asarray(local)
    per = -(-n // count)
    padded = np.zeros((per,) + local.shape[1:], local.dtype)
    padded[: len(local)] = local
    every = np.asarray(multihost_utils.process_allgather(padded))  # [count, per, ...]
    out = np.empty((n,) + local.shape[1:], local.dtype)
    for p in range(count):
        rows = own_rows(n, p, count)
        out[rows] = every[p, : len(rows)]
    return out


def sum_over_processes(tree):
    """Sum a pytree of arrays over the processes, in process order, in float64 (cast back to
    float32): the same result on every process."""
    import jax

    if process_count() == 1:
        return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)
    from jax.experimental import multihost_utils

    host = jax.tree.map(lambda a: np.asarray(a, np.float32), tree)
    every = multihost_utils.process_allgather(host)  # leading axis: process
    return jax.tree.map(lambda a: np.asarray(a, np.float64).sum(0).astype(np.float32), every)


def broadcast(tree):
    """Process 0's values of a pytree of arrays, on every process."""
    if process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


def embed(encoder, dataset, max_length: int = 256, truncation_side: str = "left", cache_dir=None,
          progress: bool = True) -> np.ndarray:
    """Embeddings [N, H] of the whole dataset on every process, each process encoding its share."""
    from mixllm_jax.offline import train

    rows = own_rows(len(dataset))
    mine = train.embed(encoder, dataset.select(rows), max_length, truncation_side, cache_dir, progress)
    return gather_rows(mine.astype(np.float32), len(dataset))


def arm_stats(x, quality, log_tokens, *, mesh=None):
    """`fit.arm_stats` over processes and devices: this process's queries' statistics on its mesh
    (default: every local device, data-parallel), summed over the processes.

    x is taken from process 0 (so a head that trained a hair differently elsewhere cannot split
    the processes' states); the result is the same on every process.
    """
    from mixllm_jax.core.padding import pad_rows

    mesh = mesh_mod.make_mesh() if mesh is None else mesh
    n = len(x)
    size = 1 << max(0, (n - 1).bit_length())  # few shapes over the folds: each is one collective program
    x = np.asarray(broadcast(pad_rows(np.asarray(x, np.float32), size)))[:n]
    rows = own_rows(n)
    local = mesh_mod.arm_stats(x[rows], np.asarray(quality)[rows], np.asarray(log_tokens)[rows], mesh=mesh)
    return sum_over_processes(local)


# ---- the command line ---------------------------------------------------------------------------

def add_arguments(p) -> None:
    """The sharding options of `train` and `eval` (and their defaults: none of them)."""
    g = p.add_argument_group("devices and hosts")
    g.add_argument("--devices", type=int, default=None,
                   help="shard over N local devices: the encoder's batches, the arm statistics and eval's "
                        "routing (on CPU, N host devices are made when jax starts)")
    g.add_argument("--arm-shards", type=int, default=1,
                   help="of --devices, how many split the arm axis K (A_inv, A, B) instead of the batch")
    g.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0 for a multi-process run (jax.distributed); each process "
                        "embeds its share of the log and sums its arm statistics, the sums are merged")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the multi-process run")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. N-1")


@dataclasses.dataclass
class Parallel:
    """How a train/eval command spreads its work (see `from_args`)."""

    mesh: object = None  # a mesh of local devices, or None (one device, the unsharded code)
    processes: int = 1

    @property
    def active(self) -> bool:
        return self.mesh is not None or self.processes > 1

    @property
    def writer(self) -> bool:
        """Whether this process writes reports (process 0)."""
        return self.processes == 1 or process_index() == 0

    def encoder(self, encoder):
        """The encoder, its batches split over the mesh's devices when there is a mesh."""
        if self.mesh is None or self.mesh.devices.size == 1 or encoder is None:
            return encoder
        return mesh_mod.shard_encoder(encoder, self.mesh)

    def embed_fn(self, encoder, max_length, truncation_side, cache_dir=None, progress=True) -> Callable:
        """dataset -> embeddings [N, H]: this process's share, gathered when there are several."""
        enc = self.encoder(encoder)
        if self.processes > 1:
            return lambda ds: embed(enc, ds, max_length, truncation_side, cache_dir, progress)
        from mixllm_jax.offline import train
        return lambda ds: train.embed(enc, ds, max_length, truncation_side, cache_dir, progress)

    def arm_stats(self, x, quality, log_tokens):
        """For `train.train_router(arm_stats=...)`."""
        if self.processes > 1:
            return arm_stats(x, quality, log_tokens, mesh=self.mesh)
        return mesh_mod.arm_stats(x, quality, log_tokens, mesh=self.mesh)

    def route(self, state, x, prompt_tokens, policy, bonus=None, key=None):
        """For `pipeline.evaluate_router(route=...)`: engine.route on the mesh."""
        return mesh_mod.route(state, x, prompt_tokens, policy, bonus, key, mesh=self.mesh)

    def train_kwargs(self, encoder, dataset, config) -> dict:
        """Keyword arguments of `train.train_router` for this layout and RouterConfig ({} when nothing
        is sharded). With config.finetune the encoder is fine-tuned (and the log embedded) on one
        device: only the arms' statistics are sharded."""
        if not self.active:
            return {}
        if config.finetune is not None and self.processes > 1:
            raise SystemExit("--finetune-encoder runs in one process (drop --coordinator), --devices is fine")
        kw = {"arm_stats": self.arm_stats}
        if config.finetune is None:
            kw["embeddings"] = self.embed_fn(encoder, config.max_length, config.truncation_side)(dataset)
        return kw

    def eval_kwargs(self, router) -> dict:
        """Keyword arguments of `pipeline.evaluate_router` for this layout."""
        if not self.active:
            return {}
        kw = {"embed": self.embed_fn(router.encoder, router.max_length, router.truncation_side)}
        if self.mesh is not None:
            kw["route"] = self.route
        return kw


def _want_cpu_devices(n: int) -> None:
    """Ask for n CPU host devices before jax starts a backend (XLA reads XLA_FLAGS then; harmless
    on a GPU: it sizes the CPU client)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(n)}".strip()


def from_args(args) -> Parallel:
    """Set up devices and processes from the options of `add_arguments` (call it before anything
    touches a device: jax.distributed and the CPU device count must come first)."""
    devices = getattr(args, "devices", None)
    arms = getattr(args, "arm_shards", 1) or 1
    coord = getattr(args, "coordinator", None)
    nproc = getattr(args, "num_processes", None)
    pid = getattr(args, "process_id", None)
    if (coord is None) != (nproc is None) or (coord is None) != (pid is None):
        raise SystemExit("--coordinator, --num-processes and --process-id go together")
    if devices is not None and devices < 1:
        raise SystemExit(f"--devices must be >= 1, got {devices}")
    if arms != 1 and devices is None:
        raise SystemExit("--arm-shards needs --devices")
    if devices is not None:
        _want_cpu_devices(devices)
    par = Parallel()
    if coord is not None:
        try:
            initialize(coord, nproc, pid)
        except ValueError as e:
            raise SystemExit(str(e))
        par.processes = nproc
    if devices is not None:
        import jax

        local = jax.local_devices()
        if devices > len(local):
            raise SystemExit(f"--devices {devices}: this process has {len(local)} {jax.default_backend()} "
                             f"device(s)")
        try:
            par.mesh = mesh_mod.make_mesh(local[:devices], arms=arms)
        except ValueError as e:
            raise SystemExit(f"--arm-shards: {e}")
    elif par.processes > 1:
        import jax
        par.mesh = mesh_mod.make_mesh(jax.local_devices()[:1])
    return par
