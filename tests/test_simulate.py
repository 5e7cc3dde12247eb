import jax.numpy as jnp
import numpy as np
import pytest

from mixllm_jax.sim import baselines, events as sim_events, offline_eval, simulate as sim
from mixllm_jax.core import state as S, observation
from mixllm_jax.data import Dataset, ModelSpec
from mixllm_jax.core.policy import Policy


def specs_and_data(n, quality, tokens, prompt=100.0, specs=None, tags=None):
    """A Dataset of n queries whose logged quality / completion tokens are constant per model."""
    m = len(specs)
    q = np.broadcast_to(np.asarray(quality, np.float32), (n, m)).copy()
    t = np.broadcast_to(np.asarray(tokens, np.float32), (n, m)).copy()
    pin = np.array([s.price_in for s in specs])
    pout = np.array([s.price_out for s in specs])
    cost = prompt * pin[None] + t * pout[None]
    return Dataset(query_ids=[str(i) for i in range(n)], prompts=["p"] * n,
                   tags=tags or [("t",)] * n, models=[s.name for s in specs], quality=q, cost=cost,
                   prompt_tokens=np.full(n, prompt), completion_tokens=t, split=["test"] * n, specs=specs)


def toy_router(specs, priors, capacity=4, dim=2, slots=16, active=None):
    """A state whose arm k predicts quality priors[k] and 1 completion token for every query."""
    st, reg = S.init_state(capacity, dim, load_slots=slots), S.ArmRegistry(capacity)
    for s, p in zip(specs, priors):
        if active is not None and s.name not in active:
            continue
        st, reg = S.add_llm(st, reg, s.name, price_in=s.price_in, price_out=s.price_out, ttft=s.ttft_s,
                            tokens_per_s=s.tokens_per_s, max_concurrency=s.max_concurrency,
                            prior=np.array([p, 0.0], np.float32))
    return st, reg


BIAS_X = lambda n: np.tile(np.array([[0.0, 1.0]], np.float32), (n, 1))  # noqa: E731

# A: cheap, 2 s per request, 2 at once (1 query/s);  B: 10x the price, 1 s, 8 at once (8 queries/s)
SAT_SPECS = [ModelSpec("A", 1.0, 1.0, ttft_s=2.0, tokens_per_s=1e6, max_concurrency=2),
             ModelSpec("B", 10.0, 10.0, ttft_s=1.0, tokens_per_s=1e6, max_concurrency=8)]


def test_serve_is_fcfs_over_slots():
    free = jnp.asarray(np.array([[0.0, np.inf], [0.0, 0.0]], np.float32))
    model = jnp.array([0, 0, 0, 1, 1, 1])
    start = jnp.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    dur = jnp.array([2.0, 2.0, 2.0, 3.0, 3.0, 3.0])
    w, load = sim.serve(free, model, start, dur, jnp.ones(6, bool))
    np.testing.assert_allclose(np.asarray(w), [0, 2, 3, 0, 0, 3])
    assert float(load[0, 0]) == 6.0 and sorted(np.asarray(load[1]).tolist()) == [3.0, 6.0]
    w, load2 = sim.serve(free, model, start, dur, jnp.array([True, False, True, True, True, True]))
    np.testing.assert_allclose(np.asarray(w), [0, 0, 1, 0, 0, 3])  # the padding row books nothing


def test_make_stream_arrivals_and_windows():
    ds = specs_and_data(95, [1.0, 1.0], [1.0, 1.0], specs=SAT_SPECS)
    st = sim.make_stream(ds, BIAS_X(95), sim.StreamConfig(rate=10.0), reference="B")
    np.testing.assert_allclose(st.arrival[:3], [0.0, 0.1, 0.2])
    b = st.batches()
    assert len(b) == 10 and b[0] == (0, 10, 0.0) and b[-1] == (90, 95, 9.0)
    assert st.padded_size() == 32  # engine bucket of 10
    p = sim.make_stream(ds, BIAS_X(95), sim.StreamConfig(rate=10.0, arrival="poisson", seed=3), reference="B")
    assert np.all(np.diff(p.arrival) >= 0) and not np.allclose(p.arrival, st.arrival)
    assert 4.0 < p.arrival[-1] < 20.0
    with pytest.raises(ValueError, match="arrival"):
        sim.StreamConfig(arrival="bursty")
    with pytest.raises(ValueError, match="rate"):
        sim.StreamConfig(rate=0.0)


