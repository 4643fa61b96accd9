"""Intervals and paired significance tests for comparing initializations.

    mean, half, n = t_interval([20.1, 21.3, 19.8])      # 95% Student t interval: mean ± half over n values
    p = paired_mt_test(ref_hyps, sys_hyps, references)   # {"bleu": p, "chrf": p}, sacreBLEU's paired test
    resamples_for("bs", comparisons=53)                  # 11000: enough that Holm over 53 can reach 0.005
    p_nll = paired_nll_test(ref_nll, sys_nll)            # sign-flip permutation test on per-sentence NLL
    many = paired_tests([PairedComparison(...), ...], workers=2)  # both, for many cells, in processes
    holm([0.01, 0.04, 0.03, 0.005])                       # [0.03, 0.06, 0.06, 0.02]

Intervals: a 95% interval of a mean over n values is mean ± t(0.975, n-1) · s / sqrt(n) with the
Student t quantile (scipy), not 1.96: at n = 3 the quantile is 4.30, and 1.96 would make the
interval 2.2x too narrow.

Significance between two initializations in one cell (language x budget), each with one or more
fine-tuning seeds, on the same test sentences:

- BLEU and chrF: sacreBLEU's own paired test (``sacrebleu.significance``: paired bootstrap
  resampling, ``bs``, Koehn 2004, as ``sacrebleu --paired-bs``; or paired approximate
  randomization, ``ar``, Riezler & Maxwell 2005, as ``--paired-ar``). sacreBLEU extracts each
  sentence's sufficient statistics (n-gram matches and lengths, character n-gram counts) per seed;
  they are averaged over an init's seeds, so each test sentence is one resampling unit holding all
  of that init's seeds (the seeds of one sentence are not independent, so resampling them
  separately would overstate n). sacreBLEU's test functions then run unchanged on these statistics
  (:class:`_Statistics` hands them over); with one seed per init the p-value is exactly that of
  ``sacrebleu.significance.PairedTest`` (tested). The score tested is the corpus score of the
  seed-averaged statistics (for one seed: the corpus score).
- NLL: a paired sign-flip permutation test (``scipy.stats.permutation_test``, ``samples``) on the
  per-sentence differences of test NLL (nats summed over a sentence's target tokens, averaged over
  each init's seeds); the statistic is the mean difference, which is proportional to the gap in
  corpus NLL when both inits share the tokenizer. Exact and free of a normality assumption.
- Over the cells of a report the p-values of each metric are Holm-corrected (:func:`holm`;
  statsmodels is not a dependency, and Holm is four lines; scipy has only Benjamini-Hochberg).

How many resamples: a paired test with n resamples cannot give a p below 1 / (n + 1), and Holm
multiplies the smallest p of m comparisons by m, so with sacreBLEU's default 1,000 a report of 50
or more comparisons could mark no BLEU or chrF gap significant at 0.05, however large (a study's
16k and 40k phases reach that). A report therefore draws :func:`resamples_for` its comparisons: the
default, or more, so that this floor stays 10x below the corrected threshold.

A report's comparisons are independent, and sacreBLEU's bootstrap is a Python loop (about 2.7 s
per comparison of 500 sentences x 3 seeds at 4,000 resamples): :func:`paired_tests` runs them in
worker processes, each with its own fixed seed, so the p-values do not depend on the worker count.

An observed gap of exactly 0 gets p = 1. sacreBLEU counts resamples whose gap is strictly larger
than the observed one, which for two identical systems gives 1 / (n + 1) (p = 0.001 for two copies
of one output), a value that would mark no difference at all as significant.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

TESTS = {"bs": "paired bootstrap resampling", "ar": "paired approximate randomization"}
DEFAULT_SAMPLES = {"bs": 1000, "ar": 10000}  # sacreBLEU's defaults
NLL_RESAMPLES = 9999
SEED = 12345  # sacreBLEU's default seed (SACREBLEU_SEED); fixed, so a report is reproducible byte for byte


def resamples_for(test: str, comparisons: int, alpha: float = 0.05) -> int:
    """Resamples of the paired ``test`` for ``comparisons`` Holm-corrected tests: sacreBLEU's default,
    or the next thousand from which ``comparisons / (n + 1)`` is at most ``alpha / 10``."""
    need = math.ceil(10 * comparisons / alpha) - 1
    return max(DEFAULT_SAMPLES[test], -(-need // 1000) * 1000)


def t_quantile(n: int, level: float = 0.95) -> float:
    """The two-sided Student t quantile for a mean over ``n`` values (n-1 degrees of freedom)."""
    from scipy import stats

    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + level / 2, n - 1))


def t_interval(values: Iterable[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of its Student t interval, n); the half-width is NaN for one value, both NaN for none."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan, 0
    if arr.size == 1:
        return float(arr[0]), math.nan, 1
    return float(arr.mean()), t_quantile(arr.size, level) * float(arr.std(ddof=1)) / math.sqrt(arr.size), int(arr.size)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; NaN stays NaN and
    is not counted in the family."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if m:
        order = valid[np.argsort(p[valid], kind="stable")]
        adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
        out[order] = adjusted
    return [float(x) for x in out]


class _Statistics:
    """The metric sacreBLEU's test functions see: per-sentence statistics already extracted by
    sacreBLEU (and averaged over seeds) instead of re-extracting them from hypotheses; everything
    else (scoring from statistics) is the real metric's."""

    def __init__(self, metric: Any, stats: np.ndarray):
        self._metric, self._stats = metric, stats

    def _extract_corpus_statistics(self, hypotheses: Any, references: Any) -> np.ndarray:
        return self._stats

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


