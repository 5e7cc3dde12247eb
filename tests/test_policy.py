import jax.numpy as jnp
import numpy as np
import pytest

from mixllm_jax.core import bandit, engine, latency, state as S
from mixllm_jax.core.policy import Policy, commit_load, predict_cost, route_batch
from conftest import make_state, numpy_ridge, random_obs

GREEDY = Policy(cost_weight=0.0, alpha=0.0, beta=0.0)


def trained(rng, n=400, dim=6, n_arms=3):
    st = make_state(dim=dim, n_active=n_arms)
    x, a, y = random_obs(rng, n, dim, n_arms)
    y[:, 0] = 0.5 + 0.2 * y[:, 0]  # quality targets near [0, 1]: predictions stay inside, unclipped
    return bandit.update_arms(st, x, a, y), (x, a, y)  # the arms alone: numpy's closed-form ridge


def test_greedy_choice_is_argmax_of_numpy_ridge(rng):
    st, (x, a, y) = trained(rng)
    q = rng.normal(size=(257, 6)).astype(np.float32)
    q[:, -1] = 1
    ref = np.stack([q @ numpy_ridge(x, a, y, k, 6)[0][:, 0] for k in range(3)], 1)
    d = engine.route(st, q, np.full(257, 50.0), GREEDY)
    np.testing.assert_allclose(np.asarray(d.quality)[:, :3], ref, atol=2e-4)  # float32 Woodbury vs float64
    np.testing.assert_array_equal(np.asarray(d.arm), ref.argmax(1))


def test_components_match_hand_computation(rng):
    st, (x, a, y) = trained(rng)
    q = rng.normal(size=(5, 6)).astype(np.float32)
    q[:, -1] = 1
    p_tok = np.array([10, 200, 3000, 0, 77], np.float32)
    pol = Policy(cost_weight=1000.0, alpha=0.5, beta=0.0, in_batch_load=False)
    d = engine.route(st, q, p_tok, pol)
    for k in range(3):
        th, A_inv = numpy_ridge(x, a, y, k, 6)
        n_tok = np.exp(np.clip(q @ th[:, 1], 0, 12))
        cost = p_tok * 1e-6 * (k + 1) + n_tok * 2e-6 * (k + 1)
        u = np.sqrt(np.einsum("bi,ij,bj->b", q, A_inv, q))
        # exp() turns float32 error of ~1e-3 in the log-length prediction into ~1e-3 relative
        np.testing.assert_allclose(np.asarray(d.tokens)[:, k], n_tok, rtol=3e-3)
        np.testing.assert_allclose(np.asarray(d.cost)[:, k], cost, rtol=3e-3)
        np.testing.assert_allclose(np.asarray(d.uncertainty)[:, k], u, rtol=5e-4)
        np.testing.assert_allclose(np.asarray(d.score)[:, k], q @ th[:, 0] - 1000 * cost + 0.5 * u, atol=1e-3)
    assert np.all(np.isneginf(np.asarray(d.score)[:, 3]))  # inactive slot


def test_cost_weight_moves_traffic_to_cheaper_arms(rng):
    st, _ = trained(rng)
    q = rng.normal(size=(512, 6)).astype(np.float32)
    q[:, -1] = 1
    arms = [np.asarray(engine.route(st, q, np.full(512, 500.0), Policy(cost_weight=lam, alpha=0.0, beta=0.0)).arm)
            for lam in (0.0, 1e6)]
    assert (arms[1] == 0).mean() > (arms[0] == 0).mean()  # arm 0 is the cheapest
    assert (arms[1] == 0).mean() > 0.9


def test_removed_arm_is_never_chosen(rng):
    st, _ = trained(rng)
    q = rng.normal(size=(300, 6)).astype(np.float32)
    q[:, -1] = 1
    before = np.asarray(engine.route(st, q, np.zeros(300), GREEDY).arm)
    st2 = S.remove_arm(st, 1)
    after = np.asarray(engine.route(st2, q, np.zeros(300), GREEDY).arm)
    assert (before == 1).any() and not (after == 1).any()


