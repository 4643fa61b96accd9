"""Intervals and paired tests (metanmt.evaluation.statistics) on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metanmt.evaluation.few_shot import mean_ci95
from metanmt.evaluation.statistics import (PairedComparison, holm, paired_mt_test, paired_nll_test, paired_tests,
                                          resamples_for, t_interval, t_quantile)


def test_t_quantiles_match_the_tables() -> None:
    # two-sided 95% Student t quantiles from any printed table
    assert t_quantile(3) == pytest.approx(4.303, abs=5e-4)
    assert t_quantile(10) == pytest.approx(2.262, abs=5e-4)
    assert t_quantile(2) == pytest.approx(12.706, abs=5e-4)
    assert t_quantile(10_000) == pytest.approx(1.960, abs=1e-3)  # the normal limit
    assert math.isnan(t_quantile(1))


def test_t_interval_says_n_and_is_wider_than_the_normal_one_at_3_seeds() -> None:
    values = [20.0, 21.0, 23.0]
    mean, half, n = t_interval(values)
    s = np.std(values, ddof=1)
    assert n == 3 and mean == pytest.approx(64 / 3)
    assert half == pytest.approx(4.302653 * s / math.sqrt(3), rel=1e-6)
    assert half / (1.96 * s / math.sqrt(3)) == pytest.approx(2.195, abs=1e-3)  # what 1.96 understated
    assert mean_ci95(values) == (mean, half)
    one = t_interval([5.0])
    assert one[0] == 5.0 and math.isnan(one[1]) and one[2] == 1
    assert math.isnan(t_interval([])[0]) and t_interval([])[2] == 0


def test_holm_against_a_hand_worked_example() -> None:
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.3, 0.9]) == pytest.approx([0.6, 0.9]) and holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    out = holm([0.01, float("nan"), 0.02])  # NaN is not a member of the family
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert holm([]) == []


REFS = [f"the {w} cat sat on the mat number {i} today" for i, w in enumerate(["red", "big", "old", "shy", "fat"] * 12)]


def broken(ref: str) -> str:
    """A hypothesis with errors: two words dropped and one replaced."""
    words = ref.split()
    return " ".join(["a"] + words[2:5] + words[6:-1])


def test_identical_systems_are_not_different() -> None:
    hyps = [broken(r) for r in REFS]
    for test in ("bs", "ar"):
        p = paired_mt_test([hyps], [list(hyps)], REFS, test)
        assert p == {"bleu": 1.0, "chrf": 1.0}
    nll = np.random.default_rng(0).gamma(5.0, 4.0, size=len(REFS))
    assert paired_nll_test([nll], [nll.copy()]) == 1.0


def test_a_system_that_fixes_every_error_is_significantly_better() -> None:
    base = [broken(r) for r in REFS]
    for test in ("bs", "ar"):
        p = paired_mt_test([base], [list(REFS)], REFS, test)
        assert p["bleu"] < 0.05 and p["chrf"] < 0.05, (test, p)
    rng = np.random.default_rng(1)
    nll = rng.gamma(5.0, 4.0, size=len(REFS))
    assert paired_nll_test([nll], [nll - rng.uniform(0.5, 2.0, size=len(REFS))]) < 0.05


def test_a_few_fixed_errors_among_noise_are_not_significant() -> None:
    """Half the sentences better, half worse by the same amount: no systematic gap."""
    base = [broken(r) for r in REFS]
    other = [r if i % 2 else broken(broken(r)) for i, r in enumerate(REFS)]
    rng = np.random.default_rng(2)
    nll = rng.gamma(5.0, 4.0, size=len(REFS))
    signs = np.where(np.arange(len(REFS)) % 2 == 0, 1.0, -1.0)
    assert paired_nll_test([nll], [nll + signs * 1.5]) > 0.5
    p = paired_mt_test([base], [other], REFS, "ar")
    assert 0.0 < p["chrf"] <= 1.0 and 0.0 < p["bleu"] <= 1.0


def test_paired_tests_in_worker_processes_give_the_serial_values() -> None:
    """A report's comparisons in 2 processes: each one's p-values as computed alone, in order."""
    rng = np.random.default_rng(3)
    nll = rng.gamma(5.0, 4.0, size=len(REFS))
    base = [broken(r) for r in REFS]
    comparisons = [PairedComparison([base], [list(REFS)], REFS, [nll], [nll - 1.0]),
                   PairedComparison([base], [[r if i % 2 else broken(broken(r)) for i, r in enumerate(REFS)]], REFS,
                                    [nll], [nll + 0.1 * rng.standard_normal(len(REFS))]),
                   PairedComparison([base], [list(base)], REFS, [nll], [nll.copy()])]
    alone = [{**paired_mt_test(c.reference_hyps, c.system_hyps, REFS, "bs", 300),
              "nll": paired_nll_test(c.reference_nll, c.system_nll)} for c in comparisons]
    assert paired_tests(comparisons, "bs", 300, workers=2) == alone == paired_tests(comparisons, "bs", 300, workers=1)
    assert alone[0]["bleu"] < 0.05 < alone[1]["nll"] and alone[2] == {"bleu": 1.0, "chrf": 1.0, "nll": 1.0}


def test_one_seed_is_exactly_sacrebleus_paired_test() -> None:
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    base = [broken(r) for r in REFS]
    other = [r if i % 3 else broken(r) for i, r in enumerate(REFS)]
    for test in ("bs", "ar"):
        _, result = PairedTest([("base", base), ("other", other)], {"BLEU": BLEU(), "chrF": CHRF()}, [REFS],
                               test_type=test)()
        ours = paired_mt_test([base], [other], REFS, test)
        assert ours["bleu"] == pytest.approx(result["BLEU"][1].p_value)
        assert ours["chrf"] == pytest.approx(result["chrF2"][1].p_value)


def test_seeds_are_averaged_per_sentence() -> None:
    """Three seeds of a better system against three of a worse one: significant; the seeds of one
    sentence are one unit (the same three outputs as one seed give the same statistic)."""
    base = [broken(r) for r in REFS]
    p3 = paired_mt_test([base] * 3, [list(REFS)] * 3, REFS, "bs")
    p1 = paired_mt_test([base], [list(REFS)], REFS, "bs")
    assert p3 == p1
    nll = np.random.default_rng(3).gamma(5.0, 4.0, size=(3, len(REFS)))
    assert paired_nll_test(nll, nll - 1.0) < 0.05
    with pytest.raises(ValueError):
        paired_nll_test(nll, nll[:, :-1])
    with pytest.raises(ValueError):
        paired_mt_test([base], [REFS[:-1]], REFS)


def test_resamples_grow_with_the_comparisons_so_that_holm_can_reach_a_tenth_of_alpha() -> None:
    assert resamples_for("bs", 5) == 1000  # sacreBLEU's default where it is enough
    assert resamples_for("bs", 32) == 7000 and 32 / 7001 <= 0.005
    assert resamples_for("bs", 53) == 11000 and 53 / 11001 <= 0.005
    assert resamples_for("ar", 32) == 10000


def test_a_large_gap_stays_significant_in_a_report_of_many_comparisons() -> None:
    """n resamples cannot give a p below 1/(n + 1), and Holm multiplies the smallest by the number of
    comparisons: at 200 resamples and 12 comparisons a perfect system against a broken one reads
    as no difference (12/201 = 0.06), as 60 comparisons do at sacreBLEU's 1,000. The report's own
    count keeps it significant."""
    from metanmt.evaluation.compare import significance

    nll = np.random.default_rng(0).gamma(5.0, 4.0, size=len(REFS))
    langs = [f"x{i:02d}" for i in range(12)]
    rows = [dict(init=init, lang=lang, budget="1k", hyps=hyps, sentence_nll=list(nll - shift))
            for lang in langs for init, hyps, shift in (("multi", [broken(r) for r in REFS], 0.0),
                                                        ("meta", list(REFS), 1.0))]
    references = {lang: REFS for lang in langs}
    floored, samples = significance(rows, "multi", references, "bs", paired_samples=200)
    assert samples == 200 and min(p["bleu"] for p in floored.values()) == pytest.approx(12 / 201)
    chosen, samples = significance(rows, "multi", references, "bs")
    assert samples == resamples_for("bs", 12) == 3000 and len(chosen) == 12
    assert all(p["bleu"] <= 12 / 3001 and p["chrf"] <= 12 / 3001 and p["nll"] < 0.05 for p in chosen.values())