def _seed_statistics(metric: Any, hyps_by_seed: Sequence[Sequence[str]], references: Sequence[str]) -> np.ndarray:
    stats = [np.asarray(metric._extract_corpus_statistics(list(h), [list(references)]), dtype=np.float64)
             for h in hyps_by_seed]
    return np.mean(stats, axis=0)


def _metrics() -> dict[str, Any]:
    from sacrebleu.metrics import BLEU, CHRF

    return {"bleu": BLEU(), "chrf": CHRF()}


def paired_mt_test(reference_hyps: Sequence[Sequence[str]], system_hyps: Sequence[Sequence[str]],
                   references: Sequence[str], test: str = "bs", n_samples: int = 0,
                   seed: int = SEED) -> dict[str, float]:
    """p-values of sacreBLEU's paired ``test`` (``bs`` or ``ar``) for BLEU and chrF between two
    systems, each given as one hypothesis list per seed (all aligned with ``references``)."""
    from sacrebleu import significance

    if test not in TESTS:
        raise ValueError(f"paired test {test!r}: expected one of {', '.join(TESTS)}")
    for hyps in (*reference_hyps, *system_hyps):
        if len(hyps) != len(references):
            raise ValueError(f"{len(hyps)} hypotheses but {len(references)} references")
    if not reference_hyps or not system_hyps:
        raise ValueError("each system needs at least one hypothesis list")
    run = significance._paired_bs_test if test == "bs" else significance._paired_ar_test
    n_samples = n_samples or DEFAULT_SAMPLES[test]
    out: dict[str, float] = {}
    logging.getLogger("sacrebleu").setLevel(logging.WARNING)  # it logs every test at INFO
    for name, metric in _metrics().items():
        base = _seed_statistics(metric, reference_hyps, references)
        other = _seed_statistics(metric, system_hyps, references)
        base_score = metric._aggregate_and_compute(base).score
        other_score = metric._aggregate_and_compute(other).score
        if other_score == base_score:
            out[name] = 1.0  # see the module docstring: no observed gap is no evidence of one
            continue
        info = {name: (base, significance.Result(base_score))}
        _, result = run(info, "system", list(range(len(references))), None, {name: _Statistics(metric, other)},
                        n_samples=n_samples, seed=seed)
        out[name] = float(result[name].p_value)
    return out


def paired_nll_test(reference_nll: Sequence[Sequence[float]], system_nll: Sequence[Sequence[float]],
                    n_resamples: int = NLL_RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of a paired sign-flip permutation test on per-sentence NLL (one list per
    seed for each system; each sentence's values are averaged over that system's seeds)."""
    from scipy import stats

    a = np.mean(np.asarray(reference_nll, dtype=np.float64), axis=0)
    b = np.mean(np.asarray(system_nll, dtype=np.float64), axis=0)
    if a.shape != b.shape:
        raise ValueError(f"per-sentence NLL of {a.shape[0]} and {b.shape[0]} sentences do not pair up")
    diff = b - a
    if not np.any(diff):
        return 1.0
    result = stats.permutation_test((diff,), lambda d, axis: np.mean(d, axis=axis), permutation_type="samples",
                                    n_resamples=n_resamples, alternative="two-sided", vectorized=True,
                                    random_state=np.random.default_rng(seed))
    return float(min(1.0, result.pvalue))


@dataclass(frozen=True)
class PairedComparison:
    """One cell's comparison of a system with the reference: hypotheses and per-sentence NLL per seed."""

    reference_hyps: Sequence[Sequence[str]]
    system_hyps: Sequence[Sequence[str]]
    references: Sequence[str]
    reference_nll: Sequence[Sequence[float]]
    system_nll: Sequence[Sequence[float]]


def _paired(job: tuple[PairedComparison, str, int]) -> dict[str, float]:
    c, test, n_samples = job
    p = paired_mt_test(c.reference_hyps, c.system_hyps, c.references, test, n_samples)
    p["nll"] = paired_nll_test(c.reference_nll, c.system_nll)
    return p


def paired_tests(comparisons: Sequence[PairedComparison], test: str = "bs", n_samples: int = 0,
                 workers: int = 1) -> list[dict[str, float]]:
    """``{"bleu", "chrf", "nll"}`` p-values (uncorrected) of each comparison, in order, computed in
    up to ``workers`` processes; the same values for any ``workers``.

    Workers are forked where the platform can (``spawn`` re-imports the caller's main module, which
    fails from a pipe or ``python -c``); they run only numpy, scipy and sacreBLEU, never torch, whose
    thread pool does not survive a fork. If the pool cannot start or breaks, the rest is computed here."""
    jobs = [(c, test, n_samples) for c in comparisons]
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        return [_paired(job) for job in jobs]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: "fork() may lead to deadlocks"
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
                return list(pool.map(_paired, jobs))
    except (BrokenProcessPool, OSError) as exc:
        logging.getLogger(__name__).warning("paired tests: worker processes failed (%s); computing them in this process", exc)
        return [_paired(job) for job in jobs]
