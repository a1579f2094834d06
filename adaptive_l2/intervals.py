"""Confidence intervals over seeds: what the table tool reports for a row run with several seeds.

A row trained with n seeds gives n values of a metric. Its mean is reported with a Student-t
interval (n - 1 degrees of freedom: the seeds' spread is estimated from the same n runs), and each
row is compared with the suite's reference row seed by seed: the runs with the same seed share
the initialisation and the data order, so the paired differences vary less than two independent
samples would (a paired t-test). Small n is the normal case here (5 seeds), where the t quantile
(2.78 for n = 5) is far from the normal's 1.96.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """mean +/- half_width at `confidence`; half_width is None for a single value (no spread),
    p_value (two-sided, H0: mean 0) is set for paired differences only."""

    mean: float
    half_width: Optional[float]
    n: int
    confidence: float = CONFIDENCE
    p_value: Optional[float] = None

    @property
    def low(self) -> Optional[float]:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> Optional[float]:
        return None if self.half_width is None else self.mean + self.half_width

    def format(self, digits: int = 1, signed: bool = False) -> str:
        """'52.3 +/- 1.4' (or '+0.8 +/- 1.1' when `signed`); the mean alone for one value."""
        sign = "+" if signed else ""
        text = f"{self.mean:{sign}.{digits}f}"
        return text if self.half_width is None else f"{text} ± {self.half_width:.{digits}f}"


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t quantile: P(|T| <= q) = confidence for T with `dof` degrees of
    freedom (t_{0.975, 4} = 2.776)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if dof < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {dof}")
    from scipy.stats import t

    return float(t.ppf((1 + confidence) / 2, dof))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of `values` with its Student-t confidence interval (sample standard deviation, n - 1
    degrees of freedom)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value")
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"mean_interval: non-finite value in {values}")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, None, 1, confidence)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t_quantile(confidence, n - 1) * sd / math.sqrt(n), n, confidence)


def paired_difference(values: Sequence[float], reference: Sequence[float],
                      confidence: float = CONFIDENCE) -> Interval:
    """Mean of values[i] - reference[i] (the same seed i in both) with its paired-t interval and
    the two-sided p-value of "no difference"."""
    if len(values) != len(reference):
        raise ValueError(f"paired_difference needs one reference value per value (the same seeds), "
                         f"got {len(values)} and {len(reference)}")
    differences = [float(a) - float(b) for a, b in zip(values, reference)]
    interval = mean_interval(differences, confidence)
    if interval.n < 2:
        return interval
    from scipy.stats import t

    se = interval.half_width / t_quantile(confidence, interval.n - 1)
    if se == 0:
        p_value = 1.0 if interval.mean == 0 else 0.0
    else:
        p_value = float(2 * t.sf(abs(interval.mean) / se, interval.n - 1))
    return Interval(interval.mean, interval.half_width, interval.n, confidence, p_value)
