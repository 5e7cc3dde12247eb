"""Durable logs of the router service: the journal of state changes and the request-feature log.

Journal (``<log_dir>/journal/journal-<first seq>.jsonl``): one JSON object per line, each with a
strictly increasing ``seq``. Every change to the router's learned or live state (a quality
observation, a thumbs up/down, a model added or removed, the usage a proxied call reported) is
appended and fsync'ed *before* it is acknowledged or applied, by one writer thread that commits
whatever is queued together (group commit: one fsync for many records). The service applies
records in ``seq`` order, live exactly as on replay, so a checkpoint that records the last applied
``seq`` S plus the journal records after S give back the same state: replay is exact and idempotent.
A torn last line (cut short by a crash, or unreadable) is dropped, its bytes kept beside the segment
(``<segment>.torn-<offset>``) and the file truncated to its last whole line; `Journal.torn_tails`
counts them (the service reports the count: a metric and /healthz). On storage that keeps what an
fsync made durable such a line was never acknowledged (a request is acknowledged only after the
fsync of its line returns); on storage that loses data after an fsync (a lying write cache, a
copied or restored file) it possibly was, so it is reported as possibly acknowledged. A damaged
line before the end is an error. A failed write or fsync acknowledges nothing and cuts the segment
back to where the failed write began (if that fails too, the journal refuses every later write).

Request-feature log (``<log_dir>/requests/requests-<n>.jsonl``): the features x of every routed
request, with its arm and the propensity of that decision (``p``: the probability the router's
policy had of choosing it, for off-policy evaluation, ope.py), so feedback that arrives after a
restart can still be applied. Written per
routed batch (flushed to the OS, not fsync'ed: a killed process loses nothing, a power cut may lose
the last lines), rotated every ``segment_lines`` lines; the last few segments are kept, enough to
refill the in-memory store (`FeatureStore`, first-in first-out: the last `capacity` routed
requests, the same set before and after a restart) on restart.

Features travel as base64 of little-endian float32 bytes: exact, and about 2 KB for d = 388.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)


class LogError(RuntimeError):
    """A log file is damaged in a way that replay cannot safely skip."""


def encode_x(x: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(x, dtype="<f4").tobytes()).decode("ascii")


def decode_x(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4").astype(np.float32)


def _check_json(rec: dict) -> None:
    try:
        json.dumps(rec, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"journal record is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to `path` atomically (tmp file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_lines(path: Path, *, repair: bool, torn: list | None = None,
                note: str = "not reloaded") -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSONL file; a torn last line (no newline, or unreadable) is dropped,
    logged with `note`, and, if `repair`, cut off. `torn`: a list that gets (path, line number,
    bytes) of each torn tail; its bytes are then also kept in ``<path>.torn-<offset>``."""
    data = path.read_bytes()
    good_end = 0
    pos = 0
    lineno = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        lineno += 1
        if nl < 0:  # no newline: a write cut short
            log.warning("%s: dropping a torn last line %d (%d bytes): %s", path, lineno, len(data) - pos, note)
            break
        raw = data[pos:nl]
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if data.find(b"\n", nl + 1) < 0 and not data[nl + 1:].strip():
                log.warning("%s: dropping an unreadable last line %d (%s): %s", path, lineno, e, note)
                break
            raise LogError(f"{path}:{lineno}: damaged log line ({e}); refusing to replay past it") from e
        good_end = nl + 1
        pos = nl + 1
        yield lineno, rec
    if good_end < len(data):
        if torn is not None:
            torn.append((path, lineno, len(data) - good_end))
            if repair:  # for the operator: what was dropped
                path.with_name(f"{path.name}.torn-{good_end}").write_bytes(data[good_end:])
        if repair:
            with open(path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())


def first_result(inner: concurrent.futures.Future) -> concurrent.futures.Future:
    """A Future of the first item of `inner`'s result (a list), or of its exception."""
    fut: concurrent.futures.Future = concurrent.futures.Future()
    inner.add_done_callback(lambda f: fut.set_exception(f.exception()) if f.exception()
                            else fut.set_result(f.result()[0]))
    return fut


TORN_NOTE = ("possibly acknowledged (a request is acknowledged only after its line's fsync returns, but storage "
             "that loses data after an fsync can tear an acknowledged line); not replayed")