def test_predicted_quality_is_clipped_to_the_targets_range():
    """A linear predictor extrapolates past [0, 1]; predict_arms (scores, explanations) clips it,
    so two arms both predicted above 1 tie on quality and the cheaper one wins."""
    from mixllm_jax.core.policy import predict_arms

    st = S.init_state(4, 3)
    for k, (q, price) in enumerate(((1.4, 2e-6), (1.2, 1e-6), (-0.3, 0.0))):
        st = S.add_arm(st, k, price_in=price, price_out=price, prior=np.array([q, 3.0], np.float32))
    x = jnp.asarray(np.tile([[0.0, 0.0, 1.0]], (2, 1)).astype(np.float32))
    raw, _ = bandit.predict(st, x)
    np.testing.assert_allclose(np.asarray(raw)[0, :3, 0], [1.4, 1.2, -0.3], atol=1e-4)  # the linear fit
    p = predict_arms(st, x, jnp.full((2,), 100.0))
    np.testing.assert_allclose(np.asarray(p.quality)[:, :3], [[1.0, 1.0, 0.0]] * 2, atol=1e-6)
    d = engine.route(st, np.asarray(x), np.full(2, 100.0), Policy(cost_weight=1.0, alpha=0.0, beta=0.0))
    q = np.asarray(d.quality)
    assert ((q >= 0.0) & (q <= 1.0)).all()
    np.testing.assert_array_equal(np.asarray(d.arm), [1, 1])  # unclipped, arm 0's +0.2 would win


def test_penalty_shape():
    w = jnp.array([0.0, 10.0, 30.0, 45.0, 60.0, 1e9])
    p = np.asarray(latency.penalty(w, 30.0))
    np.testing.assert_allclose(p[:3], 0.0)
    np.testing.assert_allclose(p[3:5], [np.expm1(0.5), np.expm1(1.0)], rtol=1e-6)
    assert np.isfinite(p[5]) and p[5] > 1e10


def test_in_batch_load_prevents_herding(rng):
    """Every query prefers arm 0; with one slot each, a snapshot herds, a sequential batch spreads."""
    st = S.init_state(4, 3, load_slots=2)
    for k in range(3):
        st = S.add_arm(st, k, price_in=0.0, price_out=0.0, ttft=10.0, tokens_per_s=1e9,
                       max_concurrency=1, prior=np.array([0.9 - 0.01 * k, 0.0], np.float32))
    x = np.tile([[0.0, 0.0, 1.0]], (6, 1)).astype(np.float32)
    snap = engine.route(st, x, np.zeros(6), Policy(alpha=0.0, beta=1.0, tau=5.0, in_batch_load=False))
    seq = engine.route(st, x, np.zeros(6), Policy(alpha=0.0, beta=1.0, tau=5.0))
    assert (np.asarray(snap.arm) == 0).all()
    # Each arm takes 10 s per request: the first three go to distinct free arms, then waits grow.
    np.testing.assert_array_equal(np.asarray(seq.arm)[:3], [0, 1, 2])
    assert np.asarray(seq.wait)[3].min() == pytest.approx(10.0)
    st2 = commit_load(st, seq)
    assert float(st2.free_at[0].min()) >= 10.0 and float(st.free_at[0].min()) == 0.0


def test_padding_rows_book_no_load(rng):
    st = make_state()
    x = np.tile(np.eye(6, dtype=np.float32)[-1], (3, 1))
    d = route_batch(st, jnp.asarray(x), jnp.zeros(3), Policy(), jnp.array([True, False, False]))
    booked = np.isfinite(np.asarray(d.free_at)) & (np.asarray(d.free_at) > 0)
    assert booked.sum() == 1