def run_saturating(beta, n=300, rate=2.0, tau=10.0):
    ds = specs_and_data(n, [1.0, 1.0], [0.0, 0.0], specs=SAT_SPECS)
    st, reg = toy_router(SAT_SPECS, [0.8, 0.8])
    cfg = sim.StreamConfig(rate=rate)
    stream = sim.make_stream(ds, BIAS_X(n), cfg, reference="B")
    pol = Policy(cost_weight=100.0, alpha=0.0, beta=beta, tau=tau)
    return sim.run_router(stream, sim.World.from_specs(SAT_SPECS), st, reg, pol, cfg, progress=False)


def test_latency_penalty_keeps_waits_under_tolerance_where_no_penalty_blows_up():
    """2 queries/s where the cheap LLM serves 1/s: without the penalty every query goes to it and
    waits grow without bound; with it the router spills to the dearer LLM and nobody times out."""
    free, pen = run_saturating(0.0), run_saturating(0.1)
    assert (free.model == 0).all()
    assert free.wait.max() > 60.0 and free.timed_out.mean() > 0.3
    assert pen.wait.max() < 30.0 and not pen.timed_out.any()
    assert 0.2 < (pen.model == 1).mean() < 0.8  # spills only what the cheap LLM cannot take
    s_free, s_pen = free.summary(), pen.summary()
    assert s_pen["quality_pct"] > s_free["quality_pct"] and s_pen["cost_pct"] > s_free["cost_pct"]
    assert s_pen["satisfaction_pct"] > s_free["satisfaction_pct"]
    # the router's predicted wait tracks the true one (service times are predicted exactly here)
    assert np.corrcoef(pen.predicted_wait, pen.wait)[0, 1] > 0.9


def test_stale_snapshot_is_refreshed_on_its_interval():
    """Continuous refresh sees the world every window; a 1000 s refresh never after the start.
    Both still book their own assignments, so both keep waits bounded here."""
    n = 200
    ds = specs_and_data(n, [1.0, 1.0], [0.0, 0.0], specs=SAT_SPECS)
    st, reg = toy_router(SAT_SPECS, [0.8, 0.8])
    out = {}
    for r in (None, 1000.0):
        cfg = sim.StreamConfig(rate=2.0, refresh_s=r)
        stream = sim.make_stream(ds, BIAS_X(n), cfg, reference="B")
        out[r] = sim.run_router(stream, sim.World.from_specs(SAT_SPECS), st, reg,
                                Policy(cost_weight=100.0, alpha=0.0, beta=0.1, tau=10.0), cfg, progress=False)
    assert not out[None].timed_out.any() and not out[1000.0].timed_out.any()


def test_cascade_pays_every_stage_cost_and_latency():
    specs = [ModelSpec("cheap", 1.0, 1.0, ttft_s=3.0, tokens_per_s=10.0, max_concurrency=16),
             ModelSpec("strong", 10.0, 30.0, ttft_s=1.0, tokens_per_s=10.0, max_concurrency=16)]
    n = 40
    q = np.ones((n, 2), np.float32)
    q[::2, 0] = 0.0  # the cheap LLM fails every other query
    ds = specs_and_data(n, q, [20.0, 10.0], specs=specs)
    cfg = sim.StreamConfig(rate=1.0)
    stream = sim.make_stream(ds, None, cfg, reference="strong")
    world = sim.World.from_specs(specs)
    cas = baselines.run_cascade(stream, world, ["cheap", "strong"], cfg)
    strong = baselines.run_single(stream, world, "strong", cfg)
    esc = np.arange(n) % 2 == 0
    np.testing.assert_array_equal(cas.stages, np.where(esc, 2, 1))
    np.testing.assert_array_equal(cas.model, np.where(esc, 1, 0))
    c_cheap = 100 * 1e-6 + 20 * 1e-6
    c_strong = 100 * 10e-6 + 10 * 30e-6
    np.testing.assert_allclose(cas.cost, np.where(esc, c_cheap + c_strong, c_cheap), rtol=1e-6)
    # an escalated query waits for the cheap LLM's whole answer (3 s + 20 tokens / 10 per s) first
    np.testing.assert_allclose(cas.wait[esc], 5.0, atol=1e-5)
    assert cas.wait.mean() > strong.wait.mean()
    assert cas.summary()["quality_pct"] == pytest.approx(100.0)
    # a cascade's stage waits add up: with a 4 s tolerance, every escalated query times out
    tight = baselines.run_cascade(stream, world, ["cheap", "strong"], sim.StreamConfig(rate=1.0, tolerance_s=4.0))
    assert tight.timed_out[esc].all() and tight.summary()["quality_pct"] == pytest.approx(50.0)