class Journal:
    """Append-only, fsync'ed, sequence-numbered JSONL log with one writer thread (group commit).

    `append(record)` is thread-safe and returns a concurrent Future resolving to the record's seq
    once it is on disk: after the fsync of its line has returned, never before. `on_durable(records)`
    is called on the writer thread, in seq order, after each fsync (the service queues the records
    for application there). torn: (segment, line, bytes) of each torn tail `read` dropped (possibly
    acknowledged, see the module docstring); broken: why writes are refused (None: they are not).
    """

    SEGMENT_PREFIX = "journal-"

    def __init__(self, directory: str | Path, on_durable: Callable[[list[dict]], None] | None = None,
                 segment_bytes: int = 64 << 20):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.on_durable = on_durable
        self.segment_bytes = segment_bytes
        self.seq = 0
        self._queue: queue.Queue = queue.Queue()
        self._file = None
        self._file_path: Path | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._rotate_requested = False
        self.fsyncs = 0
        self.torn: list[tuple[Path, int, int]] = []
        self.broken: str | None = None

    @property
    def torn_tails(self) -> int:
        """Torn last lines dropped when the journal was read (each possibly acknowledged)."""
        return len(self.torn)

    # ---- reading (before the writer starts) ------------------------------------------------

    def segments(self) -> list[Path]:
        def first_seq(p: Path) -> int:
            return int(p.stem[len(self.SEGMENT_PREFIX):])
        return sorted((p for p in self.dir.glob(self.SEGMENT_PREFIX + "*.jsonl")
                       if p.stem[len(self.SEGMENT_PREFIX):].isdigit()), key=first_seq)

    def read(self) -> list[dict]:
        """All records, in seq order (torn tails repaired); sets the next seq after the last one."""
        out: list[dict] = []
        last = 0
        for seg in self.segments():
            for lineno, rec in _read_lines(seg, repair=True, torn=self.torn, note=TORN_NOTE):
                seq = rec.get("seq")
                if not isinstance(seq, int) or seq <= last:
                    raise LogError(f"{seg}:{lineno}: seq {seq!r} is not an integer above the previous {last}")
                last = seq
                out.append(rec)
        self.seq = max(self.seq, last)
        return out

    # ---- writing -----------------------------------------------------------------------------

    def start(self, min_seq: int = 0) -> None:
        """Start the writer; new records get seqs above max(min_seq, the last one read)."""
        self.seq = max(self.seq, int(min_seq))
        self._open_segment()
        self._thread = threading.Thread(target=self._run, name="mixllm-journal", daemon=True)
        self._thread.start()

    def _open_segment(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file_path = self.dir / f"{self.SEGMENT_PREFIX}{self.seq + 1:012d}.jsonl"
        self._file = open(self._file_path, "ab")
        _fsync_dir(self.dir)

    def append(self, record: dict) -> concurrent.futures.Future:
        """Queue one record; the Future resolves to its seq once it is on disk. A record that is not
        valid JSON (NaN, inf, a lone surrogate, a non-string key) raises ValueError here, alone,
        instead of failing the group commit it would have joined."""
        return first_result(self.append_many([record]))

    def append_many(self, records: list[dict]) -> concurrent.futures.Future:
        """Queue records written together (one write and fsync: all of them or none); the Future
        resolves to their seqs. ValueError here for a record that is not valid JSON."""
        for rec in records:
            _check_json(rec)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._closed or self.broken is not None:
            fut.set_exception(RuntimeError(self.broken or "the journal is closed"))
            return fut
        self._queue.put((list(records), fut))
        return fut

    def rotate(self) -> None:
        """Start a new segment at the next write (called after a checkpoint)."""
        self._rotate_requested = True

    def prune(self, upto_seq: int) -> list[Path]:
        """Delete whole segments whose records all have seq <= upto_seq (never the open one)."""
        segs = self.segments()
        removed = []
        for seg, nxt in zip(segs, segs[1:]):
            # a segment's last seq is below the next segment's first seq
            if seg == self._file_path:
                continue
            if int(nxt.stem[len(self.SEGMENT_PREFIX):]) - 1 <= upto_seq:
                seg.unlink(missing_ok=True)
                removed.append(seg)
        return removed

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch) -> None:
        start = None
        try:
            if self.broken is not None:
                raise RuntimeError(self.broken)
            if self._rotate_requested or (self._file.tell() > self.segment_bytes):
                self._rotate_requested = False
                self._open_segment()
            records = []
            lines = []
            seq = self.seq
            for recs, _ in batch:
                for rec in recs:
                    seq += 1
                    rec = dict(rec, seq=seq)
                    records.append(rec)
                    lines.append(json.dumps(rec, separators=(",", ":"), allow_nan=False))
            start = self._file.tell()
            self._file.write(("\n".join(lines) + "\n").encode())
            self._file.flush()
            os.fsync(self._file.fileno())
            self.fsyncs += 1
            self.seq = seq
        except BaseException as e:  # disk full, failed fsync: nothing of this batch is acknowledged
            log.exception("journal write failed")
            if start is not None:
                self._cut_back(start)
            for _, fut in batch:
                fut.set_exception(e)
            return
        if self.on_durable is not None:
            try:
                self.on_durable(records)
            except Exception:  # the records are durable; applying them is the service's business
                log.exception("journal on_durable callback failed")
        i = 0
        for recs, fut in batch:
            fut.set_result([r["seq"] for r in records[i:i + len(recs)]])
            i += len(recs)

    def _cut_back(self, start: int) -> None:
        """After a failed write or fsync: cut the segment back to `start` (the failed write's first
        byte), so no unacknowledged line stays to be replayed or written after; if that fails, refuse
        every later write (the segment's tail is unknown)."""
        try:
            try:
                self._file.close()  # (flushes what the failed write left buffered: cut off below)
            except OSError:
                pass
            with open(self._file_path, "r+b") as f:
                f.truncate(start)
                os.fsync(f.fileno())
            self._file = open(self._file_path, "ab")
        except BaseException as e:  # noqa: BLE001
            self.broken = f"the journal is unusable after a failed write ({type(e).__name__}); restart the service"
            log.error("journal: cannot cut %s back to byte %d (%s): refusing further writes", self._file_path,
                      start, e)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
        if self._file is not None:
            self._file.close()
            self._file = None


