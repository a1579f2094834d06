"""Confidence intervals over seeds, checked against textbook numbers."""
import math

import pytest

from adaptive_l2.intervals import Interval, mean_interval, paired_difference, t_quantile


def test_t_quantiles_are_the_tables():
    # two-sided 95 % quantiles of Student's t (any statistics table)
    for dof, want in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)):
        assert t_quantile(0.95, dof) == pytest.approx(want, abs=5e-4)
    assert t_quantile(0.99, 4) == pytest.approx(4.604, abs=5e-4)


def test_mean_interval_of_one_to_five():
    # mean 3, sd sqrt(2.5), se sqrt(0.5): half width 2.776 * 0.7071 = 1.963
    interval = mean_interval([1, 2, 3, 4, 5])
    assert interval.mean == 3.0 and interval.n == 5
    assert interval.half_width == pytest.approx(2.776445 * math.sqrt(0.5), rel=1e-6)
    assert (interval.low, interval.high) == pytest.approx((1.0368, 4.9632), abs=1e-4)
    assert interval.format() == "3.0 ± 2.0"


def test_one_seed_has_a_mean_and_no_interval():
    interval = mean_interval([52.25])
    assert interval == Interval(52.25, None, 1)
    assert interval.format(2) == "52.25" and interval.low is None


def test_paired_difference_is_the_paired_t_test():
    # Student's sleep data (Cushny & Peebles): drug 2 - drug 1 per patient, t = 4.062, df 9,
    # p = 0.00283, 95 % CI 0.700 .. 2.460 (R's t.test(..., paired = TRUE))
    drug1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    drug2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    difference = paired_difference(drug2, drug1)
    assert difference.mean == pytest.approx(1.58)
    assert (difference.low, difference.high) == pytest.approx((0.70, 2.46), abs=5e-3)
    assert difference.p_value == pytest.approx(0.00283, abs=5e-5)
    assert difference.format(2, signed=True) == "+1.58 ± 0.88"


def test_pairing_removes_the_shared_seed_effect():
    # the same per-seed offset in both rows: a constant difference, zero width, p = 0
    reference = [50.0, 55.0, 47.0, 60.0]
    difference = paired_difference([v + 1.5 for v in reference], reference)
    assert difference.mean == pytest.approx(1.5) and difference.half_width == pytest.approx(0)
    assert difference.p_value == 0.0
    assert mean_interval([v + 1.5 for v in reference]).half_width > 8  # unpaired: much wider


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="one reference value per value"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        t_quantile(95, 4)