def test_frontier_chain_is_cheapest_first_and_increasing_in_quality():
    specs = [ModelSpec(n, p, p) for n, p in [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)]]
    ds = specs_and_data(10, [0.5, 0.4, 0.7, 0.9], [1, 1, 1, 1], specs=specs)
    assert baselines.frontier_chain(ds) == ["a", "c", "d"]
    assert baselines.frontier_chain(ds, max_len=2) == ["a", "d"]


def test_no_penalty_router_matches_offline_choices():
    rng = np.random.default_rng(0)
    specs = [ModelSpec(f"m{k}", 1.0 + 3 * k, 2.0 + 5 * k, ttft_s=0.5, tokens_per_s=50, max_concurrency=2)
             for k in range(3)]
    n, dim = 120, 5
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[:, -1] = 1
    ds = specs_and_data(n, rng.random((n, 3)), rng.integers(1, 200, (n, 3)), specs=specs)
    st, reg = toy_router(specs, [0.5, 0.6, 0.7], dim=dim)
    arm = rng.integers(0, 3, n).astype(np.int32)
    from mixllm_jax.core import engine
    from mixllm_jax.offline import train
    st = engine.update(st, x, arm, np.stack([ds.quality[np.arange(n), arm],
                                             observation.log_tokens(ds.completion_tokens[np.arange(n), arm])], 1))
    cfg = sim.StreamConfig(rate=50.0)  # heavily loaded: waits do not matter with beta = 0
    stream = sim.make_stream(ds, x, cfg, reference="m2")
    res = sim.run_router(stream, sim.World.from_specs(specs), st, reg,
                         Policy(cost_weight=300.0, alpha=0.01, beta=0.0), cfg, progress=False)
    off = offline_eval.offline_choices(st, reg, x, ds.prompt_tokens, ds.models, [300.0], alpha=0.01)[0]
    np.testing.assert_array_equal(res.model, off)
    assert res.timed_out.any() or res.wait.max() > 0  # the load was real


def events_setup(n=400):
    """Two tasks; LLM 'new' (absent at first) is the best on both and cheap."""
    specs = [ModelSpec("ref", 10.0, 30.0, ttft_s=0.5, tokens_per_s=100, max_concurrency=16),
             ModelSpec("old", 1.0, 1.0, ttft_s=0.5, tokens_per_s=100, max_concurrency=16),
             ModelSpec("new", 1.0, 1.0, ttft_s=0.5, tokens_per_s=100, max_concurrency=16)]
    task = np.arange(n) % 2
    q = np.stack([np.full(n, 0.9), np.where(task == 0, 0.6, 0.3), np.full(n, 0.95)], 1)
    tags = [(f"t{t}",) for t in task]
    ds = specs_and_data(n, q, [5.0, 5.0, 5.0], specs=specs, tags=tags)
    x = np.stack([task == 0, task == 1, np.ones(n)], 1).astype(np.float32)
    st, reg = toy_router(specs, [0.9, 0.6, 0.0], dim=3, active=["ref", "old"])
    return specs, ds, x, st, reg


