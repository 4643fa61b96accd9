"""Is the reference init converged? Its dev-NLL slope over the last validations, and where a power law
fitted to them puts the first update at which the slope passes the criterion.

The check is what the study states (docs/design.md, "Convergence and cooldowns"): the validation dev
NLL falls by less than ``FLAT_NATS_PER_1000`` nats per 1,000 updates over the last ``WINDOW`` updates.
A reference that is not flat gets a forecast, so that a user knows how many updates to ask for (the
study's own model needed about 29,000 where it trained 20,000: bench/README.md, "Is the multi-task init
converged?"). The law ``L(t) = a + b (t/1000)^-c`` is the usual form of a loss curve under a decaying
rate; it is fitted with scipy's ``curve_fit`` on the validations from a quarter of the run on (the
first updates, still in warmup, follow another curve). A forecast is an extrapolation, and the report
says so, with the fit's residual.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

#: the criterion: the dev NLL fell by less than this many nats per 1,000 updates over the last
#: validations covering at least WINDOW updates
FLAT_NATS_PER_1000 = 0.01
WINDOW = 2000
#: a forecast further out than this many times the run's last update is reported as none
FORECAST_HORIZON = 50
#: the forecast is stated to this many updates (rounded up)
FORECAST_ROUNDING = 500


def slope_check(points: Sequence[tuple[int, float]]) -> Optional[dict[str, Any]]:
    """The fall per 1,000 updates over the last ``WINDOW`` updates of ``(update, dev NLL)`` points."""
    if len(points) < 2:
        return None
    last_step = points[-1][0]
    window = [p for p in points if p[0] >= last_step - WINDOW]
    if len(window) < 2:
        window = list(points[-2:])
    (s0, l0), (s1, l1) = window[0], window[-1]
    slope = (l0 - l1) / max(1, s1 - s0) * 1000
    return {"from": s0, "to": s1, "dev_loss_from": l0, "dev_loss_to": l1, "fall_per_1000": slope,
            "flat": slope < FLAT_NATS_PER_1000}


def power_law(t, a, b, c):
    """Dev NLL at update ``1000 t``."""
    return a + b * t ** -c


def fitted_curve(fit: dict[str, Any], end: float, points: int = 101) -> tuple[list[float], list[float]]:
    """A forecast's law from its first fitted update to ``end``, for plots: (updates, dev NLL)."""
    steps = [fit["fit_from"] + (end - fit["fit_from"]) * i / (points - 1) for i in range(points)]
    return steps, [power_law(s / 1000, fit["a"], fit["b"], fit["c"]) for s in steps]


def fall_per_1000(params: Sequence[float], step: float) -> float:
    """The law's fall per 1,000 updates over the ``WINDOW`` updates ending at ``step``."""
    a, b, c = params
    return (power_law((step - WINDOW) / 1000, a, b, c) - power_law(step / 1000, a, b, c)) / WINDOW * 1000


def forecast(points: Sequence[tuple[int, float]]) -> Optional[dict[str, Any]]:
    """The power law fitted to the points from a quarter of the run on, and the first update (rounded up
    to ``FORECAST_ROUNDING``) at which its fall over ``WINDOW`` updates is under the criterion; None
    with fewer than 4 such points or where the fit fails. ``flat_at`` is None when that update lies
    beyond ``FORECAST_HORIZON`` times the last one (or the law does not fall)."""
    import numpy as np
    from scipy.optimize import curve_fit

    last = points[-1][0] if points else 0
    fitted = [(s, loss) for s, loss in points if s >= last / 4 and s > WINDOW]
    if len(fitted) < 4:
        return None
    t = np.array([s / 1000 for s, _ in fitted], dtype=np.float64)
    y = np.array([loss for _, loss in fitted], dtype=np.float64)
    b0 = max(1e-6, (y[0] - y[-1]) / (t[0] ** -0.5 - t[-1] ** -0.5))
    start = (y[-1] - b0 * t[-1] ** -0.5, b0, 0.5)
    try:
        params, _ = curve_fit(power_law, t, y, p0=start, bounds=([-np.inf, 0.0, 1e-3], [np.inf, np.inf, 5.0]),
                              method="trf", maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    a, b, c = (float(v) for v in params)
    rms = float(np.sqrt(np.mean((power_law(t, a, b, c) - y) ** 2)))
    found: Optional[int] = None
    if b > 0:
        # the fall decreases with the update (b, c > 0): bisect for the first update under the criterion
        low, high = float(max(last, WINDOW + 1)), float(last * FORECAST_HORIZON)
        if fall_per_1000((a, b, c), low) < FLAT_NATS_PER_1000:
            found = int(low)
        elif fall_per_1000((a, b, c), high) < FLAT_NATS_PER_1000:
            for _ in range(100):
                mid = (low + high) / 2
                low, high = (low, mid) if fall_per_1000((a, b, c), mid) < FLAT_NATS_PER_1000 else (mid, high)
            found = int(high)
    if found is not None:
        found = int(math.ceil(found / FORECAST_ROUNDING) * FORECAST_ROUNDING)
    return {"a": a, "b": b, "c": c, "fit_from": fitted[0][0], "fit_to": fitted[-1][0], "n": len(fitted),
            "rms": rms, "flat_at": found}


def check(points: Sequence[tuple[int, float]], cooldown_from: Optional[int] = None,
          with_forecast: bool = True) -> Optional[dict[str, Any]]:
    """The convergence check of a run's validation points, or None with fewer than 2.

    A run that cools down (``optim.cooldown_from``) is checked on its validations up to the cooldown: a
    rate falling to 0 flattens any curve, so a flat end there says nothing of convergence; the
    cooldown's own fall is reported beside it. A run that is not flat carries the forecast (unless
    ``with_forecast`` is false: a fit costs scipy's import)."""
    points = list(points)
    annealed: dict[str, Any] = {}
    if cooldown_from and points and points[-1][0] > cooldown_from:
        before = [p for p in points if p[0] <= cooldown_from]
        if before:
            annealed = {"cooldown_from": cooldown_from, "cooldown_fall": before[-1][1] - points[-1][1],
                        "cooldown_loss_from": before[-1][1], "cooldown_loss_to": points[-1][1],
                        "cooldown_steps": (before[-1][0], points[-1][0])}
        points = before
    result = slope_check(points)
    if result is None:
        return None
    result["criterion"] = (f"dev NLL falls by less than {FLAT_NATS_PER_1000} nats per 1,000 updates over the last "
                           f"{WINDOW:,} updates of validation" + (" before its cooldown" if annealed else ""))
    if not result["flat"] and with_forecast:
        result["forecast"] = forecast(points)
    return {**result, **annealed}


def one_line(name: str, result: Optional[dict[str, Any]]) -> str:
    """The check in one line, for the study's log."""
    if result is None:
        return f"{name} has fewer than 2 validations: its convergence is not checked"
    line = (f"{name}'s dev NLL fell {result['fall_per_1000']:+.4f} nats per 1,000 updates from {result['from']:,} to "
            f"{result['to']:,} (flat: under {FLAT_NATS_PER_1000}): {'flat' if result['flat'] else 'not flat'}")
    fit = result.get("forecast")
    if fit is not None:
        line += (f"; a power law fitted from update {fit['fit_from']:,} passes the criterion near {fit['flat_at']:,}"
                 if fit["flat_at"] is not None else "; a power law fitted to it does not pass the criterion")
    return line
