"""Metrics against values computed by hand."""

import math

import numpy as np
import pytest

from mixllm_jax.core.metrics import (aiq, best_point_under_cost, best_quality_under_cost,
                                hull_quality_at_cost, non_decreasing_convex_hull,
                                pct_of_reference, totals)

# A sweep of 5 points (cost, quality):
#   A(1, .2)  B(2, .6)  C(3, .5)  D(4, .8)  E(5, .7)
# C lies under the chord B-D (0.7 at cost 3); E is dominated by D (costlier, worse).
# Hull: A, B, D, then flat at 0.8. Area from 0 to 5 (0 below A):
#   [1,2]: (.2+.6)/2 = .4   [2,4]: 2*(.6+.8)/2 = 1.4   [4,5]: .8    total 2.6
COSTS = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
QUALS = np.array([0.2, 0.6, 0.5, 0.8, 0.7])


def test_hull_vertices():
    hc, hq = non_decreasing_convex_hull(COSTS, QUALS)
    np.testing.assert_allclose(hc, [1, 2, 4])
    np.testing.assert_allclose(hq, [0.2, 0.6, 0.8])


def test_aiq_hand_computed():
    assert aiq(COSTS, QUALS) == pytest.approx(2.6 / 5)  # RouterBench: divided by the largest cost
    assert aiq(COSTS, QUALS, c_max=10.0) == pytest.approx((2.6 + 5 * 0.8) / 10)  # flat extension
    assert aiq(COSTS, QUALS, c_min=1.0) == pytest.approx(2.6 / 4)  # the paper's [c_min, c_max] form


def test_aiq_unsorted_input_same_result():
    perm = np.array([3, 0, 4, 2, 1])
    assert aiq(COSTS[perm], QUALS[perm]) == pytest.approx(aiq(COSTS, QUALS))
    hc, _ = non_decreasing_convex_hull(COSTS[perm], QUALS[perm])
    np.testing.assert_allclose(hc, [1, 2, 4])


def test_aiq_one_point():
    # alone, the hull has no width: 0 (as in RouterBench's code); against a common c_max it counts
    assert aiq([2.0], [0.5]) == 0.0
    assert aiq([2.0], [0.5], c_max=4.0) == pytest.approx(0.5 * 2 / 4)


def test_hull_drops_point_under_chord_and_collinear_points():
    # B(1, .1) is under the chord A(0,0)-C(2,1) (0.5 at cost 1): hull A, C, area 1 over [0, 2]
    hc, hq = non_decreasing_convex_hull([0, 1, 2], [0, 0.1, 1])
    np.testing.assert_allclose(hc, [0, 2])
    assert aiq([0, 1, 2], [0, 0.1, 1]) == pytest.approx(0.5)
    hc, _ = non_decreasing_convex_hull([0, 1, 2], [0, 0.5, 1])  # collinear middle point
    np.testing.assert_allclose(hc, [0, 2])


def test_hull_equal_costs_keep_best_quality():
    hc, hq = non_decreasing_convex_hull([1, 1, 3], [0.3, 0.5, 0.6])
    np.testing.assert_allclose(hc, [1, 3])
    np.testing.assert_allclose(hq, [0.5, 0.6])


def test_aiq_above_single_points_means_better_mix():
    # a router that dominates the chord between two LLMs has a larger AIQ than their mix
    llms = aiq([1, 4], [0.4, 0.8], c_max=4)
    router = aiq([1, 2, 4], [0.4, 0.75, 0.8], c_max=4)
    assert router > llms


def test_aiq_errors():
    with pytest.raises(ValueError, match="finite"):
        aiq([1, np.nan], [0.2, 0.3])
    with pytest.raises(ValueError, match="differ in length"):
        aiq([1, 2], [0.2])
    with pytest.raises(ValueError, match="c_max > c_min"):
        aiq([0.0], [0.5])
    with pytest.raises(ValueError, match="at least one"):
        aiq([], [])


def test_best_quality_under_cost_is_an_achieved_point():
    assert best_quality_under_cost(COSTS, QUALS, 3.5) == pytest.approx(0.6)  # B, not the hull's .75
    assert best_point_under_cost(COSTS, QUALS, 3.5) == 1
    assert best_quality_under_cost(COSTS, QUALS, 4.0) == pytest.approx(0.8)  # limit is inclusive
    assert best_point_under_cost(COSTS, QUALS, 0.5) == -1
    assert math.isnan(best_quality_under_cost(COSTS, QUALS, 0.5))
    # equal qualities: the cheaper point
    assert best_point_under_cost([3, 1, 2], [0.5, 0.5, 0.4], 5) == 1


def test_hull_quality_at_cost_interpolates():
    assert hull_quality_at_cost(COSTS, QUALS, 3.5) == pytest.approx(0.6 + 0.2 * 1.5 / 2)
    assert hull_quality_at_cost(COSTS, QUALS, 7.0) == pytest.approx(0.8)
    assert math.isnan(hull_quality_at_cost(COSTS, QUALS, 0.5))


def test_totals_and_pct_of_reference():
    assert totals([1, 0, 1], [0.5, 0.25, 0.25]) == (2.0, 1.0)
    assert pct_of_reference([1, 2], [2, 2]) == pytest.approx(75.0)
    with pytest.raises(ValueError, match="NaN"):
        totals([1, np.nan], [0.1, 0.1])
    with pytest.raises(ValueError, match="sums to 0"):
        pct_of_reference([1.0], [0.0])
