"""Orbax checkpoints of the whole router: numbered steps, keep-last-N, atomic saves, checked restores.

A checkpoint directory (default ``checkpoints/router``) holds one sub-directory per step::

    checkpoints/router/
      1/  2/  3/                      finished steps (only the last `keep` are kept)
      4.orbax-checkpoint-tmp/         a save in progress, or one killed half-way (never listed)

Each step is written by an Orbax ``CheckpointManager`` as a composite of items:

    state   the RouterState arrays (one array per field, leading arm axis K)   StandardSave
    head    the tag head's params and domain centroids [G, F] (if any)        StandardSave
    extras  any further pytree of arrays (feedback-network params, optimizer
            state, ...), if given                                            StandardSave
    encoder the fine-tuned top layers of the encoder ({"layers": [k, ...]}),
            if the encoder was fine-tuned (finetune.py)                       StandardSave
    meta    JSON: format version, arm registry, policy (static field too),
            encoder identity (with its fine-tuning digest), max_length,
            truncation side (and any other
            plain Router setting), head sizes and tag names, feature dim,
            capacity, a manifest of every array (shape, dtype, CRC-32 of
            its bytes), and the SHA-256 of all of the above               JsonSave

Atomicity: Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
only when every item is written (``AtomicityMode.ATOMIC_RENAME``; a rename is atomic on a POSIX
file system). A process killed mid-save leaves the tmp folder behind; it is never listed nor
restored, and the next save removes it. Old steps are deleted only after the new one is committed.
One writer per directory (Orbax's CheckpointManager is not multi-job safe: a save removes any
unfinished step folder it finds, including another process's save in progress).

Arrays are saved from host memory (numpy), so a checkpoint written on a GPU restores on a CPU and
vice versa. Every array is checked against the manifest on restore, so a garbled file gives a
`CheckpointError` naming the array even where the storage format would not notice; the metadata
(manifest included) is covered by its own SHA-256 (``meta_sha256``, over its canonical JSON), so
an edited or damaged metadata file (a renamed model, swapped slots, another cost weight, one
flipped bit) is a `CheckpointError` too, never a router restored different from the one saved.

The Orbax plumbing (the manager, listing steps, unfinished saves) and the array manifest: ``steps.py``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from mixllm_jax.text import tags
from mixllm_jax.core.budget import OperatingCurve
from mixllm_jax.core.config import RouterConfig
from mixllm_jax.core.policy import Policy
from mixllm_jax.core.state import ArmRegistry, RouterState, grow, shared_prior
from mixllm_jax.store.steps import (ARRAY_ITEMS, DEFAULT_DIR, CheckpointError, array_manifest, list_steps, manager,
                                    muffled_async_leftovers, quiet, to_host, unfinished, verify_arrays)

if TYPE_CHECKING:  # the Router is imported lazily at run time (the text layer is imported when needed)
    from mixllm_jax.text.router import Router

FORMAT_VERSION = 5  # 5: the shared online component; 4: domain centroids in the embedding space; 3: metadata checksum, fine-tuned encoder layers; 2: RouterConfig under one key, operating curve, per-feature ridge
_NO_CHECKSUM = " (saved without a metadata checksum by an older mixllm_jax: train or save it again)"
OLDER_FORMATS = {1: _NO_CHECKSUM, 2: _NO_CHECKSUM,
                 3: " (its domain centroids are in the tag head's feature space, an older mixllm_jax's: train it again)"}
READS_FORMATS = (4, FORMAT_VERSION)  # a format-4 state gets the shared online component at its prior
META_CHECKSUM = "meta_sha256"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Save


def _policy_dict(policy: Policy) -> dict:
    out = {}
    for f in dataclasses.fields(policy):
        v = getattr(policy, f.name)
        out[f.name] = bool(v) if isinstance(v, (bool, np.bool_)) else np.asarray(v).item()
    return out


def _embedding_dim(head: tags.TrainedHead | None, state: RouterState) -> int:
    """The dimension of the encoder embeddings this router consumes."""
    return state.dim - 1 if head is None else int(np.shape(head.centroids)[1])


def _feature_dim(router, emb_dim: int) -> int:
    """The feature dimension the router's own featurization gives embeddings of size emb_dim."""
    e = jax.ShapeDtypeStruct((1, emb_dim), np.float32)
    return int(jax.eval_shape(router.embed_features, e).shape[-1])


