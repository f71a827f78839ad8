"""Scaling exponents: fit y = c * N^a by least squares in log-log space."""
import math

import numpy as np


def fit_exponent(seqlens, values, upper_points=4):
    """The exponent a of values ~ N^a, fitted over the ``upper_points`` largest N with a finite positive value.

    Only the upper points: at small N fixed costs (launches, Python) flatten the curve and would pull
    the exponent of the asymptotic regime down. nan when fewer than two points qualify.
    """
    if upper_points < 2:
        raise ValueError(f"upper_points must be at least 2 (a line needs two points), got {upper_points}")
    points = sorted((n, v) for n, v in zip(seqlens, values) if v is not None and math.isfinite(v) and v > 0)
    points = points[-upper_points:]
    if len({n for n, _ in points}) < 2:
        return float("nan")
    log_n, log_v = np.log([n for n, _ in points]), np.log([v for _, v in points])
    slope, _intercept = np.polyfit(log_n, log_v, 1)
    return float(slope)