def test_llm_added_removed_repriced_mid_stream_without_recompiling():
    specs, ds, x, st, reg = events_setup()
    n = len(ds)
    cfg = sim.StreamConfig(rate=10.0)
    stream = sim.make_stream(ds, x, cfg, reference="ref")
    events = [sim_events.AddLLM(100, "new", prior="mean"), sim_events.RemoveLLM(200, "old"),
              sim_events.SetPrice(300, "new", price_in_per_mtok=1000.0, price_out_per_mtok=1000.0)]
    # lambda 200: "ref" scores 0.9 - 0.23, "old" 0.6 - 0.02, and "new" (mean prior 0.75) 0.75 - 0.02
    pol = Policy(cost_weight=200.0, alpha=0.01, beta=0.1, tau=10.0)
    res = sim.run_router(stream, sim.World.from_specs(specs), st, reg, pol, cfg, learning="refined",
                         events=events, progress=False)
    ev = res.info["events"]
    assert [e["event"] for e in ev] == ["AddLLM", "RemoveLLM", "SetPrice"] and [e["row"] for e in ev] == [100, 200, 300]
    # compile counters: nothing recompiled from the first event to the end
    first, end = ev[0]["compiles_before"], res.info["compiles"]["end"]
    for k in ("route_batch", "update_batch", "serve"):
        assert end[k] == first[k], k
    new, old, ref = 2, 1, 0
    assert not (res.model[:100] == new).any() and (res.model[:100] == ref).all()
    assert (res.model[150:200] == new).all()  # cold start from the mean prior, then learned (0.95)
    assert float(res.state.count[2]) > 0
    assert not (res.model[200:] == old).any()  # nothing routed to the removed LLM
    assert (res.model[300:] == new).mean() < 0.1  # its price went up 1000x: traffic moved
    # the world billed the new price too
    assert res.cost[300:][res.model[300:] == new].min() > 1e-4 if (res.model[300:] == new).any() else True
    assert res.registry.names == ["ref", "new"] and bool(res.state.active[2])
    # the input state is untouched
    assert not bool(st.active[2])


def test_refined_learning_updates_only_the_chosen_arms():
    specs, ds, x, st, reg = events_setup(200)
    cfg = sim.StreamConfig(rate=10.0)
    stream = sim.make_stream(ds, x, cfg, reference="ref")
    res = sim.run_router(stream, sim.World.from_specs(specs), st, reg, Policy(cost_weight=50.0), cfg,
                         learning="refined", progress=False)
    counts = np.bincount(res.model, minlength=3)
    np.testing.assert_allclose(np.asarray(res.state.count)[:3] - np.asarray(st.count)[:3], counts)
    none = sim.run_router(stream, sim.World.from_specs(specs), st, reg, Policy(cost_weight=50.0), cfg, progress=False)
    np.testing.assert_array_equal(np.asarray(none.state.A), np.asarray(st.A))


def test_binary_feedback_trains_the_network_and_enters_the_score():
    specs, ds, x, st, reg = events_setup(200)
    cfg = sim.StreamConfig(rate=10.0)
    stream = sim.make_stream(ds, x, cfg, reference="ref")
    res = sim.run_router(stream, sim.World.from_specs(specs), st, reg, Policy(cost_weight=50.0), cfg,
                         learning="binary", progress=False)
    assert float(res.feedback_state.count) == len(ds)
    from mixllm_jax.core import feedback_net
    b = np.asarray(feedback_net.bonus(res.feedback_state, jnp.asarray(x)))
    assert np.abs(b).max() > 0  # it learned something from the rewards
    with pytest.raises(ValueError, match="learning"):
        sim.run_router(stream, sim.World.from_specs(specs), st, reg, Policy(), cfg, learning="thumbs")


def test_summary_percentages_and_timeline():
    specs = SAT_SPECS
    ds = specs_and_data(50, [0.5, 1.0], [0.0, 0.0], specs=specs)
    cfg = sim.StreamConfig(rate=1.0)
    stream = sim.make_stream(ds, None, cfg, reference="B")
    res = baselines.run_single(stream, sim.World.from_specs(specs), "A", cfg)
    s = res.summary()
    assert s["quality_pct"] == pytest.approx(50.0) and s["cost_pct"] == pytest.approx(10.0)
    assert s["share"] == {"A": 1.0} and s["timeout_pct"] == 0.0 and s["satisfaction_pct"] == 0.0
    tl = res.timeline(5)
    assert len(tl) == 5 and sum(w["n"] for w in tl) == 50
