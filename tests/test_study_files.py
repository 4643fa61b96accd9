"""The shipped study files (studies/*.yaml): each loads and passes the study checks (its configs exist,
equal compute holds, its warm starts are valid), says in its header how it is run, and, where the
shared l10n corpus is beside the checkout, plans its cells on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from metanmt.study.spec import load_study
from tests.test_adaptation import make_l10n

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))
SHARED_L10N = next((p for p in (ROOT.parent / "shared" / "data" / "l10n", ROOT.parents[1] / "shared" / "data" / "l10n")
                    if p.is_dir()), None)


def test_the_studies_folder_holds_the_shipped_studies() -> None:
    assert {p.stem for p in STUDIES} >= {"quick", "mechanism", "converged"}


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_a_study_file_loads_and_says_how_it_is_run(path: Path, tmp_path: Path) -> None:
    root = make_l10n(tmp_path / "l10n")  # load_study reads the configs and checks only that the root is a folder
    study = load_study(path, data_root=root)
    assert study.name == path.stem and study.langs
    assert study.file.reference in study.inits and len(study.inits) >= 2
    for name, init in study.inits.items():
        assert init.config.is_file(), name
    if study.file.equal_compute == "updates":  # load_study checked it; the numbers a reader sees agree
        assert len({study.total_updates(name) for name in study.inits}) == 1
    header = path.read_text(encoding="utf-8").split("\nname:", 1)[0]
    assert f"metanmt study studies/{path.name}" in header


def test_the_quick_study_is_the_former_quick_reproduction(tmp_path: Path) -> None:
    study = load_study(ROOT / "studies" / "quick.yaml", data_root=make_l10n(tmp_path / "l10n"))
    multi, meta = study.inits["multi"], study.inits["meta"]
    assert (multi.steps, meta.warm_start.init, meta.warm_start.update, meta.steps) == (3300, "multi", 2888, 412)
    assert meta.lr_from_warm_start and study.lr_at_warm_start("meta") < 1.7e-4  # the rate at 2,888, past 1,750's
    recipe = study.recipe
    assert (study.file.finetune.length, recipe.epochs, recipe.max_steps, recipe.adapt) == ("fixed", 10, 100, "all")
    assert (study.langs, study.file.budgets) == (["fi", "tr"], ["0", "1k", "4k"])
    assert (study.file.seeds, study.file.scratch_seeds, study.file.curve.seeds) == (2, 1, 2)
    assert study.file.curve.points == [0, 10, 30, 100] and study.file.decoding.beam == 1


def test_the_mechanism_study_warm_starts_four_recipes_from_the_frontier_run_at_1750(tmp_path: Path) -> None:
    study = load_study(ROOT / "studies" / "mechanism.yaml", data_root=make_l10n(tmp_path / "l10n"))
    warm = {name: init for name, init in study.inits.items() if init.warm_start is not None}
    assert set(warm) == {"frontier_multitask", "frontier_fomaml", "frontier_metanmt", "frontier_multitask_lang"}
    assert all((i.warm_start.init, i.warm_start.update, i.steps) == ("frontier", 1750, 250) for i in warm.values())
    assert study.file.reference == "frontier_multitask" and study.file.finetune.length == "fixed"
    assert study.file.inner is None and study.langs == ["ro"] and study.file.data.test == "dev/{lang}.tsv.gz"
    lang = [s for s in study.inits["frontier_metanmt"].overrides if "language_embeddings" in s]
    assert lang and set(lang) - {s for s in study.inits["frontier_multitask_lang"].overrides} == {
        next(s for s in lang if s.startswith("algorithm.adapt="))}  # the same tables; only the inner loop differs


@pytest.mark.skipif(SHARED_L10N is None, reason="no shared l10n corpus (../shared/data/l10n) beside the checkout")
@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_a_study_file_plans_its_cells_on_the_shared_corpus(path: Path) -> None:
    from metanmt.study.cells import planned_cells

    assert SHARED_L10N is not None
    study = load_study(path, data_root=SHARED_L10N)
    for lang in study.langs:
        assert (study.data_root / study.file.data.test.format(lang=lang)).is_file(), lang
        assert planned_cells(study, lang) > 0, lang
