"""metanmt study: a whole tiny study end to end (every stage, in processes), resumed after a kill
between stages, the report byte-equal when rebuilt; the study file's errors name file, line and key;
a study folder moved elsewhere resumes there."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from metanmt.cli import main
from metanmt.errors import ConfigError
from metanmt.study.spec import load_study
from tests.test_adaptation import TINY_RUN, make_l10n

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(path: Path) -> Path:
    """TINY_RUN as a run config file (a study's inits name config files)."""
    data: dict = {}
    for item in TINY_RUN:
        key, value = item.split("=", 1)
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


STUDY = {
    "name": "tiny",
    "description": "A tiny study on a synthetic corpus.",
    "data": {"langs": ["xb", "xc"], "dev_lang": "xa"},
    "inits": {
        "multi": {"config": "tiny.yaml", "set": ["train.steps=4", "train.eval_every=2", "task.dev_languages=[xa]",
                                                 "task.dev_budget='100'", "task.dev_finetune_steps=1",
                                                 "task.dev_max_segments=4"]},
        "meta": {"config": "tiny.yaml", "set": ["algorithm.name=fomaml", "algorithm.inner_optimizer=adam",
                                                "train.steps=2", "train.seed=1"],
                 "warm_start": {"init": "multi", "update": 2}, "inner": "chosen"},
    },
    "inner": {"lrs": [0.001, 0.003], "steps": [1, 2], "episodes": 2, "budget": "300"},
    "finetune": {"lr": 0.003, "max_tokens": 60, "length": "chosen", "max_steps": 4,
                 "search": {"epochs": [1, 2], "budgets": ["100"], "segments": 4}},
    "budgets": ["0", "100"],
    "seeds": 2,
    "scratch_seeds": 1,
    "curve": {"points": [0, 2], "seeds": 1, "segments": 4},
    "decoding": {"beam": 1, "test_segments": 6},
    "jobs": 2,
}


@pytest.fixture(scope="module")
def study_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("study")
    root = make_l10n(base / "l10n")
    for folder, pattern in (("test", "{}.tsv.gz"), ("finetune", "{}.100.tsv.gz"), ("finetune", "{}.300.tsv.gz")):
        shutil.copy(root / folder / pattern.format("xa"), root / folder / pattern.format("xc"))  # a third language
    tiny_config(base / "tiny.yaml")
    study = base / "tiny_study.yaml"
    study.write_text(yaml.safe_dump({**STUDY, "data": {**STUDY["data"], "root": "l10n"}}, sort_keys=False))
    return study, root


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def finished(study_setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study run once, every stage (tests copy it before changing it)."""
    study, _ = study_setup
    out = tmp_path_factory.mktemp("finished") / "out"
    assert run_cli("study", study, "--out", out, "--cpu") == 0
    return out


def test_a_tiny_study_runs_every_stage_resumes_and_rebuilds_its_report_byte_equal(study_setup, finished, tmp_path,
                                                                                  capsys):
    study, root = study_setup
    out = finished
    report = out / "report"
    for name in ("results.csv", "results.md", "report.md", "report.html", "bleu_vs_budget.png",
                 "adaptation_curve.png", "learning_curves.png"):
        assert (report / name).is_file(), name
    html = (report / "report.html").read_text(encoding="utf-8")
    assert "<table>" in html and "data:image/png;base64," in html and "src=\"adaptation_curve.png\"" not in html
    md = (report / "report.md").read_text(encoding="utf-8")
    assert "The inner loop of `meta`, chosen on xa at multi@2" in md and "The fine-tuning length, chosen on xa" in md
    assert "Convergence of `multi`" in md and "all 2" in md or "cells finished" in md
    assert "| multi | ../inits/multi | 4 |" in md and str(out) not in md  # the report does not name the folder
    inner = json.loads((out / "inner" / "meta.json").read_text())
    assert inner["choice"]["gain"] > 0 and len(inner["candidates"]) == 4
    # the meta init trained with the chosen inner loop, from the warm start, for 2 updates (4 in all)
    meta_cfg = yaml.safe_load((out / "inits" / "meta" / "metanmt.yaml").read_text())
    assert meta_cfg["algorithm"]["inner_lr"] == inner["choice"]["lr"]
    assert meta_cfg["algorithm"]["inner_steps"] == inner["choice"]["steps"]
    assert meta_cfg["model"]["pretrained"] == str((out / "inits" / "multi@2").resolve())
    rows = (report / "results.csv").read_text().splitlines()
    # zero-shot 2 inits x 2 langs, fine-tuned (multi, meta: 2 seeds; scratch: 1) x 2 langs
    assert len(rows) - 1 == 4 + (2 + 2 + 1) * 2
    rule = json.loads((out / "rule.json").read_text())
    assert rule["choice"]["epochs"] in (1, 2)

    # rebuilt: the same bytes, also while another process holds the study (a report of the finished
    # cells while the study runs)
    before = {p.name: p.read_bytes() for p in report.iterdir() if p.is_file()}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from metanmt.locking import FolderLock; "
                               "FolderLock(sys.argv[1], 'study').acquire(); print('held', flush=True); time.sleep(120)",
                               str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_cli("study", study, "--out", out, "--report-only", "--cpu") == 0
        assert run_cli("study", study, "--out", out, "--cpu") == 2  # a start is refused while it is held
    finally:
        holder.kill()
        holder.wait()
    (out / ".metanmt.lock").unlink()
    after = {p.name: p.read_bytes() for p in report.iterdir() if p.is_file()}
    assert after == before

    # a rerun has nothing to do and says so
    capsys.readouterr()
    assert run_cli("study", study, "--out", out, "--cpu") == 0
    assert "every task was already finished" in capsys.readouterr().out

    # copied elsewhere, with a language's cells and the report lost: it resumes there, and only they run
    # again (the runs' own paths follow the folder)
    moved = tmp_path / "moved"
    shutil.copytree(finished, moved)
    shutil.rmtree(moved / "cells" / "xc")
    (moved / "report" / "report.html").unlink()
    assert run_cli("study", study, "--out", moved, "--cpu") == 0
    assert sorted(json.loads((moved / "logs" / "last_start.json").read_text())["ran"]) == ["cells:xc", "report"]
    assert yaml.safe_load((moved / "inits" / "meta" / "metanmt.yaml").read_text())["model"]["pretrained"] == \
        str((moved / "inits" / "multi@2").resolve())


def test_overwrite_that_fails_in_its_first_task_gives_the_old_study_back(study_setup, finished, tmp_path, capsys):
    study, _ = study_setup
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts}
    broken = yaml.safe_load(study.read_text())["inits"]["multi"]["set"] + ["model.d_model=33"]  # 2 heads: an error
    capsys.readouterr()
    assert run_cli("study", study, "--out", out, "--cpu", "--overwrite", "--set",
                   f"inits.multi.set={json.dumps(broken)}") == 2
    assert "train:multi@2 failed" in capsys.readouterr().err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts}
    assert after == before


def test_a_study_killed_between_stages_resumes(study_setup, finished, tmp_path):
    """SIGKILL to the study once a task has ended and the next has started (a finished study with one
    language's cells and an init's last updates taken away, so that it is short): the next start runs
    only what the killed one had not finished."""
    study, _ = study_setup
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "cells" / "xc")
    shutil.rmtree(out / "report")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "metanmt", "study", str(study), "--out", str(out), "--cpu", "--jobs", "1"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    xc_done = out / "cells" / "xc" / "results.md"
    deadline = time.monotonic() + 240
    while not xc_done.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert xc_done.is_file() and proc.poll() is None  # cells:xc ended; the study goes on to its report
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report" / "report.html").exists()
    time.sleep(1)  # the task process dies with it
    assert run_cli("study", study, "--out", out, "--cpu") == 0
    assert json.loads((out / "logs" / "last_start.json").read_text())["ran"] == ["report"]
    assert (out / "report" / "report.html").is_file()


@pytest.mark.parametrize("change, message", [
    ({"seeds": 0}, "seeds: expected a value >= 1"),
    ({"inits": {"multi": {"config": "nope.yaml"}}}, "inits.multi.config: no such run config"),
    ({"reference": "other"}, "reference: 'other' is not one of the inits"),
    ({"budgets": ["0", "7x"]}, "budgets: --budgets '7x'"),
    ({"inner": None}, "inits.meta.inner: 'chosen' needs the study's `inner:` search"),
    ({"inits": {**STUDY["inits"], "meta": {**STUDY["inits"]["meta"], "warm_start": {"init": "multi", "update": 9}}}},
     "warm_start.update: 9 is past the end of multi"),
    ({"inits": {**STUDY["inits"], "meta": {**STUDY["inits"]["meta"], "set": ["train.steps=3"]}}},
     "inits.meta: 5 updates in all (warm start included) where the reference multi has 4"),
    ({"finetune": {"lenght": "fixed"}}, "finetune.lenght: unknown key"),
])
def test_study_file_errors_name_the_file_line_and_key(study_setup, tmp_path, change, message):
    study, root = study_setup
    data = {**yaml.safe_load(study.read_text()), **change}
    bad = study.parent / f"bad_{abs(hash(message))}.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_study(bad)
    assert str(info.value).startswith(str(bad)) and message in str(info.value)
    if "seeds" in change:  # the line of the key, counted in the file as written
        line = bad.read_text().splitlines().index("seeds: 0") + 1
        assert str(info.value).startswith(f"{bad}, line {line}: ")


def test_a_study_that_selects_no_cell_fails_before_writing(study_setup, tmp_path, capsys):
    study, _ = study_setup
    out = tmp_path / "out"
    assert run_cli("study", study, "--out", out, "--langs", "xq") == 2
    assert "xq" in capsys.readouterr().err and not out.exists()
    assert run_cli("study", study, "--out", out, "--set", "budgets=[0, 9k]") == 2
    assert "9k" in capsys.readouterr().err and not out.exists()
    assert run_cli("study", study, "--out", out, "--report-only") == 2
    assert "holds no study" in capsys.readouterr().err and not out.exists()


def test_dry_run_lists_the_tasks_in_order(study_setup, tmp_path, capsys):
    study, _ = study_setup
    assert run_cli("study", study, "--out", tmp_path / "out", "--dry-run") == 0
    plan = json.loads(capsys.readouterr().out)
    keys = [t["task"] for t in plan["plan"]]
    # the reference's last updates first (the length rule and every cell wait for them), then the rest
    assert keys == ["train:multi@2", "train:multi", "inner:meta", "train:meta", "rule", "cells:xb", "cells:xc",
                    "report"]
    assert plan["cells"] == {"xb": 2 + 5, "xc": 2 + 5} and not (tmp_path / "out").exists()
    assert plan["time_left"] == "time left not measured yet (nothing has run)"


def test_dry_run_of_a_finished_study_with_a_later_phase_says_its_time_at_the_measured_rates(study_setup, finished,
                                                                                            tmp_path, capsys):
    study, _ = study_setup
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    assert run_cli("study", study, "--out", out, "--set", "budgets=[0, 100, 300]", "--dry-run") == 0
    plan = json.loads(capsys.readouterr().out)
    pending = [t["task"] for t in plan["plan"] if not t["done"]]  # the inits, inner loops and rule are kept
    # the report of the first phase's cells is there, but not the report of the study as it now stands
    assert pending == ["cells:xb", "cells:xc", "report"]
    assert re.fullmatch(r"about \d+ min left at the measured rates", plan["time_left"]), plan["time_left"]


def test_the_progress_line_gives_no_estimate_before_a_rate_is_measured(study_setup, tmp_path):
    from metanmt.study.runner import Progress, tasks_of

    study = load_study(study_setup[0])
    out = tmp_path / "out"
    progress = Progress(study, out, tasks_of(study, out), jobs=2)
    line = progress.line(["train:multi@2"])
    assert "time left not measured yet (train:multi@2, train:multi, inner:meta, train:meta ...)" in line
    assert "min left" not in line and "train:multi@2 0/2 updates" in line
    history = out / "inits" / "multi" / "history.jsonl"
    history.parent.mkdir(parents=True)
    history.write_text(json.dumps({"kind": "train", "step": 1, "seconds": 30.0}) + "\n", encoding="utf-8")
    # at 30 s an update: 30 s running, then multi's last 3 and meta's 2 (at the mean rate) on 2 processes
    line = progress.line(["train:multi@2"])  # 30 + (3 + 2) * 30 / 2 = 105 s
    assert "train:multi@2 1/2 updates" in line and "about 2 min left" in line and "not measured yet: inner:meta" in line


def test_the_cells_time_left_grows_with_each_cells_budget_at_the_measured_rates(study_setup, tmp_path):
    """A later phase's cells fine-tune longer than the finished ones: the estimate is planned updates x
    seconds per update (+ scoring, + the curve where the cell draws one), not a mean per cell."""
    from metanmt.study import cells as study_cells

    study_file, root = study_setup
    out = tmp_path / "out"
    folder = out / "cells" / "xb" / "cells"
    folder.mkdir(parents=True)
    finished = {"multi__xb__0__s0": dict(steps=0, words=0, eval_seconds=1.0),
                "multi__xb__100__s0": dict(steps=2, words=100, finetune_seconds=10.0, eval_seconds=3.0,
                                           curve_seconds=6.0)}
    for name, row in finished.items():
        init, lang, budget, seed = name.split("__")
        (folder / f"{name}.json").write_text(json.dumps(dict(row, init=init, lang=lang, budget=budget,
                                                             seed=int(seed[1:]))), encoding="utf-8")
    study = load_study(study_file)
    cells = [study_cells.read_json(p) for p in sorted(folder.glob("*.json"))]
    # 5 s an update, 0.02 updates a word, 2 s to score, 6 s a curve (seed 0 only), at most 4 updates
    # left of xb: meta zero-shot 2; multi s1 2 + 2 x 5; meta s0 2 + 10 + 6, s1 12; scratch s0 18
    assert study_cells.seconds_left(study, out, "xb", cells) == pytest.approx(62.0)
    assert study_cells.seconds_left(study, out, "xc", cells) == pytest.approx(62.0 + 2 + 18)  # its own two too
    grown = load_study(study_file, extra=["budgets=[0, 100, 300]"])
    # 300 words: 6 updates by the rate per word, cut to max_steps 4: 2 + 4 x 5 (+ 6 with a curve) for
    # multi s0 s1, meta s0 s1 and scratch s0
    assert study_cells.seconds_left(grown, out, "xb", cells) == pytest.approx(62.0 + 3 * 28 + 2 * 22)
    zero_shot_only = [cells[0]]  # no fine-tuning measured yet: no estimate rather than a wrong one
    assert study_cells.seconds_left(study, out, "xb", zero_shot_only) is None
    # the line names the cell the process is at: its fine-tune folder is in work/ and it is not finished
    from metanmt.study.runner import Progress, tasks_of

    for name in ("meta__xb__100__s0", "meta__xb__100__s0__curve", "multi__xb__100__s0"):
        (out / "cells" / "xb" / "work" / name).mkdir(parents=True)
    assert study_cells.cells_at(out, "xb") == ["meta xb 100 s0"]
    line = Progress(study, out, tasks_of(study, out), jobs=2).line(["cells:xb"])
    assert "cells:xb 2/7 cells (at meta xb 100 s0)" in line


def test_a_budget_one_language_cannot_fill_is_left_out_of_its_cells_not_an_error(study_setup, tmp_path):
    """Latvian 40k: once its 16k uses the whole pool, a larger budget has no Latvian cell. The study
    plans over all its languages, so that language's task runs without the budget and the report
    keeps it for the others (a compare of Latvian alone would refuse it)."""
    from metanmt.study import cells as study_cells

    study_file, root = study_setup
    data = tmp_path / "l10n"
    shutil.copytree(root, data)
    for lang in ("xb", "xc"):  # a 500-word budget: xb's is its whole pool again, xc has its own
        shutil.copy(data / "finetune" / f"{lang}.300.tsv.gz", data / "finetune" / f"{lang}.500.tsv.gz")
    split = json.loads((data / "split.json").read_text())
    split["finetune"]["xb"]["500"] = {"complete": False, "en_words": 200}
    (data / "split.json").write_text(json.dumps(split))
    study = load_study(study_file, data_root=data, extra=["budgets=[0, 100, 300, 500]"])
    assert study_cells.planned_cells(study, "xb") == 7 + 5  # 300 (the pool) added, 500 left out
    assert study_cells.planned_cells(study, "xc") == 7 + 2 * 5  # both added
    out = tmp_path / "out"
    (out / "rule.json").parent.mkdir(parents=True)
    (out / "rule.json").write_text(json.dumps({"choice": {"epochs": 1, "min_steps": 0, "max_steps": 4}}),
                                   encoding="utf-8")
    arguments = {lang: study_cells.compare_arguments(study, out, langs, tmp_path / "c", "cpu")["budgets"]
                 for lang, langs in (("xb", ["xb"]), ("xc", ["xc"]), ("both", ["xb", "xc"]))}
    assert arguments == {"xb": ["0", "100", "300"], "xc": ["0", "100", "300", "500"],
                         "both": ["0", "100", "300", "500"]}


def test_free_processes_take_the_reference_first_then_the_costliest_measured_training(study_setup, tmp_path):
    from metanmt.study.runner import _costliest_first, tasks_of

    spec = {**STUDY, "data": {**STUDY["data"], "root": str(study_setup[1])}}
    spec["inits"] = {**STUDY["inits"], "slow": {**STUDY["inits"]["meta"], "set": ["algorithm.name=fomaml",
                                                                              "algorithm.inner_optimizer=adam",
                                                                              "train.steps=2", "train.seed=2"]}}
    path = tmp_path / "three.yaml"
    shutil.copy(study_setup[0].parent / "tiny.yaml", tmp_path / "tiny.yaml")
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    study, out = load_study(path), tmp_path / "out"
    tasks = tasks_of(study, out)
    by_key = {t.key: t for t in tasks}
    assert [t.key for t in tasks if t.urgent] == ["train:multi@2", "train:multi"]
    finals = [by_key["train:meta"], by_key["train:slow"]]
    ready = [by_key["train:multi"], *finals, by_key["rule"]]
    # no measured pass yet: the count of passes ties, and the file's order stands
    assert [t.key for t in _costliest_first(ready, study, out)] == ["train:multi", "train:meta", "train:slow", "rule"]
    (out / "inner").mkdir(parents=True)
    for name, seconds in (("meta", 100.0), ("slow", 120.0)):
        (out / "inner" / f"{name}.json").write_text(json.dumps({"seconds": seconds}), encoding="utf-8")
    assert [t.key for t in _costliest_first(ready, study, out)] == ["train:multi", "train:slow", "train:meta", "rule"]


CHILD = """
import sys, time, torch
from pathlib import Path
from metanmt.study import threads
threads.follow_lent_threads()          # what the command line does first in a study's task
seen = [torch.get_num_threads()]
Path(sys.argv[1]).write_text("started")
deadline = time.monotonic() + 30
while time.monotonic() < deadline and seen[-1] == seen[0]:
    time.sleep(0.05)                   # the runner lends the core freed by the other task
    seen.append(torch.get_num_threads())
Path(sys.argv[2]).write_text(" ".join(map(str, [seen[0], seen[-1]])))
"""


def test_a_task_left_running_alone_is_lent_the_free_core_and_a_new_task_takes_it_back(study_setup, tmp_path,
                                                                                      monkeypatch):
    """The runner's own loop with two real processes: both start with one thread; when the short one
    ends and nothing else can start, the long one is signalled to take two; the signal sent before a
    child installs its handler waits instead of killing it."""
    from metanmt.study import runner
    from metanmt.study.runner import Task

    monkeypatch.setattr(runner, "POLL_SECONDS", 0.1)
    study, out = load_study(study_setup[0]), tmp_path / "out"
    out.mkdir()
    started, seen = tmp_path / "started", tmp_path / "seen"
    # the short task ends once the long one has read its first count (however long torch takes to import)
    short = Task("short", "cells", [], done=lambda: (tmp_path / "short").is_file(),
                 command=lambda: [sys.executable, "-c", f"import time, pathlib\n"
                                  f"while not pathlib.Path({str(started)!r}).is_file(): time.sleep(0.05)\n"
                                  f"pathlib.Path({str(tmp_path / 'short')!r}).touch()"])
    long = Task("long", "cells", [], done=seen.is_file,
                command=lambda: [sys.executable, "-c", CHILD, str(started), str(seen)])
    result = runner._run(study, out, [long, short], jobs=2, report_only=False, device="cpu", argv_extra=[])
    assert sorted(result["ran"]) == ["long", "short"]
    assert seen.read_text() == "1 2"  # started beside another task with one thread, then lent the second
    assert (out / "logs" / "long.threads").read_text().strip() == "2"

    # a third task that becomes ready while one holds both cores: the lent core comes back first
    from metanmt.study.threads import ThreadLender

    class Proc:
        def __init__(self):
            self.signals = []

        def poll(self):
            return None

        def send_signal(self, sig):
            self.signals.append(sig)

    lender, proc = ThreadLender(jobs=2, logs=tmp_path), Proc()
    lender.started("long", proc, 1)
    lender.lend()
    assert lender.holding() == {"long": 2} and len(proc.signals) == 1
    lender.lend()  # already holding its share: no second signal
    assert len(proc.signals) == 1
    lender.take_back(starting=1)
    assert lender.holding() == {"long": 1} and (tmp_path / "long.threads").read_text() == "1\n"
    assert ThreadLender(3, tmp_path).shares(2) == [2, 1] and ThreadLender(2, tmp_path).shares(3) == [1, 1, 1]


def test_a_count_sent_while_a_task_exits_does_not_kill_it(tmp_path):
    """The interpreter's shutdown resets a Python signal handler to the default action (death by
    SIGUSR1); a task signalled as it exits ends with its own exit status."""
    from metanmt.study.threads import THREADS_FILE, block_lending_signal

    (tmp_path / "t.threads").write_text("1\n")
    child = ("from metanmt.study.threads import follow_lent_threads; follow_lent_threads(); import torch; "
             "print('ready', flush=True)")
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, THREADS_FILE: str(tmp_path / "t.threads")},
                                preexec_fn=block_lending_signal)
        assert proc.stdout.readline().strip() == "ready"
        while proc.poll() is None:  # counts all through its shutdown
            try:
                proc.send_signal(signal.SIGUSR1)
            except ProcessLookupError:
                break
            time.sleep(0.001)
        assert proc.wait() == 0


def test_the_length_rule_takes_the_best_mean_chrf_and_within_the_tie_the_fewest_updates():
    from metanmt.study.rule import choose_length

    rules = [{"epochs": e, "min_steps": 0, "max_steps": 100} for e in (5, 10, 20)]
    runs = [{"budget": "1k", "batches_per_epoch": 2, "points": {"10": {"chrf": 20.0}, "20": {"chrf": 25.0},
                                                                "40": {"chrf": 25.05}}},
            {"budget": "4k", "batches_per_epoch": 6, "points": {"30": {"chrf": 30.0}, "60": {"chrf": 33.0},
                                                                "100": {"chrf": 33.0}}}]
    result = choose_length(runs, rules, tie=0.1)
    means = {s["epochs"]: s["mean_chrf"] for s in result["scored"]}
    assert means == pytest.approx({5: 25.0, 10: 29.0, 20: 29.025})
    # 20 epochs is best by 0.025, within the tie: 10 epochs needs fewer updates (20 + 60 against 40 + 100)
    assert result["choice"]["epochs"] == 10 and result["choice"]["updates"] == {"1k": 20, "4k": 60}
    assert choose_length(runs, rules, tie=0.0)["choice"]["epochs"] == 20


def load_changed(study: Path, data: dict, name: str):
    """The study file ``data`` written beside ``study`` as ``name`` and loaded."""
    changed = study.parent / name
    changed.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_study(changed)


def scheduled_rates(cfg) -> list[float]:
    """The rate of each of a run config's updates, from the trainer's own scheduler."""
    import torch

    from metanmt.engine.trainer import make_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = make_scheduler(cfg, optimizer)
    rates = []
    for _ in range(cfg.train.steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def warm_started_meta(data: dict, sets: list[str]) -> None:
    """``data``'s meta init: first-order MAML from multi's update 9 at the rate multi reached there."""
    data["inits"]["meta"]["set"] = ["algorithm.name=fomaml", *sets]
    data["inits"]["meta"]["warm_start"] = {"init": "multi", "update": 9}
    data["inits"]["meta"]["lr_from_warm_start"] = True
    data["inits"]["meta"]["inner"] = "config"


def test_lr_from_warm_start_is_the_rate_the_sources_scheduler_reached(study_setup, tmp_path):
    """The meta init's constant rate equals what the trainer's own scheduler gives the warm start's source
    for its next update (inverse_sqrt with warmup)."""
    from metanmt.config import load_config

    study, root = study_setup
    data = yaml.safe_load(study.read_text())
    data["inits"]["multi"]["set"] += ["optim.schedule=inverse_sqrt", "optim.warmup_steps=3", "train.steps=12"]
    warm_started_meta(data, ["train.steps=3"])
    spec = load_changed(study, data, "lr_study.yaml")
    cfg = load_config(spec.inits["multi"].config, spec.inits["multi"].overrides)
    assert spec.lr_at_warm_start("meta") == pytest.approx(scheduled_rates(cfg)[9], rel=1e-12)
    assert spec.lr_at_warm_start("meta") < cfg.optim.lr

    from metanmt.study.inits import train_command

    command = train_command(spec, tmp_path, "meta")
    assert f"optim.lr={spec.lr_at_warm_start('meta'):.6g}" in command


def test_the_convergence_check_measures_the_last_window_and_stops_at_a_cooldown(study_setup, tmp_path):
    """The slope over the last 2,000 updates of validation; with a cooldown, over the 2,000 before it (a rate
    falling to 0 flattens any curve), the cooldown's fall reported beside it."""
    from metanmt.study.folder import init_dir
    from metanmt.study.report import convergence, history

    study, _ = study_setup
    losses = {1000: 3.0, 2000: 2.9, 3000: 2.85, 4000: 2.845, 5000: 2.835, 6000: 2.834}
    records = [{"kind": "train", "step": 50, "loss": 9.0}]
    records += [{"kind": "validation", "step": step, "dev_loss": loss} for step, loss in losses.items()]
    # a run killed after its validation at 6,000 and resumed from 5,000 logs 6,000 again: the last line counts
    records[-1:-1] = [{"kind": "validation", "step": 6000, "dev_loss": 2.7}, {"kind": "train", "step": 50, "loss": 8.0}]
    out = tmp_path / "out"
    init_dir(out, "multi").mkdir(parents=True)
    (init_dir(out, "multi") / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    assert [(r["step"], r["loss"]) for r in history(out, "multi", "train")] == [(50, 8.0)]
    check = convergence(load_study(study), out)
    assert (check["from"], check["to"]) == (4000, 6000) and check["flat"]
    assert check["fall_per_1000"] == pytest.approx((2.845 - 2.834) / 2) and "cooldown_from" not in check

    data = yaml.safe_load(study.read_text())
    data["inits"]["multi"]["set"] += ["optim.schedule=inverse_sqrt", "optim.cooldown_from=3500"]
    data["inits"]["meta"]["warm_start"] = {"init": "multi", "update": 2}
    check = convergence(load_changed(study, data, "cooled_study.yaml"), out)
    assert (check["from"], check["to"]) == (1000, 3000) and not check["flat"]
    assert check["fall_per_1000"] == pytest.approx(0.075) and "before its cooldown" in check["criterion"]
    assert check["cooldown_from"] == 3500 and check["cooldown_steps"] == (3000, 6000)
    assert check["cooldown_fall"] == pytest.approx(2.85 - 2.834)


def test_a_reference_that_is_not_flat_gets_the_update_where_its_fitted_power_law_passes_the_criterion():
    """Validations that follow a known power law exactly: the fit recovers it, and the forecast is the first
    update (rounded up to 500) at which the law's fall over the last 2,000 updates is under 0.01 nats per
    1,000, found here by brute force over every update."""
    from metanmt.study.convergence import FLAT_NATS_PER_1000, check, fall_per_1000, forecast, one_line

    a, b, c = 2.0, 3.0, 0.5
    points = [(step, a + b * (step / 1000) ** -c) for step in range(1000, 20001, 1000)]
    result = check(points)
    assert not result["flat"] and result["fall_per_1000"] == pytest.approx((points[-3][1] - points[-1][1]) / 2)
    fit = result["forecast"]
    assert (fit["a"], fit["b"], fit["c"]) == pytest.approx((a, b, c), rel=1e-5) and fit["rms"] < 1e-8
    assert (fit["fit_from"], fit["fit_to"], fit["n"]) == (5000, 20000, 16)
    first = next(step for step in range(20000, 10**6) if fall_per_1000((a, b, c), step) < FLAT_NATS_PER_1000)
    assert fit["flat_at"] == -(-first // 500) * 500 and fit["flat_at"] > 20000
    assert one_line("multi", result).endswith(f"not flat; a power law fitted from update 5,000 passes the criterion "
                                              f"near {fit['flat_at']:,}")
    # a law twice as steep passes later
    steeper = [(step, a + 6.0 * (step / 1000) ** -c) for step in range(1000, 20001, 1000)]
    assert check(steeper)["forecast"]["flat_at"] > fit["flat_at"]

    flat = [(step, 2.0 + 0.001 * (30 - step / 1000)) for step in range(1000, 20001, 1000)]
    assert check(flat)["flat"] and "forecast" not in check(flat)
    rising = [(step, 2.0 + step / 10**6) for step in range(1000, 20001, 1000)]  # over-fitting: flat, no forecast
    assert check(rising)["flat"] and "forecast" not in check(rising)
    assert forecast(points[:4]) is None  # updates 3,000 and 4,000 only lie in the fitted range
    assert check(points[:1]) is None


def test_a_meta_init_warm_started_at_the_sources_cooldown_cools_down_with_it(study_setup):
    """multi cools down from update 9 of 12; meta starts from multi's update 9 with lr_from_warm_start and
    a linear schedule over its 3 updates: its rates are multi's last 3. A warm start inside the cooldown,
    and a linear schedule with warmup, are errors."""
    from metanmt.config import load_config

    study, root = study_setup
    data = yaml.safe_load(study.read_text())
    data["inits"]["multi"]["set"] += ["optim.schedule=inverse_sqrt", "optim.warmup_steps=3", "train.steps=12",
                                      "optim.cooldown_from=9"]
    warm_started_meta(data, ["train.steps=3", "optim.schedule=linear", "optim.warmup_steps=0"])

    def load(changed_data):
        return load_changed(study, changed_data, "cooldown_study.yaml")

    spec = load(data)
    multi = scheduled_rates(load_config(spec.inits["multi"].config, spec.inits["multi"].overrides))
    meta = scheduled_rates(load_config(spec.inits["meta"].config,
                                       [*spec.inits["meta"].overrides, f"optim.lr={spec.lr_at_warm_start('meta')!r}"]))
    assert meta == pytest.approx(multi[9:], rel=1e-12) and meta[-1] < meta[0]

    data["inits"]["meta"]["warm_start"]["update"] = 10
    with pytest.raises(ConfigError, match="update 10 is inside multi's cooldown .from update 9."):
        load(data)
    data["inits"]["meta"]["warm_start"]["update"] = 12
    with pytest.raises(ConfigError, match="multi's rate at update 12 is 0"):
        load(data)
    data["inits"]["meta"]["warm_start"]["update"] = 9
    data["inits"]["meta"]["set"][-1] = "optim.warmup_steps=1"
    with pytest.raises(ConfigError, match="constant, or linear without warmup.*not linear with warmup"):
        load(data)


def test_an_inner_loop_whose_best_gain_is_not_positive_stops_the_study(study_setup, tmp_path, monkeypatch):
    from metanmt.errors import UserError
    from metanmt.study import inner

    study, _ = study_setup
    spec = load_study(study)
    result = {"init": "meta", "warm_start": "multi@2", "choice": {"lr": 0.001, "steps": 1, "gain": -0.02}}
    monkeypatch.setattr(inner, "measure_inner_gains", lambda *a: result)
    with pytest.raises(UserError, match=r"no candidate inner loop lowers the dev-language query loss .* -0.0200"):
        inner.choose_inner(spec, tmp_path, "meta")
    assert json.loads((tmp_path / "inner" / "meta.json").read_text()) == result  # measured once, kept


def test_a_study_may_add_budgets_on_resume_but_not_change_its_settings(study_setup, tmp_path):
    """A later phase (16k, 40k) continues the same folder; anything else changed is refused."""
    from metanmt.errors import UserError
    from metanmt.engine.checkpoint import release_directory
    from metanmt.study.folder import claim
    from metanmt.study.spec import describe

    study, root = study_setup
    out = tmp_path / "out"
    assert claim(out, describe(load_study(study)), root, overwrite=False) is False
    release_directory(out)
    assert claim(out, describe(load_study(study, extra=["budgets=[0, 100, 300]"])), root, overwrite=False) is True
    release_directory(out)
    with pytest.raises(UserError, match=r"other settings \(budgets"):
        claim(out, describe(load_study(study, extra=["budgets=[0]"])), root, overwrite=False)
    release_directory(out)
    with pytest.raises(UserError, match=r"other settings \(seeds: 2 -> 3"):
        claim(out, describe(load_study(study, extra=["budgets=[0, 100, 300]", "seeds=3"])), root, overwrite=False)


def test_a_required_convergence_check_stops_the_study_before_any_test_cell(study_setup, finished, tmp_path, capsys):
    """``convergence: required``: with the reference's dev NLL still falling, what does not wait for the
    check runs (the length rule) and no cell starts; the error names the check. Once the reference's
    validations are flat the check passes and only the cells and the report are left."""
    study, _ = study_setup
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    for gone in ("cells", "report"):
        shutil.rmtree(out / gone)
    (out / "rule.json").unlink()
    history = out / "inits" / "multi" / "history.jsonl"
    records = [json.loads(line) for line in history.read_text().splitlines()]
    first = next(r for r in records if r.get("kind") == "validation" and r["step"] == 2)

    def validation_at_4(loss: float) -> None:  # the last line of a step counts (a resumed run logs it again)
        history.write_text("".join(json.dumps(r) + "\n" for r in
                                   [*records, {"kind": "validation", "step": 4, "dev_loss": loss}]))

    validation_at_4(first["dev_loss"] - 0.5)  # 250 nats per 1,000 updates
    capsys.readouterr()
    assert run_cli("study", study, "--out", out, "--cpu", "--set", "convergence=required") == 2
    err = capsys.readouterr().err
    assert "the reference multi's dev NLL fell +250.0000 nats per 1,000 updates from 2 to 4" in err
    assert "not flat" in err and "no test cell was run" in err and "tasks not run: cells:xb, cells:xc, report" in err
    assert (out / "rule.json").is_file() and not (out / "cells").exists()

    validation_at_4(first["dev_loss"] + 0.001)  # rising: flat by the criterion
    assert run_cli("study", study, "--out", out, "--set", "convergence=required", "--dry-run") == 0
    plan = json.loads(capsys.readouterr().out)
    assert [t["task"] for t in plan["plan"] if not t["done"]] == ["cells:xb", "cells:xc", "report"]
    assert next(t for t in plan["plan"] if t["task"] == "converged")["command"] is None
    # without the key the check is not a task; the key is not a setting a resumed study must match
    assert run_cli("study", study, "--out", out, "--dry-run") == 0
    assert "converged" not in [t["task"] for t in json.loads(capsys.readouterr().out)["plan"]]
