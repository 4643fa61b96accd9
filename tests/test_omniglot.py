"""Omniglot: loader (folder and zip), episodes, official runs, bad data, model, exact batch-norm
meta-gradients, download (mocked), and a real-data smoke test where the shared data is present."""

from __future__ import annotations

import fnmatch
import hashlib
import io
import time
import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from metanmt.data import download as dl
from metanmt.data.omniglot import (
    clear_memory_cache,
    load_image_set,
    preprocess_png,
    read_official_runs,
    resolve_source,
    score_official_runs,
)
from metanmt.errors import ConfigError, DataError, UserError
from metanmt.tasks.omniglot import HEAD_ONLY_ADAPT, OmniglotConvNet, OmniglotFamily

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
needs_shared = pytest.mark.skipif(
    not (SHARED / "images_background_small1.zip").is_file(),
    reason=f"shared Omniglot data not found at {SHARED} (CI has it beside the checkout)",
)


# -- fixtures: a tiny Omniglot drawn with PIL --------------------------------------------------------
def drawing(char_id: int, drawer: int, size: int = 105) -> Image.Image:
    """A 1-bit image like Omniglot's (black strokes on white): a bar whose place and angle depend
    on the character, and a dot whose place depends on the drawer, so every image is distinct."""
    img = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(img)
    a = 10 + 7 * (char_id % 8)
    draw.line([(a, 10), (size - 10 - 3 * (char_id // 8), size - a)], fill=0, width=9)
    d = 12 + 9 * drawer
    draw.ellipse([d, size - 25, d + 8, size - 17], fill=0)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_set(root: Path, name: str, alphabets: dict[str, int], drawings: int = 6, start: int = 0) -> Path:
    """``root/name/<Alphabet>/characterNN/<id>_<drawer>.png``; returns the set folder."""
    char_id = start
    for alphabet, n_chars in alphabets.items():
        for c in range(1, n_chars + 1):
            folder = root / name / alphabet / f"character{c:02d}"
            folder.mkdir(parents=True)
            for d in range(1, drawings + 1):
                (folder / f"{1000 + char_id:04d}_{d:02d}.png").write_bytes(png_bytes(drawing(char_id, d)))
            char_id += 1
    return root / name


def zip_folder(folder: Path, to: Path, prefix: str | None = None) -> Path:
    """Zip like the official files: every member under ``prefix/`` (default: the folder name)."""
    prefix = folder.name if prefix is None else prefix
    with zipfile.ZipFile(to, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return to


SMALL1 = {"Alpha": 3, "Greek": 2, "Latin": 2}
SMALL2 = {"Greek": 2, "Latin": 2, "Kappa": 3, "Omega": 2}


@pytest.fixture
def omni_root(tmp_path: Path) -> Path:
    """A data root like the shared one: small1 as a folder, small2 as a zip."""
    make_set(tmp_path, "images_background_small1", SMALL1)
    src = make_set(tmp_path / "src", "images_background_small2", SMALL2, start=40)
    zip_folder(src, tmp_path / "images_background_small2.zip")
    return tmp_path


def family(root: Path, **task) -> OmniglotFamily:
    cfg = {"split": "minimal", "ways": 3, "shots": 2, "query": 2, **task}
    return OmniglotFamily(cfg, {"hidden": 4, "blocks": 2}, data_root=root)


# -- loader ---------------------------------------------------------------------------------------
def test_loader_reads_folder_and_zip_alike(tmp_path: Path) -> None:
    folder = make_set(tmp_path, "images_background", SMALL1)
    archive = zip_folder(folder, tmp_path / "images_background.zip")
    a = load_image_set(folder, image_size=20)
    b = load_image_set(archive, image_size=20)
    parent = load_image_set(tmp_path / "images_background", image_size=20)  # the same folder again: cached
    assert parent is a
    assert a.characters == b.characters == [
        "Alpha/character01", "Alpha/character02", "Alpha/character03",
        "Greek/character01", "Greek/character02", "Latin/character01", "Latin/character02",
    ]  # fmt: skip
    assert a.alphabets == ["Alpha", "Greek", "Latin"]
    assert a.images.shape == (7 * 6, 20, 20) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.character, b.character)
    assert all(a.count(c) == 6 for c in range(7))
    assert a.indices_of(1).tolist() == list(range(6, 12))
    # inverted: the background (a corner) is 0 and strokes are bright
    assert int(a.images[:, 0, 0].max()) == 0 and int(a.images.max()) >= 250


def test_preprocess_inverts_and_resizes() -> None:
    white = png_bytes(Image.new("1", (105, 105), 1))
    black = png_bytes(Image.new("1", (105, 105), 0))
    assert preprocess_png(white, 28, "w").max() == 0
    assert preprocess_png(black, 28, "b").min() == 255
    img = preprocess_png(png_bytes(drawing(3, 1)), 28, "d")
    assert img.shape == (28, 28) and img.dtype == np.uint8
    assert 0 < (img > 0).mean() < 0.5  # antialiased strokes survive the resize
    assert len(np.unique(img)) > 2  # grey levels from the Lanczos filter


def test_memory_and_disk_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_set(tmp_path, "images_background", {"Alpha": 2}, drawings=3)
    cache = tmp_path / "cache"
    first = load_image_set(folder, 28, cache_dir=cache)
    assert load_image_set(folder, 28, cache_dir=cache) is first
    files = list(cache.glob("omniglot-images_background-28px-*.npz"))
    assert len(files) == 1
    clear_memory_cache()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded PNGs although an .npz cache exists")

    monkeypatch.setattr("metanmt.data.omniglot.preprocess_png", no_decoding)
    again = load_image_set(folder, 28, cache_dir=cache)
    assert again is not first
    assert torch.equal(again.images, first.images) and again.characters == first.characters
    assert again.files == first.files


def test_resolve_source_prefers_folder_then_zip(omni_root: Path) -> None:
    assert resolve_source(omni_root, "background_small1") == omni_root / "images_background_small1"
    assert resolve_source(omni_root, "background_small2") == omni_root / "images_background_small2.zip"
    with pytest.raises(DataError, match="metanmt data omniglot"):
        resolve_source(omni_root, "background")


# -- bad data -------------------------------------------------------------------------------------------
def test_missing_or_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_image_set(tmp_path / "nope.zip")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no PNG images"):
        load_image_set(tmp_path / "empty")
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="broken.zip: not a readable zip"):
        load_image_set(tmp_path / "broken.zip")


def test_wrong_layouts(tmp_path: Path) -> None:
    flat = tmp_path / "flat" / "Alpha"
    flat.mkdir(parents=True)
    (flat / "0001_01.png").write_bytes(png_bytes(drawing(0, 1)))
    with pytest.raises(DataError, match="not inside an <Alphabet>/<character>/ folder"):
        load_image_set(tmp_path / "flat")
    mixed = make_set(tmp_path, "mixed", {"Alpha": 1}, drawings=2)
    (mixed / "Alpha" / "stray.png").write_bytes(png_bytes(drawing(0, 1)))
    with pytest.raises(DataError, match="different depths"):
        load_image_set(mixed)
    make_set(tmp_path / "two", "images_background", {"Alpha": 1}, drawings=2)
    make_set(tmp_path / "two", "images_evaluation", {"Beta": 1}, drawings=2)
    with pytest.raises(DataError, match="several image sets"):
        load_image_set(tmp_path / "two")


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    folder = make_set(tmp_path, "images_background", {"Alpha": 2}, drawings=2)
    bad = folder / "Alpha" / "character02" / "1001_02.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"character02/1001_02\.png: not a readable image"):
        load_image_set(folder)
    archive = zip_folder(folder, tmp_path / "images_background.zip")
    with pytest.raises(DataError, match=r"images_background\.zip:images_background/Alpha/character02/1001_02\.png"):
        load_image_set(archive)


def test_class_with_too_few_images(omni_root: Path) -> None:
    fam = family(omni_root, shots=4, query=3)  # the fixture has 6 drawings per character
    with pytest.raises(DataError, match=r"fewer than shots\+query=7 images: .*Alpha/character01 has 6"):
        fam.sample_episode(np.random.default_rng(0))
    fam = family(omni_root, ways=50)
    with pytest.raises(DataError, match="a 50-way episode needs at least 50 distinct"):
        fam.sample_episode(np.random.default_rng(0), split="test")


def test_bad_config_values(omni_root: Path) -> None:
    with pytest.raises(ConfigError, match="task.shots"):
        family(omni_root, shots=0)
    with pytest.raises(ConfigError, match="too small"):
        OmniglotFamily({"image_size": 8}, {"blocks": 4}, omni_root)
    with pytest.raises(ConfigError, match="split 'dev'"):
        family(omni_root).sample_episode(np.random.default_rng(0), split="dev")
    with pytest.raises(ConfigError, match="model.pooling"):
        OmniglotFamily({}, {"pooling": "avg"}, omni_root)


# -- splits and episodes ------------------------------------------------------------------------------
def test_minimal_split_drops_shared_alphabets(omni_root: Path) -> None:
    fam = family(omni_root, val_characters=2)
    train, val, test = (fam.split_characters(s) for s in ("train", "val", "test"))
    short = lambda names: sorted(n.rsplit(":", 1)[1] for n in names)  # noqa: E731
    assert len(train) + len(val) == 7 and len(val) == 2
    assert not set(train) & set(val)
    assert short(test) == ["Kappa/character01", "Kappa/character02", "Kappa/character03",
                           "Omega/character01", "Omega/character02"]  # fmt: skip
    assert fam.num_classes("train") == 4 * len(train)  # rotations are classes in training
    assert fam.num_classes("test") == len(test)  # and not at evaluation by default
    assert family(omni_root, val_characters=2, split_seed=1).split_characters("val") == val


def test_maml_and_lake_splits(omni_root: Path) -> None:
    sets = {"train_sets": ["background_small1"], "test_sets": ["background_small2"]}
    fam = family(omni_root, split="maml", maml_train_characters=8, **sets)
    train, test = fam.split_characters("train"), fam.split_characters("test")
    names = lambda chars: {n.rsplit(":", 1)[1] for n in chars}  # noqa: E731
    assert len(train) == 8 and len(test) == 12 - 8  # 16 characters, Greek+Latin counted once
    assert not names(train) & names(test)
    other = family(omni_root, split="maml", maml_train_characters=8, split_seed=5, **sets)
    assert other.split_characters("train") != train  # the seed picks the characters
    assert family(omni_root, split="maml", maml_train_characters=8, **sets).split_characters("train") == train
    lake = family(omni_root, split="lake", train_sets=["background_small2"], test_sets=["background_small1"])
    assert {n.rsplit(":", 1)[1].split("/")[0] for n in lake.split_characters("test")} == {"Alpha"}


@pytest.mark.parametrize("split", ["train", "test"])
def test_episode_properties(omni_root: Path, split: str) -> None:
    fam = family(omni_root, eval_rotations=True)
    for seed in range(5):
        plan = fam.plan_episode(np.random.default_rng(seed), split)
        assert len(set(plan.classes.tolist())) == 3 and len(set(plan.characters.tolist())) == 3
        for i in range(3):
            rows = np.concatenate([plan.support[i], plan.query[i]])
            assert len(set(rows.tolist())) == 4  # K+Q distinct images
            assert set(rows.tolist()) <= set(fam._char_rows[plan.characters[i]].tolist())  # of that character
        assert not set(plan.support.ravel()) & set(plan.query.ravel())
        ep = fam.sample_episode(np.random.default_rng(seed), split)
        assert ep.support["images"].shape == (6, 1, 28, 28) and ep.support["images"].dtype == torch.float32
        assert sorted(ep.support["labels"].tolist()) == [0, 0, 1, 1, 2, 2]
        assert sorted(ep.query["labels"].tolist()) == [0, 0, 1, 1, 2, 2]
        assert 0.0 <= float(ep.support["images"].min()) and float(ep.support["images"].max()) <= 1.0
        # every support image is its class's stored image, turned by the class's rotation
        for img, label in zip(ep.support["images"], ep.support["labels"]):
            k = int(plan.rotations[label])
            stored = fam._images[torch.from_numpy(plan.support[label])].float() / 255
            turned = torch.rot90(stored, k, dims=(-2, -1))
            assert any(torch.equal(img[0], t) for t in turned)


def test_episodes_are_reproducible(omni_root: Path) -> None:
    a = family(omni_root).sample_episode(np.random.default_rng([3, 7, 1]))
    b = family(omni_root).sample_episode(np.random.default_rng([3, 7, 1]))  # a fresh family, same seed
    c = family(omni_root).sample_episode(np.random.default_rng([3, 7, 2]))
    for key in ("images", "labels"):
        assert torch.equal(a.support[key], b.support[key]) and torch.equal(a.query[key], b.query[key])
    assert a.task == b.task
    assert not torch.equal(a.support["images"], c.support["images"])
    # labels are assigned to classes in a random order: over a few episodes, label 0 varies
    fam = family(omni_root)
    firsts = {int(fam.plan_episode(np.random.default_rng(s)).classes[0]) for s in range(10)}
    assert len(firsts) > 1


def test_running_reset_query_carries_support(omni_root: Path) -> None:
    model_cfg = {"hidden": 4, "blocks": 2, "bn_policy": "running_reset"}
    fam = OmniglotFamily({"ways": 3, "shots": 2, "query": 2}, model_cfg, omni_root)
    ep = fam.sample_episode(np.random.default_rng(0))
    assert torch.equal(ep.query["context"], ep.support["images"])
    merged = fam.merge_batches(ep.support, ep.query)
    assert set(merged) == {"images", "labels"} and merged["images"].shape[0] == 12
    # non-transductive: a query image's logits do not depend on the other query images
    model = fam.build_model()
    params = dict(model.named_parameters())
    full = fam.logits(model, params, ep.query)
    one = fam.logits(model, params, {"images": ep.query["images"][:1], "context": ep.query["context"]})
    torch.testing.assert_close(one, full[:1])


# -- official runs ----------------------------------------------------------------------------------------
def make_runs(root: Path, n_runs: int = 3, n_classes: int = 4) -> tuple[Path, list[list[int]]]:
    """Runs whose test item i is an exact copy of training class perm[i]; run02 uses the short
    ``test/... training/...`` line form. Returns the zip and the true labels (0-based)."""
    truth = []
    with zipfile.ZipFile(root / "all_runs.zip", "w") as zf:
        for r in range(1, n_runs + 1):
            run = f"run{r:02d}"
            perm = np.random.default_rng(r).permutation(n_classes).tolist()
            truth.append(perm)
            for c in range(n_classes):
                zf.writestr(f"{run}/training/class{c + 1:02d}.png", png_bytes(drawing(10 * r + c, 1)))
            lines = []
            for i, c in enumerate(perm):
                zf.writestr(f"{run}/test/item{i + 1:02d}.png", png_bytes(drawing(10 * r + c, 1)))
                pre = "" if r == 2 else f"{run}/"
                lines.append(f"{pre}test/item{i + 1:02d}.png {pre}training/class{c + 1:02d}.png")
            zf.writestr(f"{run}/class_labels.txt", "\n".join(lines) + "\n")
    return root / "all_runs.zip", truth


def nearest_pixel(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
    return sy[torch.cdist(qx.flatten(1), sx.flatten(1)).argmin(1)]


def test_official_runs_reader_and_scorer(tmp_path: Path) -> None:
    path, truth = make_runs(tmp_path)
    runs = read_official_runs(path)
    assert [r.name for r in runs] == ["run01", "run02", "run03"]
    for run, labels in zip(runs, truth):
        assert run.support_x.shape == (4, 1, 28, 28) and run.support_y.tolist() == [0, 1, 2, 3]
        assert run.query_y.tolist() == labels
    assert score_official_runs(path, nearest_pixel) == {"official_runs_error_pct": 0.0, "per_run_error_pct": [0.0] * 3}

    calls = []

    def wrong_on_first_items(sx, sy, qx):  # run j (0-based) gets its first j answers wrong
        j = len(calls)
        calls.append(j)
        pred = nearest_pixel(sx, sy, qx).numpy().copy()
        pred[:j] = (pred[:j] + 1) % 4
        return pred.tolist()

    result = score_official_runs(path, wrong_on_first_items)
    assert result["per_run_error_pct"] == [0.0, 25.0, 50.0]
    assert result["official_runs_error_pct"] == pytest.approx(25.0)
    with pytest.raises(ValueError, match="returned"):
        score_official_runs(path, lambda sx, sy, qx: sy[:2])


def test_official_runs_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no runNN/class_labels.txt"):
        read_official_runs(make_set(tmp_path, "images_background", {"Alpha": 1}, drawings=1))
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("run01/training/class01.png", png_bytes(drawing(0, 1)))
        zf.writestr("run01/test/item01.png", png_bytes(drawing(0, 1)))
        zf.writestr("run01/class_labels.txt", "run01/test/item01.png run01/training/class01.png\njust-one-field\n")
    with pytest.raises(DataError, match=r"bad.zip:run01/class_labels.txt:2: expected"):
        read_official_runs(tmp_path / "bad.zip")
    with zipfile.ZipFile(tmp_path / "missing.zip", "w") as zf:
        zf.writestr("run01/training/class01.png", png_bytes(drawing(0, 1)))
        zf.writestr("run01/test/item01.png", png_bytes(drawing(0, 1)))
        zf.writestr("run01/class_labels.txt", "test/item01.png training/class07.png\n")
    with pytest.raises(DataError, match=r"class_labels.txt:1: training image .*class07.png does not exist"):
        read_official_runs(tmp_path / "missing.zip")


# -- model ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,pooling", [("batch", "max"), ("running_reset", "stride")])
def test_save_load_gives_identical_logits(omni_root: Path, tmp_path: Path, policy: str, pooling: str) -> None:
    model_cfg = {"hidden": 8, "pooling": pooling, "bn_policy": policy}
    fam = OmniglotFamily({"ways": 3, "shots": 2, "query": 2}, model_cfg, omni_root)
    torch.manual_seed(0)
    model = fam.build_model()
    ep = fam.sample_episode(np.random.default_rng(0))
    fam.save_model(model, tmp_path / "model")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "model").iterdir()}
    loaded = fam.load_model(tmp_path / "model")
    assert isinstance(loaded, OmniglotConvNet) and loaded.bn_policy == policy
    for batch in (ep.support, ep.query):
        a = fam.logits(model, dict(model.named_parameters()), batch)
        b = fam.logits(loaded, dict(loaded.named_parameters()), batch)
        assert a.shape == (6, 3) and torch.equal(a, b)
    with pytest.raises(DataError, match="no config.json"):
        fam.load_model(tmp_path)


def test_metrics_and_head_only(omni_root: Path) -> None:
    fam = OmniglotFamily({"ways": 3, "shots": 2, "query": 2}, {"hidden": 8, "head_only": True}, omni_root)
    model = fam.build_model()
    names = [n for n, _ in model.named_parameters()]
    adapted = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in fam.default_adapt)]
    assert adapted == ["head.weight", "head.bias"]
    assert fam.default_adapt == HEAD_ONLY_ADAPT and OmniglotFamily.default_adapt == ["*"]
    ep = fam.sample_episode(np.random.default_rng(0))
    m = fam.metrics(model, dict(model.named_parameters()), ep.query)
    assert set(m) == {"loss", "accuracy"} and 0.0 <= m["accuracy"] <= 1.0
    assert m["loss"] == pytest.approx(float(fam.loss(model, dict(model.named_parameters()), ep.query).detach()))
    assert fam.predict(model, dict(model.named_parameters()), ep.query).shape == (6,)