def save_router(router: "Router", directory: str | Path = DEFAULT_DIR / "router", step: int | None = None,
                keep: int | None = 3, extras: Any = None) -> int:
    """Save the whole router as a new step of `directory`; returns the step number.

    step: None saves as the latest step + 1 (1 in an empty directory); an existing step is an error.
    keep: how many of the newest steps to keep (older ones are deleted once this one is committed);
      None keeps all.
    extras: an optional pytree of arrays saved and restored alongside (e.g. the binary-feedback
      network's flax params and optax optimizer state); leaves must be numeric or bool arrays.
    """
    directory = Path(directory).absolute()
    if keep is not None and (not isinstance(keep, (int, np.integer)) or keep < 1):
        raise ValueError(f"keep must be a positive integer or None, got {keep!r}")
    if step is not None and (not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0):
        raise ValueError(f"step must be a non-negative integer or None, got {step!r}")
    state, head = router.state, router.head
    if router.registry.capacity != state.capacity:
        raise ValueError(f"registry capacity {router.registry.capacity} != state capacity {state.capacity}")
    emb_dim = _embedding_dim(head, state)
    if _feature_dim(router, emb_dim) != state.dim:
        raise ValueError(f"router is inconsistent: its features have dimension {_feature_dim(router, emb_dim)}, "
                         f"its state dimension {state.dim}")

    items = {"state": to_host({f.name: getattr(state, f.name) for f in dataclasses.fields(state)}, "state")}
    if head is not None:
        items["head"] = to_host({"centroids": head.centroids} | ({} if head.params is None else {"params": head.params}),
                                 "head")
    if extras is not None and jax.tree_util.tree_leaves(extras):
        items["extras"] = to_host(extras, "extras")
    if _finetuned(router.encoder):
        from mixllm_jax.text import finetune

        items["encoder"] = to_host(finetune.top_layers(router.encoder), "encoder")

    meta = {
        "format_version": FORMAT_VERSION,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "registry": router.registry.to_dict(),
        "policy": _policy_dict(router.policy),
        "encoder": None if router.encoder is None else dict(router.encoder.identity),
        "router_config": router.config.to_dict(),
        "curve": None if router.curve is None else router.curve.to_dict(),
        "state": {"capacity": state.capacity, "dim": state.dim, "n_targets": state.n_targets,
                  "load_slots": state.load_slots},
        "embedding_dim": emb_dim,
        "head": None if head is None else {"hidden": int(head.hidden), "features": int(head.features),
                                           "tags": list(head.tags)},
        "arrays": {name: array_manifest(tree) for name, tree in items.items()},
    }
    meta = json.loads(json.dumps(meta, default=_json_default))  # fail here, not half-way through a save
    meta[META_CHECKSUM] = meta_checksum(meta)

    import orbax.checkpoint as ocp

    for stale in unfinished(directory):
        log.info("removing an unfinished save: %s", stale)
    with quiet(), manager(directory, keep=keep, write=True) as mngr:
        latest = mngr.latest_step()
        if step is None:
            step = 1 if latest is None else latest + 1
        if step in mngr.all_steps():
            raise CheckpointError(f"step {step} already exists in {directory}")
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        mngr.save(int(step), args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True)
        mngr.wait_until_finished()
    return int(step)


