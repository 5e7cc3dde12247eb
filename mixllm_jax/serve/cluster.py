"""Replicas that learn as one (`serve --cluster nats://HOST:PORT`): the journal as a NATS JetStream
stream, decisions in a JetStream key-value bucket, checkpoints in a shared folder.

* Events: every record the single-process journal would write (feedback with its features, arm
  slot, targets, weight and propensity; usage; LLM added or removed) is published as one message
  (a JSON list of the records written together) to the subject `<stream>.events` of the stream
  `<stream>` (file storage; at --stream-max-mb it refuses new events rather than drop old ones).
  `append` resolves once JetStream has stored the message *and* this replica's own consumer has
  delivered it back, so a client's acknowledged write is durable and read back by the replica it
  asked (read your writes). A record's seq is its message's stream sequence.
* Every replica consumes the stream in order (an ordered push consumer, restarted from the last
  sequence seen after a reconnect) and hands the records to `on_durable` exactly as the local
  journal's writer does: all replicas apply the same records in the same order with the same code
  (applier.Applier), so they hold bit-identical state.
* Decisions: each routed request's feature entry is put in the key-value bucket `<stream>-decisions`
  (TTL --decision-ttl-s, bounded by --decision-max-mb), so feedback for it may arrive at any replica.
  A decision that cannot be shared (the broker down) is kept on this replica (the newest
  MAX_UNSHARED) and put in the bucket when the connection is back; feedback for it meanwhile is
  refused with 503 + Retry-After on every replica, as is any feedback the bucket cannot be asked
  about (never a 404 "never issued" for want of the broker).
  Exactly-once feedback across replicas: a replica claims the request's feedback kinds in the bucket
  by compare-and-set on the entry's revision before it publishes, and gives the claim back if the
  publish fails.
* Checkpoints: each replica saves into `<shared>/<replica>/` and writes `latest.json` (step, stream
  sequence) after each save; a replica that starts restores the newest of them (the highest
  sequence) and consumes the stream from the sequence after it. After a checkpoint the stream is
  purged up to the previous checkpoint's sequence (one checkpoint of slack), so its size is bounded
  by the events between checkpoints.

No state is shared otherwise: the live load model and the per-key decision counts are each
replica's own. See docs/architecture.md, "Replicas".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Callable


from mixllm_jax.store import journal

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 2.0
DELIVERY_TIMEOUT_S = 10.0
RECONNECT_GRACE_S = 30.0  # after a reconnect, a decision unknown to the bucket may be another replica's kept one: 503
MAX_UNSHARED = 20000  # decisions kept until the bucket takes them (the oldest forgotten past it)


class ClusterUnavailable(RuntimeError):
    """The event stream cannot take a write now (the message names the cause, not the address)."""


def check_url(url: str) -> str:
    """`nats://HOST:PORT` (or tls://), else ValueError naming it."""
    if not isinstance(url, str) or not re.match(r"^(nats|tls)://[^/\s:@]+:\d{1,5}$", url):
        raise ValueError(f"cluster must be nats://HOST:PORT (or tls://HOST:PORT), got {url!r}")
    return url


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"{what} must be 1-64 letters, digits, '_' or '-', got {name!r}")
    return name


def entry_to_json(e: journal.Entry, flags: int = 0) -> bytes:
    """A decision record of the bucket: the feature entry and its claimed feedback kinds (bits)."""
    return json.dumps({"x": journal.encode_x(e.x), "slot": e.slot, "generation": e.generation,
                       "model": e.model, "prompt_tokens": e.prompt_tokens, "log_tokens": e.log_tokens,
                       "propensity": e.propensity, "flags": flags}, separators=(",", ":")).encode()


def entry_from_json(raw: bytes) -> tuple[journal.Entry, int]:
    d = json.loads(raw)
    e = journal.Entry(x=journal.decode_x(d["x"]), slot=int(d["slot"]), generation=int(d["generation"]),
                           model=str(d["model"]), prompt_tokens=float(d["prompt_tokens"]),
                           log_tokens=float(d["log_tokens"]), propensity=float(d["propensity"]))
    flags = int(d["flags"])
    e.has_quality, e.has_thumbs = bool(flags & journal.QUALITY_BIT), bool(flags & journal.THUMBS_BIT)
    return e, flags