def test_predict_cost_broadcasts_prompt_tokens_against_prices():
    pt = jnp.array([10.0, 1000.0])  # [B]
    tokens = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # [B, K]
    pin, pout = jnp.array([1e-6, 2e-6, 3e-6]), jnp.array([1e-5, 2e-5, 3e-5])  # [K]
    want = np.asarray(pt)[:, None] * np.asarray(pin) + np.asarray(tokens) * np.asarray(pout)
    np.testing.assert_allclose(np.asarray(predict_cost(pt, tokens, pin, pout)), want, rtol=1e-6)


def test_constraints_by_hand(rng):
    """Eligibility: allowed, context windows (prompt + predicted answer), cost caps with the cheapest
    candidate kept; ineligible arms score -inf and are never chosen."""
    from mixllm_jax.core.policy import Constraints, predict_arms

    st, _ = trained(rng)
    q = rng.normal(size=(4, 6)).astype(np.float32)
    q[:, -1] = 1
    pt = np.array([10.0, 10.0, 5000.0, 10.0], np.float32)
    p = predict_arms(st, jnp.asarray(q), jnp.asarray(pt))
    cost, tok = np.asarray(p.cost)[:, :3], np.asarray(p.tokens)[:, :3]
    allowed = np.ones((4, st.capacity), bool)
    allowed[0, 0] = False  # row 0 may not use arm 0
    window = np.full(st.capacity, np.inf, np.float32)
    window[1] = 4000.0  # row 2's prompt does not fit arm 1
    max_cost = np.array([np.inf, np.inf, np.inf, 0.0], np.float32)  # row 3: a cap below every arm
    c = Constraints(allowed=jnp.asarray(allowed), max_cost=jnp.asarray(max_cost), context_window=jnp.asarray(window))
    want = np.ones((4, 3), bool)
    want[0, 0] = False
    want[:, 1] &= pt + tok[:, 1] <= 4000.0
    want[3] = np.arange(3) == np.argmin(cost[3])  # only the cheapest candidate
    d = route_batch(st, jnp.asarray(q), jnp.asarray(pt), GREEDY, constraints=c)
    np.testing.assert_array_equal(np.asarray(d.eligible)[:, :3], want)
    assert not np.asarray(d.eligible)[:, 3:].any()  # inactive slots
    assert want[np.arange(4), np.asarray(d.arm)].all()
    assert np.isneginf(np.asarray(d.score)[:, :3][~want]).all()
    none = route_batch(st, jnp.asarray(q), jnp.asarray(pt), GREEDY, constraints=Constraints.none(4, st.capacity))
    plain = route_batch(st, jnp.asarray(q), jnp.asarray(pt), GREEDY)
    np.testing.assert_array_equal(np.asarray(none.arm), np.asarray(plain.arm))
    np.testing.assert_array_equal(np.asarray(none.score), np.asarray(plain.score))


def test_score_is_the_sum_of_the_terms_and_the_bonus(rng):
    from mixllm_jax.core.policy import TERMS, predict_arms, score_terms

    st, _ = trained(rng)
    q = rng.normal(size=(6, 6)).astype(np.float32)
    q[:, -1] = 1
    pt = jnp.full((6,), 100.0)
    bonus = jnp.asarray(rng.normal(size=(6, st.capacity)).astype(np.float32))
    pol = Policy(cost_weight=300.0, alpha=0.7, beta=0.0)
    *_, base = score_terms(st, jnp.asarray(q), pt, pol, bonus)
    p = predict_arms(st, jnp.asarray(q), pt)
    by_hand = np.asarray(p.quality - 300.0 * p.cost + 0.7 * p.width + bonus)
    assert len(TERMS) == 3
    np.testing.assert_allclose(np.asarray(base)[:, :3], by_hand[:, :3], rtol=1e-5, atol=1e-6)
    assert np.isneginf(np.asarray(base)[:, 3:]).all()
    d = route_batch(st, jnp.asarray(q), pt, pol, bonus=bonus)
    np.testing.assert_allclose(np.asarray(d.bonus), np.asarray(bonus))
    np.testing.assert_array_equal(np.asarray(d.arm), by_hand[:, :3].argmax(1))