QUALITY_BIT, THUMBS_BIT = 1, 2  # feedback kinds as bits (Entry.applied, the shared decisions' flags)


@dataclasses.dataclass
class Entry:
    """What later feedback on one routed request needs."""

    x: np.ndarray  # [d] features
    slot: int
    generation: int  # the slot's LLM generation when routed (serve/service.py): feedback goes to that LLM only
    model: str
    prompt_tokens: float
    log_tokens: float  # predicted log completion tokens of the chosen arm (replaced by observed usage)
    observed_tokens: float | None = None
    has_quality: bool = False  # a quality observation is journaled (or being journaled)
    has_thumbs: bool = False
    applied: int = 0  # feedback kinds applied from the journal (QUALITY_BIT | THUMBS_BIT), checkpointed
    propensity: float = 1.0  # probability the router's policy had of choosing this arm (ope.py)


class FeatureStore:
    """Bounded first-in first-out map of request id -> Entry (the last `capacity` routed requests),
    written through to rotating JSONL segments. First-in first-out, not least-recently-used, so
    the entries in memory are exactly those a restart reloads (the last `capacity` lines)."""

    PREFIX = "requests-"

    def __init__(self, directory: str | Path | None, capacity: int = 20000, keep_segments: int = 3):
        if capacity < 1:
            raise ValueError(f"feature cache capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.keep_segments = max(2, keep_segments)
        self.segment_lines = max(1, -(-capacity // (self.keep_segments - 1)))
        self._lru: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.dir = None if directory is None else Path(directory)
        self._file = None
        self._lines = 0
        self._index = 0
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self._lru)

    def _segments(self) -> list[Path]:
        return sorted((p for p in self.dir.glob(self.PREFIX + "*.jsonl")
                       if p.stem[len(self.PREFIX):].isdigit()), key=lambda p: int(p.stem[len(self.PREFIX):]))

    def load(self) -> int:
        """Refill the LRU from the kept segments (oldest first); returns the entries loaded."""
        if self.dir is None:
            return 0
        n = 0
        segs = self._segments()
        for seg in segs:
            for lineno, rec in _read_lines(seg, repair=True):
                try:
                    gen = rec.get("generation", rec.get("arm_id"))  # "arm_id": logs written before the rename
                    self._put(rec["id"], Entry(decode_x(rec["x"]), int(rec["slot"]), int(gen), str(rec["model"]),
                                               float(rec["pt"]), float(rec["lt"]), propensity=float(rec.get("p", 1.0))))
                    n += 1
                except (KeyError, ValueError, TypeError) as e:
                    log.warning("%s:%d: skipping an unreadable request record (%s)", seg, lineno, e)
        self._index = int(segs[-1].stem[len(self.PREFIX):]) + 1 if segs else 0
        return n

    def _put(self, rid: str, entry: Entry) -> None:
        self._lru[rid] = entry
        self._lru.move_to_end(rid)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def put_many(self, items: Iterable[tuple[str, Entry]]) -> None:
        items = list(items)
        if not items:  # (an empty write would be a blank line, which load() refuses)
            return
        lines = []
        with self._lock:
            for rid, e in items:
                self._put(rid, e)
        if self.dir is None:
            return
        for rid, e in items:
            lines.append(json.dumps({"id": rid, "slot": e.slot, "generation": e.generation, "model": e.model,
                                     "pt": e.prompt_tokens, "lt": e.log_tokens, "p": e.propensity,
                                     "x": encode_x(e.x)},
                                    separators=(",", ":")))
        if self._file is None or self._lines >= self.segment_lines:
            self._rotate()
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
        self._lines += len(lines)

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.dir / f"{self.PREFIX}{self._index:09d}.jsonl", "a")
        self._index += 1
        self._lines = 0
        for old in self._segments()[:-self.keep_segments]:
            old.unlink(missing_ok=True)

    def get(self, rid: str) -> Entry | None:
        with self._lock:
            return self._lru.get(rid)

    def items(self) -> list[tuple[str, Entry]]:
        with self._lock:
            return list(self._lru.items())

    def flush(self, sync: bool = False) -> None:
        if self._file is not None:
            self._file.flush()
            if sync:
                os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