def kv_key(rid: str) -> str:
    """Request ids are `req-<hex>` (routing.py); anything else cannot be a bucket key."""
    if not re.match(r"^[A-Za-z0-9_-]{1,200}$", rid):
        raise KeyError(rid)
    return rid


class KeptDecisions(dict):
    """rid -> (entry, monotonic time routed): this replica's decisions not in the bucket yet; `lock`
    guards it (the worker thread adds, the NATS thread removes). reconnected_at: when the NATS
    connection last came back (monotonic), the start of the other replicas' sharing of their kept
    decisions (RECONNECT_GRACE_S)."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.reconnected_at = -float("inf")


@dataclasses.dataclass(frozen=True)
class StreamLimits:
    """How long a decision stays in the bucket, and how large the bucket and the stream may grow."""

    decision_ttl_s: float = 3600.0
    decision_max_mb: int = 1024
    stream_max_mb: int = 4096


class StreamJournal:
    """The journal's interface (journal.Journal: append, append_many, start, seq, read, rotate,
    prune, close) over a JetStream stream, plus the shared decision bucket. The NATS client runs on
    its own thread and event loop; the methods are thread-safe and return concurrent Futures."""

    def __init__(self, url: str, stream: str, on_durable: Callable[[list[dict]], None],
                 decision_ttl_s: float = 3600.0, decision_max_mb: int = 1024, stream_max_mb: int = 4096):
        self.url, self.stream = check_url(url), check_name(stream, "stream")
        self.on_durable = on_durable
        self.limits = StreamLimits(decision_ttl_s, decision_max_mb, stream_max_mb)
        self.seq = 0  # the last stream sequence delivered to on_durable
        self.gaps = 0  # sequences the consumer skipped (purged before this replica read them): state is stale
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._unshared = KeptDecisions()
        self._sub = None
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mixllm-nats", daemon=True)
        self._thread.start()
        self._call(self._connect()).result(CONNECT_TIMEOUT_S + 5)

    @property
    def subject(self) -> str:
        return f"{self.stream}.events"

    @property
    def bucket(self) -> str:
        return f"{self.stream}-decisions"

    def _call(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # ---- connection ----------------------------------------------------------------------------

    async def _connect(self) -> None:
        import nats
        from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType, StreamConfig

        async def on_error(e):
            log.warning("NATS: %s", e)

        async def on_disconnect():
            log.warning("NATS: disconnected; writes are refused (503) until it reconnects, routing goes on")

        async def on_reconnect():
            log.info("NATS: reconnected; resuming the event stream after seq %d", self.seq)
            self._unshared.reconnected_at = time.monotonic()
            if self._sub is not None:
                await self._subscribe()
            asyncio.ensure_future(self._share_until_done())  # the decisions made while the broker was away

        try:
            self.nc = await nats.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S, allow_reconnect=True,
                                         max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                         error_cb=on_error, disconnected_cb=on_disconnect,
                                         reconnected_cb=on_reconnect)
        except Exception as e:  # noqa: BLE001  (nats raises several kinds)
            raise ClusterUnavailable(f"cannot connect to the NATS server {self.url}: {type(e).__name__}: {e}") from None
        self.js = self.nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        cfg = StreamConfig(name=self.stream, subjects=[self.subject], storage=StorageType.FILE,
                           discard=DiscardPolicy.NEW, max_bytes=self.limits.stream_max_mb << 20)
        try:
            await self.js.stream_info(self.stream)
        except Exception:  # noqa: BLE001  (not found: create it; another replica may race us, add is idempotent)
            await self.js.add_stream(cfg)
        try:
            self.kv = await self.js.key_value(self.bucket)
        except Exception:  # noqa: BLE001
            self.kv = await self.js.create_key_value(KeyValueConfig(
                bucket=self.bucket, ttl=self.limits.decision_ttl_s, max_bytes=self.limits.decision_max_mb << 20,
                storage=StorageType.FILE))

    async def _subscribe(self) -> None:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001  (the old consumer went with the old connection)
                pass
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.seq + 1)
        self._sub = await self.js.subscribe(self.subject, stream=self.stream, cb=self._on_msg, ordered_consumer=True,
                                            idle_heartbeat=1.0, config=cfg)

    async def _on_msg(self, msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= self.seq:
            return  # delivered again after a consumer reset
        if seq != self.seq + 1:
            self.gaps += seq - self.seq - 1
            log.error("event stream: seqs %d..%d were purged before this replica applied them; its state is stale "
                      "(restart it: it restores the newest shared checkpoint)", self.seq + 1, seq - 1)
        records = []
        try:
            body = json.loads(msg.data)
            for rec in body:
                if isinstance(rec, dict):
                    records.append(dict(rec, seq=seq))
        except (ValueError, TypeError):
            log.error("event stream seq %d is not a JSON list of records; skipped", seq)
        self.seq = seq
        if records:
            try:
                self.on_durable(records)
            except Exception:  # noqa: BLE001  (applying is the service's business)
                log.exception("on_durable failed at seq %d", seq)
        keep = []
        for s, fut in self._waiters:
            if s <= seq:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((s, fut))
        self._waiters = keep

    # ---- the journal's interface ----------------------------------------------------------------

    def read(self) -> list[dict]:
        """Nothing: the records after a checkpoint come through the stream at start()."""
        return []

    def start(self, min_seq: int = 0, timeout_s: float = 600.0) -> int:
        """Consume the stream from min_seq + 1 and wait until every event published before this call
        is delivered (the replay); returns how many were. RuntimeError if the stream no longer holds
        the events after min_seq, or holds fewer than the checkpoint applied."""
        return self._call(self._start(int(min_seq), timeout_s)).result()

    async def _start(self, min_seq: int, timeout_s: float) -> int:
        info = await self.js.stream_info(self.stream)
        first, last = info.state.first_seq, info.state.last_seq
        if last < min_seq:
            raise RuntimeError(f"stream {self.stream!r} ends at seq {last} but the checkpoint holds events up to "
                               f"seq {min_seq}: the stream was recreated; start from a checkpoint without events "
                               f"(a new --shared-checkpoints folder) or restore the stream")
        if last > min_seq and first > min_seq + 1:  # (all purged: first = last + 1)
            raise RuntimeError(f"stream {self.stream!r} starts at seq {first} but the checkpoint holds events up to "
                               f"seq {min_seq}: events {min_seq + 1}..{first - 1} were purged; restore a newer "
                               f"checkpoint (the shared folder holds every replica's)")
        self.seq = min_seq
        await self._subscribe()
        if last > min_seq:
            await asyncio.wait_for(self._delivered(last), timeout_s)
        return max(0, last - min_seq)

    def _delivered(self, seq: int) -> asyncio.Future:
        fut = self._loop.create_future()
        if self.seq >= seq:
            fut.set_result(None)
        else:
            self._waiters.append((seq, fut))
        return fut

    def append(self, record: dict) -> concurrent.futures.Future:
        return journal.first_result(self.append_many([record]))

    def append_many(self, records: list[dict]) -> concurrent.futures.Future:
        """Publish records as one message (all or none); the Future resolves to their seqs (the
        message's stream sequence, one per record) once the message is stored and delivered here;
        ClusterUnavailable when JetStream cannot take it."""
        for rec in records:
            journal._check_json(rec)
        if self._closed:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            fut.set_exception(ClusterUnavailable("the replica is stopping"))
            return fut
        payload = json.dumps([dict(r, t_pub=round(time.time(), 6)) for r in records], separators=(",", ":"),
                             allow_nan=False).encode()
        return self._call(self._publish(payload, len(records)))

    async def _publish(self, payload: bytes, n: int) -> list[int]:
        import nats.errors
        import nats.js.errors

        if not self.nc.is_connected:
            raise ClusterUnavailable("the event stream is unreachable (the NATS connection is down, reconnecting)")
        try:
            ack = await self.js.publish(self.subject, payload, stream=self.stream, timeout=PUBLISH_TIMEOUT_S)
        except nats.errors.TimeoutError:
            raise ClusterUnavailable(f"the event stream did not acknowledge within {PUBLISH_TIMEOUT_S:g} s") from None
        except nats.js.errors.APIError as e:
            raise ClusterUnavailable(f"the event stream refused the event ({e.description})") from None
        except (nats.errors.Error, OSError) as e:
            raise ClusterUnavailable(f"the event stream is unreachable ({type(e).__name__})") from None
        try:  # read your writes: wait until this replica's consumer has it
            await asyncio.wait_for(self._delivered(ack.seq), DELIVERY_TIMEOUT_S)
        except asyncio.TimeoutError:  # stored, so acknowledged; this replica applies it when it arrives
            log.warning("event seq %d stored but not delivered back within %g s", ack.seq, DELIVERY_TIMEOUT_S)
        return [ack.seq] * n

    def rotate(self) -> None:
        """Nothing to rotate: the stream is purged by prune()."""

    def prune(self, upto_seq: int) -> None:
        """Purge the stream's events up to `upto_seq` (a checkpoint in the shared folder holds them)."""
        if upto_seq > 0 and self.nc.is_connected:
            fut = self._call(self.js.purge_stream(self.stream, seq=int(upto_seq) + 1))
            fut.add_done_callback(lambda f: f.exception() and log.warning("stream purge failed: %s", f.exception()))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self.nc.drain()).result(5)
        except Exception:  # noqa: BLE001
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # ---- decisions -------------------------------------------------------------------------------

    def put_decisions(self, items: list[tuple[str, journal.Entry]]) -> concurrent.futures.Future | None:
        """Put routed requests' entries in the bucket (concurrently); None when disconnected. Until
        the bucket has one it is kept here, and put when the connection is back (`_share`)."""
        if not items or self._closed:
            return None
        now = time.monotonic()
        with self._unshared.lock:
            for rid, e in items:
                kv_key(rid)
                self._unshared[rid] = (e, now)
            while len(self._unshared) > MAX_UNSHARED:  # the oldest: they take feedback on this replica only
                self._unshared.pop(next(iter(self._unshared)))
        if not self.nc.is_connected:
            return None
        return self._call(self._share([rid for rid, _ in items]))

    @property
    def unshared(self) -> int:
        """Decisions of this replica not in the bucket yet."""
        return len(self._unshared)

    async def _share(self, rids: list[str] | None) -> int:
        """Put the kept decisions `rids` (None: all) in the bucket; returns how many are still not
        there. Create, never overwrite: an entry already there keeps the feedback claimed on it."""
        import nats.js.errors

        with self._unshared.lock:
            todo = [(r, self._unshared[r]) for r in (list(self._unshared) if rids is None else rids)
                    if r in self._unshared]
        horizon = time.monotonic() - self.limits.decision_ttl_s
        fresh = [(r, e) for r, (e, t) in todo if t > horizon]  # an older one would have expired from the bucket

        async def create(rid, e):
            try:
                await self.kv.create(rid, entry_to_json(e))
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # already there (an earlier put that timed out did land)
        res = await asyncio.gather(*(create(r, e) for r, e in fresh), return_exceptions=True) if fresh else []
        done = {r for (r, _), x in zip(fresh, res) if not isinstance(x, BaseException)}
        done |= {r for r, _ in todo} - {r for r, _ in fresh}
        with self._unshared.lock:
            for r in done:
                self._unshared.pop(r, None)
        bad = len(todo) - len(done)
        if bad:
            log.warning("%d of %d decisions not shared yet: kept, put when the connection is back", bad, len(todo))
        return bad

    async def _share_until_done(self, tries: int = 120) -> None:
        """After a reconnect: share the kept decisions, retrying each second while JetStream comes
        back (bounded; what is left is shared by the next reconnect, or on feedback for it here)."""
        for _ in range(tries):
            if not self._unshared or self._closed:
                return
            try:
                if self.nc.is_connected and not await self._share(None):
                    return
            except Exception:  # noqa: BLE001  (kept; retried)
                log.exception("sharing the kept decisions failed")
            await asyncio.sleep(1.0)

    async def get_decision(self, rid: str) -> journal.Entry | None:
        """The entry of a decision made on any replica (its has_quality / has_thumbs: the kinds
        claimed so far), or None when the bucket answers that nobody issued it (or it expired).
        ClusterUnavailable (a 503) when the bucket cannot be asked, when this replica made the
        decision and could not share it yet, or when the bucket does not know it within
        RECONNECT_GRACE_S of a reconnect (another replica may still be sharing its kept decisions)."""
        try:
            key = kv_key(rid)
        except KeyError:
            return None
        if key in self._unshared:
            if not self.nc.is_connected or await asyncio.wrap_future(self._call(self._share([key]))):
                raise ClusterUnavailable("the decision is not shared with the other replicas yet (the NATS "
                                         "connection is down); it is kept and shared when it is back")
        try:
            got = await asyncio.wrap_future(self._call(self._get(key)))
        except (ValueError, TypeError):  # not a decision record: only replicas write the bucket
            log.warning("decision %r in the bucket is damaged; ignored", rid[:80])
            return None
        if got is None and time.monotonic() - self._unshared.reconnected_at < RECONNECT_GRACE_S:
            raise ClusterUnavailable("the decision is not in the shared store yet: the NATS connection came back "
                                     "moments ago and the replica that made it may still be sharing it")
        return None if got is None else got[0][0]

    async def _get(self, key: str):
        import nats.errors
        import nats.js.errors

        if not self.nc.is_connected:
            raise ClusterUnavailable("the decision store is unreachable (the NATS connection is down)")
        try:
            ent = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (nats.errors.Error, OSError, asyncio.TimeoutError) as e:
            raise ClusterUnavailable(f"the decision store did not answer ({type(e).__name__})") from None
        return entry_from_json(ent.value), ent.revision

    async def claim(self, rid: str, bits: int) -> int | None:
        """Set feedback kinds `bits` on a shared decision by compare-and-set. Returns the bits it
        already had that collide (non-zero: a duplicate), 0 when claimed, None when the decision is
        not in the bucket (the caller falls back to this replica's own entry)."""
        return await asyncio.wrap_future(self._call(self._claim(rid, bits, set_bits=True)))

    async def unclaim(self, rid: str, bits: int) -> None:
        await asyncio.wrap_future(self._call(self._claim(rid, bits, set_bits=False)))

    async def _claim(self, rid: str, bits: int, set_bits: bool) -> int | None:
        import nats.errors
        import nats.js.errors

        try:
            key = kv_key(rid)
        except KeyError:
            return None
        for _ in range(8):  # bounded: each retry means another replica changed the entry meanwhile
            got = await self._get(key)
            if got is None:
                return None
            (e, flags), rev = got
            if set_bits and flags & bits:
                return flags & bits
            new = flags | bits if set_bits else flags & ~bits
            try:
                await self.kv.update(key, entry_to_json(e, new), last=rev)
                return 0
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            except (nats.errors.Error, OSError, asyncio.TimeoutError) as e:
                raise ClusterUnavailable(f"the decision store did not answer ({type(e).__name__})") from None
        raise ClusterUnavailable("the decision's feedback record kept changing on other replicas; retry")


# ---- checkpoints in the shared folder -----------------------------------------------------------------


def newest_checkpoint(shared: Path) -> tuple[Path, int, int] | None:
    """(replica folder, step, stream seq) of the newest checkpoint any replica wrote to `shared`
    (`<shared>/<replica>/latest.json`), or None."""
    best = None
    for p in sorted(Path(shared).glob("*/latest.json")):
        try:
            doc = json.loads(p.read_text())
            step, seq = int(doc["step"]), int(doc["seq"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s is unreadable; ignored", p)
            continue
        if best is None or seq > best[2]:
            best = (p.parent, step, seq)
    return best
