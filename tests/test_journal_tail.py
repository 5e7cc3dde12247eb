"""The journal's tail (issue 24, item 6): a torn last line is counted and kept aside as possibly
acknowledged; a request is acknowledged only after its line's fsync returns; a failed fsync
acknowledges nothing and leaves no line behind. No server: the Journal alone, fsync patched."""

from __future__ import annotations

import threading

import pytest

from mixllm_jax.store import journal
from mixllm_jax.store.journal import Journal


def _journal_fsync(monkeypatch, j: Journal, fake):
    """Patch os.fsync for the journal's open segment only (other fds keep the real fsync)."""
    real = journal.os.fsync

    def fsync(fd):
        if j._file is not None and not j._file.closed and fd == j._file.fileno():
            return fake(fd, real)
        return real(fd)
    monkeypatch.setattr(journal.os, "fsync", fsync)


def test_torn_tail_is_counted_kept_aside_and_reported_possibly_acknowledged(tmp_path, caplog):
    j = Journal(tmp_path)
    j.start()
    assert [j.append({"type": "usage", "i": i}).result(30) for i in range(3)] == [1, 2, 3]
    j.close()
    seg = j.segments()[-1]
    torn = b'{"type":"quality","rid":"req-1","se'
    with open(seg, "ab") as f:
        f.write(torn)
    j2 = Journal(tmp_path)
    assert j.torn_tails == 0
    with caplog.at_level("WARNING", logger="mixllm_jax.store.journal"):
        recs = j2.read()
    assert [r["seq"] for r in recs] == [1, 2, 3] and j2.seq == 3
    assert j2.torn_tails == 1 and j2.torn[0][1:] == (4, len(torn))
    assert "possibly acknowledged" in caplog.text and "never acknowledged" not in caplog.text
    [aside] = tmp_path.glob("*.torn-*")
    assert aside.read_bytes() == torn and seg.read_bytes().endswith(b"\n")
    assert Journal(tmp_path).segments() == j2.segments()  # the aside file is not a segment
    again = Journal(tmp_path)
    again.read()
    assert again.torn_tails == 0  # repaired: counted once


def test_acknowledged_only_after_fsync_returns(tmp_path, monkeypatch):
    j = Journal(tmp_path)
    j.start()
    entered, gate = threading.Event(), threading.Event()

    def blocking(fd, real):
        entered.set()
        assert gate.wait(30)
        return real(fd)
    _journal_fsync(monkeypatch, j, blocking)
    fut = j.append({"type": "usage"})
    assert entered.wait(30)  # the line is written, its fsync has not returned
    assert not fut.done()  # ... so the request is not acknowledged
    assert j.seq == 0 and j.fsyncs == 0
    gate.set()
    assert fut.result(30) == 1 and j.fsyncs == 1
    j.close()


def test_failed_fsync_acknowledges_nothing_and_leaves_no_line(tmp_path, monkeypatch):
    j = Journal(tmp_path)
    j.start()
    assert j.append({"type": "usage", "i": 0}).result(30) == 1
    fail = {"n": 1}

    def flaky(fd, real):
        if fail["n"]:
            fail["n"] -= 1
            raise OSError(5, "Input/output error")
        return real(fd)
    _journal_fsync(monkeypatch, j, flaky)
    bad = j.append_many([{"type": "usage", "i": 1}, {"type": "usage", "i": 2}])
    with pytest.raises(OSError):
        bad.result(30)
    assert j.seq == 1 and j.broken is None
    assert j.append({"type": "usage", "i": 3}).result(30) == 2  # the next write takes the next seq
    j.close()
    recs = Journal(tmp_path).read()
    assert [(r["seq"], r["i"]) for r in recs] == [(1, 0), (2, 3)]  # the failed lines were cut back
