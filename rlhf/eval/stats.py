"""Statistics of an evaluation: win / tie / loss, the win-rate with its 95% interval, the
length-controlled win-rate, per-slice results and the judges' agreement.

- **Win-rate**: (wins + ties / 2) / n over the items a judge gave a verdict on.
- **Interval**: the Wilson score interval at 95% (z = 1.959964) of that share with n items.
  With ties counted half the per-item score is 0, 1/2 or 1, whose variance is at most
  p(1 - p), so the interval is the binomial one or a little wider than needed (conservative).
- **Length-controlled win-rate** (AlpacaEval 2 style): a logistic regression of the item's
  score (1, 1/2, 0: a fractional response, the binomial likelihood with y in [0, 1]) on
  x = tanh(d / sd(d)), d = len(A) - len(B) in characters, fitted by Newton's method; the
  length-controlled win-rate is the fitted probability at x = 0, sigmoid(b0). A small ridge
  penalty on the slope (`LC_RIDGE`) keeps the fit finite when length separates the verdicts.
- **Agreement** of two judges over the items both judged: the raw share of equal verdicts and
  Cohen's kappa over the three outcomes, (p_o - p_e) / (1 - p_e) with p_e from each judge's
  own outcome shares (None where p_e = 1: both judges always said the same one thing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from rlhf.eval.records import OUTCOMES, Outcome

Z95 = 1.959963984540054
LC_RIDGE = 1e-2
"""Ridge penalty on the slope of the length-controlled regression (on x in [-1, 1])."""

POINTS = {"a": 1.0, "tie": 0.5, "b": 0.0}


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a share `p` observed over `n` items."""
    if n <= 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def length_controlled_win_rate(verdicts: Sequence[Outcome | None], len_a: Sequence[int], len_b: Sequence[int],
                               ridge: float = LC_RIDGE, iterations: int = 100) -> float | None:
    """The win-rate at zero length difference (see the module docstring); None without verdicts."""
    rows = [(POINTS[v], float(la - lb)) for v, la, lb in zip(verdicts, len_a, len_b, strict=True) if v is not None]
    if not rows:
        return None
    y = np.array([r[0] for r in rows])
    d = np.array([r[1] for r in rows])
    sd = float(d.std())
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(x), x], axis=1)
    beta = np.zeros(2)
    penalty = np.diag([0.0, ridge])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(X @ beta)))
        gradient = X.T @ (y - p) - penalty @ beta
        hessian = (X * (p * (1 - p))[:, None]).T @ X + penalty + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta = beta + step
        if float(np.abs(step).max()) < 1e-10:
            break
    return _sigmoid(float(beta[0]))


@dataclass(frozen=True)
class Summary:
    """One judge's result over a set of items."""

    n: int  # items with a verdict
    win: int
    tie: int
    loss: int
    missing: int  # items without a verdict
    win_rate: float | None
    ci95: tuple[float, float] | None
    lc_win_rate: float | None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["ci95"] = list(self.ci95) if self.ci95 else None
        return out


def summarise(verdicts: Sequence[Outcome | None], len_a: Sequence[int], len_b: Sequence[int]) -> Summary:
    """Win / tie / loss, the win-rate (ties half) with its Wilson 95% interval, the
    length-controlled win-rate."""
    given = [v for v in verdicts if v is not None]
    win, tie, loss = given.count("a"), given.count("tie"), given.count("b")
    n = len(given)
    rate = (win + tie / 2) / n if n else None
    return Summary(n=n, win=win, tie=tie, loss=loss, missing=len(verdicts) - n, win_rate=rate,
                   ci95=wilson_interval(rate, n) if rate is not None else None,
                   lc_win_rate=length_controlled_win_rate(verdicts, len_a, len_b))


def cohen_kappa(x: Sequence[Outcome | None], y: Sequence[Outcome | None]) -> dict:
    """Agreement of two judges over the items both judged: {n, raw, kappa}."""
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None]
    n = len(pairs)
    if n == 0:
        return {"n": 0, "raw": None, "kappa": None}
    observed = sum(a == b for a, b in pairs) / n
    expected = sum((sum(a == k for a, _ in pairs) / n) * (sum(b == k for _, b in pairs) / n) for k in OUTCOMES)
    kappa = None if expected >= 1.0 - 1e-12 else (observed - expected) / (1 - expected)
    return {"n": n, "raw": observed, "kappa": kappa}


def slices(categories: Sequence[str | None]) -> dict[str, list[int]]:
    """The item indices of each category, in first-seen order (items without one left out)."""
    out: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        if c is not None:
            out.setdefault(c, []).append(i)
    return out