def maml_objective(model, params: dict, names: list[str], support, query, lr: float = 0.3, steps: int = 2):
    """Query loss after ``steps`` explicit SGD steps on the support set (second order)."""
    from torch.func import functional_call
    import torch.nn.functional as F

    def loss(p, batch):
        kwargs = {"context": batch["context"]} if "context" in batch else {}
        return F.cross_entropy(functional_call(model, p, (batch["images"],), kwargs), batch["labels"])

    current = dict(params)
    for _ in range(steps):
        grads = torch.autograd.grad(loss(current, support), [current[n] for n in names], create_graph=True)
        current = {**current, **{n: current[n] - lr * g for n, g in zip(names, grads)}}
    return loss(current, query)


@pytest.mark.parametrize("policy,pooling", [("batch", "max"), ("running_reset", "max"), ("batch", "stride")])
def test_maml_meta_gradient_matches_finite_differences(policy: str, pooling: str) -> None:
    torch.manual_seed(0)
    model = OmniglotConvNet(ways=3, hidden=3, blocks=2, pooling=pooling, bn_policy=policy).double()
    with torch.no_grad():  # move batch norm away from its identity init so its parameters matter
        for block in model.blocks:
            block.norm.weight.uniform_(0.5, 1.5)
            block.norm.bias.uniform_(-0.3, 0.3)
    gen = torch.Generator().manual_seed(1)
    sx = torch.rand(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    qx = torch.rand(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.arange(3).repeat(2)
    support = {"images": sx, "labels": labels}
    query = {"images": qx, "labels": labels, **({"context": sx} if policy == "running_reset" else {})}
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    objective = maml_objective(model, params, names, support, query)
    analytic = torch.autograd.grad(objective, [params[n] for n in names])
    eps = 1e-6
    for name, grad in zip(names, analytic):
        numeric = torch.zeros_like(grad)
        flat = numeric.view(-1)
        for i in range(grad.numel()):
            values = []
            for sign in (1, -1):
                shifted = params[name].detach().clone()
                shifted.view(-1)[i] += sign * eps
                p = {**params, name: shifted.requires_grad_()}
                values.append(float(maml_objective(model, p, names, support, query).detach()))
            flat[i] = (values[0] - values[1]) / (2 * eps)
        torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-7, msg=f"meta-gradient of {name}")
    assert float(analytic[0].abs().sum()) > 0  # the conv weights do get a meta-gradient


def test_vmapped_meta_gradient_equals_loop() -> None:
    """Design pitfall 1: with this batch norm, vmap over tasks gives the per-task loop's meta-gradients."""
    from torch.func import functional_call, grad, vmap
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = OmniglotConvNet(ways=3, hidden=3, blocks=2).double()
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    sx = torch.rand(4, 6, 1, 8, 8, generator=gen, dtype=torch.float64)
    qx = torch.rand(4, 6, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.arange(3).repeat(2)

    def task_objective(p, s, q):
        loss = lambda p_, x: F.cross_entropy(functional_call(model, p_, (x,)), y)  # noqa: E731
        g = grad(loss)(p, s)
        return loss({n: p[n] - 0.4 * g[n] for n in p}, q)

    batched = vmap(grad(task_objective), in_dims=(None, 0, 0))(params, sx, qx)
    for t in range(4):
        single = grad(task_objective)(params, sx[t], qx[t])
        for n in params:
            torch.testing.assert_close(batched[n][t], single[n], rtol=1e-10, atol=1e-12)


# -- download (never touches the network) ----------------------------------------------------------------
class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_download_with_mocked_urlopen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_set(tmp_path / "src", "images_background_small1", {"Alpha": 1}, drawings=2)
    payload = zip_folder(folder, tmp_path / "payload.zip").read_bytes()
    url = "https://example.invalid/images_background_small1.zip"
    spec = dl.RemoteFile(url, hashlib.md5(payload).hexdigest(), "images")
    requested = []

    def fake_urlopen(request, timeout):
        requested.append(request.full_url)
        return FakeResponse(payload)

    monkeypatch.setattr(dl, "urlopen", fake_urlopen)
    out = dl.download_omniglot(tmp_path / "data", files={"images_background_small1": spec})
    assert out == [tmp_path / "data" / "images_background_small1.zip"]
    assert out[0].read_bytes() == payload and requested == [spec.url]
    assert load_image_set(out[0]).characters == ["Alpha/character01"]
    dl.download_omniglot(tmp_path / "data", files={"images_background_small1": spec})
    assert len(requested) == 1  # present and valid: not fetched again

    wrong = dl.RemoteFile(spec.url, "0" * 32, "images")
    with pytest.raises(DataError, match="MD5"):
        dl.download_omniglot(tmp_path / "other", files={"images_background_small1": wrong})
    assert not list((tmp_path / "other").iterdir())  # nothing half-written is left behind
    runs = dl.RemoteFile("https://example.invalid/all_runs.zip", None, "runs")
    with pytest.raises(DataError, match="run01..run20"):
        dl.download_omniglot(tmp_path / "other", files={"all_runs": runs})


def test_download_offline_says_where_to_put_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(request, timeout):
        raise URLError("Temporary failure in name resolution")

    monkeypatch.setattr(dl, "urlopen", offline)
    target = tmp_path / "omni"
    with pytest.raises(UserError) as info:
        dl.download_omniglot(target, names=["images_background", "all_runs"])
    message = str(info.value)
    assert "name resolution" in message and str(target / "images_background.zip") in message
    assert dl.OMNIGLOT_FILES["all_runs"].url in message
    assert not list(target.iterdir())
    with pytest.raises(UserError, match="unknown Omniglot file"):
        dl.download_omniglot(target, names=["images_typo"])


# -- the real data, where present ------------------------------------------------------------------------
@needs_shared
def test_real_small_sets_and_runs() -> None:
    clear_memory_cache()
    started = time.perf_counter()
    s = load_image_set(SHARED / "images_background_small1.zip")
    seconds = time.perf_counter() - started
    assert s.images.shape == (2720, 28, 28) and len(s.characters) == 136
    assert s.alphabets == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    assert all(s.count(c) == 20 for c in range(136))
    assert float(s.images.float().mean()) < 60  # mostly background (0) after inversion
    print(f"images_background_small1.zip decoded in {seconds:.2f}s")

    fam = OmniglotFamily({"split": "minimal", "ways": 20}, {}, data_root=SHARED)
    assert {n.rsplit(":", 1)[1].split("/")[0] for n in fam.split_characters("test")} == {
        "Japanese_(katakana)", "Sanskrit", "Tagalog"}  # fmt: skip
    assert fam.num_classes("train") == 4 * 136
    ep = fam.sample_episode(np.random.default_rng(0))
    assert ep.support["images"].shape == (20, 1, 28, 28)

    runs = read_official_runs(SHARED / "all_runs.zip")
    assert len(runs) == 20
    assert all(sorted(r.query_y.tolist()) == list(range(20)) for r in runs)  # one test item per class
    # pixel nearest neighbour is far from perfect but clearly above chance (95% error)
    error = score_official_runs(SHARED / "all_runs.zip", nearest_pixel)["official_runs_error_pct"]
    assert 50.0 < error < 90.0
    for name in ("images_background_small1", "images_background_small2", "all_runs"):
        dl.verify_omniglot_zip(SHARED / f"{name}.zip", name, dl.OMNIGLOT_FILES[name])


@needs_shared
@pytest.mark.slow
def test_short_real_run_beats_chance_on_official_runs(tmp_path: Path) -> None:
    """About 20 s: 60 Reptile meta-steps on background small1, then the 20 official runs (chance is 95%)."""
    pytest.importorskip("metanmt.engine.trainer", reason="the meta-training engine is not installed")
    from metanmt.config import load_config
    from metanmt.engine.inner import InnerLoop, full_state, select_names
    from metanmt.engine.trainer import MetaTrainer

    suite = Path(__file__).resolve().parents[1] / "tasks" / "omniglot_small1.yaml"
    cfg = load_config(
        None,
        [
            f"suite={suite}",
            f"data.root={SHARED}",
            "model.hidden=16",
            "algorithm.name=reptile",
            "algorithm.inner_steps=3",
            "algorithm.inner_lr=0.2",
            "optim.lr=0.005",
            "train.steps=60",
            "train.meta_batch_size=4",
            "train.save_every=60",
            "train.trackers=[]",
        ],
    )
    trainer = MetaTrainer(cfg, tmp_path / "run")
    trainer.train()
    fam, model = trainer.family, trainer.model
    inner = InnerLoop(fam, model, select_names(model, ["*"]), steps=10, lr=0.2)

    def adapt_and_predict(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
        episode = fam.episode_from_arrays(sx, sy, qx)
        params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
        adapted = inner.adapt(params, episode.support, create_graph=False).params
        return fam.predict(model, full_state(model, adapted), episode.query)

    result = fam.score_official_runs(None, adapt_and_predict)  # task.official_runs: all_runs.zip
    assert len(result["per_run_error_pct"]) == 20
    print(f"official runs error after 60 Reptile steps: {result['official_runs_error_pct']:.2f}%")
    assert result["official_runs_error_pct"] < 85.0  # chance: 95%
    # the checkpoint the trainer wrote loads back through the family
    saved = [p.parent for p in (tmp_path / "run").rglob("model.safetensors")]
    assert saved
    loaded = fam.load_model(saved[-1])
    for (name, a), b in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(a.detach().cpu(), b), name


# -- the CLI: meta-train, evaluate on episodes and on the official runs ----------------------------
def test_cli_trains_and_evaluates_omniglot(omni_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from metanmt.cli import main

    make_runs(omni_root, n_runs=2, n_classes=3)
    out = tmp_path / "run"
    suite = Path(__file__).resolve().parents[1] / "tasks" / "omniglot_small1.yaml"
    sets = ["data.root=" + str(omni_root), f"suite={suite}", "task.ways=3", "task.shots=1", "task.query=2",
            "model.hidden=4", "model.blocks=2", "train.steps=2", "train.meta_batch_size=2", "train.trackers=[]",
            "algorithm.inner_steps=1", "algorithm.eval_inner_steps=2"]
    args = ["meta-train", "configs/omniglot_maml_5w1s.yaml", "--output-dir", str(out)]
    assert main([*args, *[x for s in sets for x in ("--set", s)]]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--episodes", "5", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)
    assert acc["ways"] == 3 and acc["episodes"] == 5 and acc["inner_steps"] == 2 and 0 <= acc["accuracy"]["mean"] <= 1
    assert main(["evaluate", str(out), "--omniglot-runs", str(omni_root / "all_runs.zip"), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs["per_run_error_pct"]) == 2 and "accuracy" not in runs
    assert runs["official_runs_error_pct"] == pytest.approx(sum(runs["per_run_error_pct"]) / 2)


# -- small-shift augmentation ---------------------------------------------------------------------------
def test_random_shift_moves_each_image_within_range() -> None:
    from metanmt.tasks.omniglot import random_shift

    images = torch.zeros(6, 1, 12, 12)
    images[:, 0, 4:8, 5:7] = torch.rand(6, 4, 2) + 0.5  # a blob away from the border: nothing is cut off
    out = random_shift(images, 2, np.random.default_rng(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    moved = 0
    for i in range(6):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(out[i], torch.roll(images[i], (dy, dx), dims=(-2, -1)))]
        assert len(matches) == 1, i  # exactly one translation within +-2 px explains the image
        moved += matches[0] != (0, 0)
    assert moved >= 3
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)))
    # a shift pushes content out rather than wrapping it round
    edge = torch.zeros(1, 1, 5, 5)
    edge[0, 0, :, 0] = 1.0
    outs = [random_shift(edge, 1, np.random.default_rng(s)) for s in range(30)]
    assert any(float(o.sum()) < 5.0 for o in outs) and all(float(o[0, 0, :, -1].sum()) == 0.0 for o in outs)
    assert random_shift(images, 0, np.random.default_rng(0)) is images


def test_shift_augments_training_episodes_only_and_is_seeded(omni_root: Path) -> None:
    plain, shifted = family(omni_root), family(omni_root, shift=2)
    a = shifted.sample_episode(np.random.default_rng([5, 0, 0]))
    b = shifted.sample_episode(np.random.default_rng([5, 0, 0]))
    ref = plain.sample_episode(np.random.default_rng([5, 0, 0]))
    assert a.task == ref.task  # the shift draws after the plan: the same classes and images
    for key in ("support", "query"):
        x, y, r = getattr(a, key), getattr(b, key), getattr(ref, key)
        assert torch.equal(x["images"], y["images"]) and torch.equal(x["labels"], r["labels"])
        assert x["images"].shape == r["images"].shape == (6, 1, 28, 28)
    assert not torch.equal(a.support["images"], ref.support["images"])
    other = shifted.sample_episode(np.random.default_rng([5, 0, 1]))
    assert not torch.equal(other.support["images"], a.support["images"])
    t1 = shifted.sample_episode(np.random.default_rng(3), split="test")
    t0 = plain.sample_episode(np.random.default_rng(3), split="test")
    assert torch.equal(t1.support["images"], t0.support["images"])  # evaluation images are never shifted
    with pytest.raises(ConfigError, match="task.shift"):
        family(omni_root, shift=-1)
    with pytest.raises(ConfigError, match="task.shift"):
        family(omni_root, shift=28)


# -- transductive vs non-transductive evaluation ------------------------------------------------------------
def tiny_run(omni_root: Path, tmp_path: Path, ways: int = 3):
    from metanmt.config import load_config
    from metanmt.engine.run import Run
    from metanmt.engine.trainer import build_family

    suite = Path(__file__).resolve().parents[1] / "tasks" / "omniglot_small1.yaml"
    sets = [f"suite={suite}", f"data.root={omni_root}", f"task.ways={ways}", "task.shots=1", "task.query=2",
            "model.hidden=4", "model.blocks=2", "algorithm.inner_lr=0.4", "algorithm.eval_inner_steps=2"]
    cfg = load_config(None, sets)
    fam = build_family(cfg)
    torch.manual_seed(0)
    return Run(directory=tmp_path, cfg=cfg, family=fam, model=fam.build_model().eval(), learned_lrs=None)


def test_support_statistics_make_each_query_prediction_independent(omni_root: Path, tmp_path: Path) -> None:
    from metanmt.evaluation.omniglot import adapted_logits, with_bn_policy

    run = tiny_run(omni_root, tmp_path)
    assert run.family.model_cfg.bn_policy == "batch"
    ep = run.family.sample_episode(np.random.default_rng(1), split="test")
    sx, sy, qx = ep.support["images"], ep.support["labels"], ep.query["images"]
    noise = torch.rand_like(qx)
    noise[0] = qx[0]  # image 0 kept, every other query image replaced
    perm = torch.cat([torch.tensor([0]), torch.arange(qx.shape[0] - 1, 0, -1)])  # image 0 first, the rest reversed

    support_only = with_bn_policy(run, "running_reset")
    assert support_only.family.model_cfg.bn_policy == "running_reset" and run.family.model_cfg.bn_policy == "batch"
    for name, p in support_only.model.named_parameters():
        assert torch.equal(p, dict(run.model.named_parameters())[name])
    base = adapted_logits(support_only, sx, sy, qx)
    torch.testing.assert_close(adapted_logits(support_only, sx, sy, noise)[0], base[0])
    torch.testing.assert_close(adapted_logits(support_only, sx, sy, qx[perm]), base[perm])
    torch.testing.assert_close(adapted_logits(support_only, sx, sy, qx[:1]), base[:1])  # alone == in the batch

    trans = adapted_logits(run, sx, sy, qx)
    assert not torch.allclose(adapted_logits(run, sx, sy, noise)[0], trans[0], atol=1e-4)  # transductive: it may depend
    with pytest.raises(ValueError, match="bn policy"):
        with_bn_policy(run, "running")


def test_official_runs_under_both_protocols_and_eval_selection(omni_root: Path, tmp_path: Path) -> None:
    from metanmt.evaluation.omniglot import evaluate_official_runs, select_eval_settings

    make_runs(omni_root, n_runs=2, n_classes=3)
    run = tiny_run(omni_root, tmp_path)
    t = evaluate_official_runs(run, None)
    n = evaluate_official_runs(run, None, bn_policy="running_reset")
    assert t["transductive"] and not n["transductive"] and "support set only" in n["protocol"]
    assert len(n["per_run_error_pct"]) == 2 and 0 <= n["official_runs_error_pct"] <= 100
    sel = select_eval_settings(run, steps=[2, 1], lrs=[0.4, 0.1], episodes=3, seed=7)
    assert len(sel["grid"]) == 4 and sel["split"] == "test"
    best = min(g["error_pct"] for g in sel["grid"])
    tied = [g for g in sel["grid"] if g["error_pct"] == best]
    assert sel["chosen"] == min(tied, key=lambda g: (g["inner_steps"], g["inner_lr"]))
    assert select_eval_settings(run, steps=[2, 1], lrs=[0.4, 0.1], episodes=3, seed=7) == sel  # same episodes



@needs_shared
def test_real_official_runs_under_both_protocols(tmp_path: Path) -> None:
    """A few seconds: an untrained 20-way net on the 20 real runs, transductive and not."""
    from metanmt.evaluation.omniglot import evaluate_official_runs

    run = tiny_run(SHARED, tmp_path, ways=20)
    for policy, transductive in (("batch", True), ("running_reset", False)):
        result = evaluate_official_runs(run, None, steps=1, bn_policy=policy)
        assert len(result["per_run_error_pct"]) == 20 and result["transductive"] is transductive
        assert 0.0 <= result["official_runs_error_pct"] <= 100.0