def meta_checksum(meta: dict) -> str:
    """SHA-256 of a checkpoint's metadata as canonical JSON (sorted keys, no spaces, ASCII), the
    checksum itself and the "step" read_metadata adds left out."""
    body = {k: v for k, v in meta.items() if k not in (META_CHECKSUM, "step")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _finetuned(encoder) -> bool:
    return encoder is not None and "finetune" in (getattr(encoder, "identity", None) or {})


def _json_default(o):
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


# --------------------------------------------------------------------------------------------
# Restore


def _resolve_step(directory: Path, step: int | None) -> tuple[Path, int]:
    """(checkpoint directory, step); `directory` may also name a step folder itself."""
    if step is None and directory.name.isdigit() and (directory / "meta").is_dir():
        return directory.parent, int(directory.name)
    steps = list_steps(directory)
    if not steps:
        why = "the directory does not exist" if not directory.exists() else "it holds no finished step"
        left = unfinished(directory)
        if left:
            why += f"; unfinished saves ignored: {[p.name for p in left]}"
        raise CheckpointError(f"no checkpoint in {directory} ({why})")
    if step is None:
        return directory, steps[-1]
    if step not in steps:
        raise CheckpointError(f"no step {step} in {directory} (steps: {steps})")
    return directory, int(step)


def read_metadata(directory: str | Path = DEFAULT_DIR / "router", step: int | None = None) -> dict:
    """The JSON metadata of a step (latest by default), checked for its format version; adds "step"."""
    directory, step = _resolve_step(Path(directory).absolute(), step)
    with quiet(), manager(directory) as mngr:
        return _read_meta(mngr, directory, step)


def _read_meta(mngr, directory: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    where = f"checkpoint step {step} in {directory}"
    meta_file = directory / str(step) / "meta" / "metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"{where} is corrupted or truncated: its metadata file {meta_file} is missing")
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # JSON decode errors, truncated files
        raise CheckpointError(f"{where} is corrupted or truncated: its metadata {meta_file} "
                              f"cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} is corrupted: its metadata {meta_file} is not a JSON object")
    version = meta.get("format_version")
    if version not in READS_FORMATS:
        old = OLDER_FORMATS.get(version, "") if isinstance(version, int) else ""
        raise CheckpointError(f"{where} has format version {repr(version)[:20]}, which this mixllm_jax cannot "
                              f"read (it reads format versions {' and '.join(map(str, READS_FORMATS))}){old}")
    want = meta.get(META_CHECKSUM)
    try:
        got = meta_checksum(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} is corrupted: its metadata {meta_file} cannot be checked ({e})") from e
    if not isinstance(want, str) or not hmac.compare_digest(want, got):
        raise CheckpointError(f"{where} is corrupted: its metadata {meta_file} fails its checksum (it was "
                              f"edited or damaged after the save)")
    needed = ("registry", "policy", "encoder", "router_config", "curve", "state",
              "embedding_dim", "head", "arrays")
    missing = [k for k in needed if k not in meta]
    if missing:
        raise CheckpointError(f"{where} is corrupted: its metadata lacks {missing}")
    meta["step"] = step
    return meta


def _encoder_dim(encoder) -> int | None:
    config = getattr(encoder, "config", None)
    if getattr(config, "hidden_size", None) is not None:
        return int(config.hidden_size)
    hs = getattr(encoder, "identity", {}).get("hidden_size")
    return None if hs is None else int(hs)


def _load_encoder(identity: dict):
    """The recorded encoder, computing as it did when saved (a transformer's matmul dtype: float32
    unless the identity says bfloat16), so restored decisions equal the saved router's."""
    from mixllm_jax.text import encoder as enc_mod

    kw = {} if identity.get("kind") == "static" else {"matmul_dtype": identity.get("matmul_dtype", "float32")}
    try:
        return enc_mod.load_encoder(identity["name"], **kw)
    except enc_mod.EncoderNotFoundError:
        if identity.get("path") and Path(identity["path"]).is_dir():
            return enc_mod.load_encoder(identity["path"], **kw)
        raise


def upgrade_state(version: int, arrays: dict) -> dict:
    """A saved state's arrays in this format: format 4 predates the shared online component, which
    starts at its prior (of the saved ridge), as after an offline fit."""
    if version == 4 and {"ridge", "B"} <= set(arrays) and not {"shared_A", "shared_A_inv", "shared_B"} & set(arrays):
        return {**arrays, **shared_prior(jax.numpy.asarray(arrays["ridge"]), int(np.shape(arrays["B"])[-1]))}
    return arrays


def restore_router(directory: str | Path = DEFAULT_DIR / "router", step: int | None = None,
                   encoder: Any = "auto", capacity: int | None = None, expected_dim: int | None = None,
                   extras_like: Any = None) -> tuple["Router", Any]:
    """Restore a router saved by `save_router`: (Router, extras) from `step` (latest by default).

    encoder: "auto" loads the encoder recorded in the checkpoint (None if it had none); an Encoder
      (its hidden size must match the checkpoint's); or None for feature-only use. When the router
      was trained with a fine-tuned encoder, its saved top layers are put onto the loaded (base)
      encoder, checked against the recorded digest.
    capacity: arm capacity of the restored state; larger than saved pads it with free slots (the
      registry follows); smaller is an error.
    expected_dim: the feature dimension d (bias included) the caller needs; another is an error.
    extras_like: a pytree with the structure of the saved extras (e.g. freshly initialised params
      and optimizer state) to restore them into; leaves that are jax arrays there come back as jax
      arrays. Without it, extras come back as nested dicts/lists of numpy arrays. Extras are
      returned as saved: `capacity` does not grow them. None when the step saved no extras.

    Raises CheckpointError naming the problem: no checkpoint or unknown step, a corrupted or
    truncated step, an incompatible format version, a feature dimension other than expected, a
    capacity smaller than saved.
    """
    try:
        return _restore_router(directory, step, encoder, capacity, expected_dim, extras_like)
    except CheckpointError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError) as e:  # never a raw KeyError from metadata
        raise CheckpointError(f"checkpoint in {directory} (step {step if step is not None else 'latest'}) is "
                              f"corrupted or incompatible: unexpected metadata ({type(e).__name__}: "
                              f"{str(e)[:200]})") from e


def _restore_router(directory, step, encoder, capacity, expected_dim, extras_like):
    import orbax.checkpoint as ocp
    from mixllm_jax.text.router import Router

    directory, step = _resolve_step(Path(directory).absolute(), step)
    where = f"checkpoint step {step} in {directory}"
    with quiet(), manager(directory) as mngr:
        meta = _read_meta(mngr, directory, step)
        shapes = meta["state"]
        dim, saved_cap, emb_dim = int(shapes["dim"]), int(shapes["capacity"]), int(meta["embedding_dim"])

        # checks that need no arrays: fail fast, before reading anything big
        if expected_dim is not None and int(expected_dim) != dim:
            raise CheckpointError(f"{where} has feature dimension d={dim} (bias included), expected {expected_dim}")
        if capacity is not None and int(capacity) < saved_cap:
            raise CheckpointError(f"{where} has capacity {saved_cap}; cannot restore into the smaller capacity "
                                  f"{capacity} (arms would be lost)")
        if encoder == "auto":
            encoder = None if meta["encoder"] is None else _load_encoder(meta["encoder"])
        if encoder is not None:
            enc_dim = _encoder_dim(encoder)
            if enc_dim is not None and enc_dim != emb_dim:
                name = getattr(encoder, "identity", {}).get("name")
                raise CheckpointError(f"{where} routes on embeddings of dimension {emb_dim}, but the encoder "
                                      f"{name!r} gives dimension {enc_dim}")
            saved_name = (meta["encoder"] or {}).get("name")
            if saved_name is not None and getattr(encoder, "identity", {}).get("name") != saved_name:
                warnings.warn(f"{where} was saved with encoder {saved_name!r}, restoring with "
                              f"{encoder.identity.get('name')!r}", stacklevel=2)
        try:
            config = RouterConfig.from_dict(meta["router_config"])
            curve = None if meta["curve"] is None else OperatingCurve.from_dict(meta["curve"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{where} is incompatible or corrupted: bad router config or operating "
                                  f"curve in its metadata ({e})") from e

        manifest = meta["arrays"]
        present = [k for k in ARRAY_ITEMS if k in manifest]
        finetuned = "finetune" in (meta["encoder"] or {})
        if ("state" not in present or ("head" in present) != (meta["head"] is not None)
                or ("encoder" in present) != finetuned):
            raise CheckpointError(f"{where} is corrupted: its manifest lists items {present}")
        for item in present:
            if not (directory / str(step) / item).is_dir():
                raise CheckpointError(f"{where} is corrupted or truncated: item folder {item!r} is missing")
        args = {k: ocp.args.StandardRestore() for k in present}
        if "extras" in present and extras_like is not None:
            args["extras"] = ocp.args.StandardRestore(
                jax.tree.map(lambda a: np.zeros(np.shape(a), np.asarray(a).dtype), extras_like))
        try:
            with muffled_async_leftovers():
                got = mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # tensorstore / orbax errors on missing or garbled files
            msg = str(e).split(" [tensorstore_spec")[0]
            msg = msg if len(msg) <= 600 else msg[:600] + " ..."
            raise CheckpointError(f"{where} is corrupted or truncated: reading its arrays failed "
                                  f"({type(e).__name__}: {msg})") from e

    restored = {k: got[k] for k in present}
    for item, tree in restored.items():
        verify_arrays(tree, manifest[item], item, where)

    fields = {f.name for f in dataclasses.fields(RouterState)}
    restored["state"] = upgrade_state(meta["format_version"], restored["state"])
    if set(restored["state"]) != fields:
        raise CheckpointError(f"{where} is incompatible: state fields {sorted(restored['state'])} "
                              f"!= {sorted(fields)}")
    state = RouterState(**{k: jax.numpy.asarray(v) for k, v in restored["state"].items()})
    if (state.capacity, state.dim, state.n_targets, state.load_slots) != (
            saved_cap, dim, int(shapes["n_targets"]), int(shapes["load_slots"])):
        raise CheckpointError(f"{where} is corrupted: state arrays have shape (K={state.capacity}, d={state.dim}, "
                              f"T={state.n_targets}, C={state.load_slots}), the metadata says {shapes}")

    try:
        registry = ArmRegistry.from_dict(meta["registry"])
        policy_fields = {f.name for f in dataclasses.fields(Policy)}
        unknown = sorted(set(meta["policy"]) - policy_fields)
        if unknown:
            raise CheckpointError(f"{where} is incompatible: unknown policy fields {unknown}")
        policy = Policy(**meta["policy"])
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where} is corrupted: bad registry or policy in its metadata ({e})") from e
    active = np.asarray(state.active)
    bad = {n: s for n, s in registry.slots.items() if not (0 <= s < saved_cap and active[s])}
    if registry.capacity != saved_cap or bad:
        raise CheckpointError(f"{where} is corrupted: registry (capacity {registry.capacity}, slots {bad or '...'}) "
                              f"does not match the state (capacity {saved_cap})")

    if finetuned and encoder is not None and encoder.identity.get("finetune") != meta["encoder"]["finetune"]:
        from mixllm_jax.text import finetune

        try:  # the base encoder with the saved fine-tuned layers put back
            encoder = finetune.splice(encoder, restored["encoder"], meta["encoder"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: its fine-tuned encoder layers cannot be restored ({e})") from e

    head = None
    if meta["head"] is not None:
        h = meta["head"]
        head = tags.TrainedHead(restored["head"].get("params"), int(h["hidden"]), int(h["features"]),
                                tuple(h["tags"]), restored["head"]["centroids"])
        if _embedding_dim(head, state) != emb_dim:
            raise CheckpointError(f"{where} is corrupted: head input dim {_embedding_dim(head, state)} "
                                  f"!= embedding dim {emb_dim}")
    router = Router(encoder=encoder, head=head, state=state, registry=registry, policy=policy,
                    config=config, curve=curve)
    try:
        feat_dim = _feature_dim(router, emb_dim)
    except Exception as e:
        raise CheckpointError(f"{where} is corrupted: its head cannot featurize embeddings of dimension "
                              f"{emb_dim} ({type(e).__name__}: {e})") from e
    if feat_dim != dim:
        raise CheckpointError(f"{where} is corrupted: its head and settings give features of dimension "
                              f"{feat_dim}, its state has dimension {dim}")

    if capacity is not None and int(capacity) > saved_cap:
        router.state = grow(state, int(capacity))
        registry.capacity = int(capacity)

    extras = restored.get("extras")
    if extras is not None and extras_like is not None:
        extras = jax.tree.map(lambda a, like: jax.numpy.asarray(a) if isinstance(like, jax.Array) else a,
                              extras, extras_like)
    return router, extras
