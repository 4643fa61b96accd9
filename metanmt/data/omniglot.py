"""Omniglot images: the standard layout, read from a folder or straight from the official zip files.

The Omniglot data set (Lake, Salakhutdinov & Tenenbaum, Science 2015) ships as zip files whose
members follow one layout::

    images_background/<Alphabet>/<characterNN>/<id>_<drawer>.png        (105x105, 1-bit PNG)

This module turns such a zip or folder into one in-memory tensor and reads the 20 official
within-alphabet one-shot runs (``all_runs.zip``)::

    images = load_image_set("data/omniglot/images_background_small1.zip", image_size=28)
    images.images.shape            # (2720, 28, 28) uint8, strokes 255 and background 0
    images.characters[:2]          # ['Balinese/character01', 'Balinese/character02']
    images.indices_of(0)           # the 20 image rows of Balinese/character01

    result = score_official_runs("data/omniglot/all_runs.zip", adapt_and_predict)
    result["official_runs_error_pct"]   # overall error %, the number Lake et al. 2015 report

Preprocessing (shared by the image sets and the official runs, so both look alike to a model):
the 1-bit image is read as 8-bit grey, **inverted so strokes are 1 and the background 0** (the raw
PNGs have black strokes on white; MAML's reference code inverts the same way, and a zero
background keeps zero-padding in the conv layers neutral), then resized with Lanczos filtering
(antialiased, so thin strokes survive the 105 -> 28 reduction as grey levels). Images are stored
as ``uint8`` (0..255) and turned into ``float32`` in [0, 1] when an episode is drawn.

Loaded sets are kept in memory (keyed by the resolved path, its size and modification time, and
the image size), so every family, evaluation and test in one process decodes each file once.
With ``cache_dir`` they are also written as ``.npz`` files keyed the same way, which makes a
later process skip PNG decoding entirely (the full background set takes a few seconds to decode).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

__all__ = [
    "IMAGE_SET_NAMES",
    "ImageSet",
    "OfficialRun",
    "load_image_set",
    "preprocess_png",
    "read_official_runs",
    "resolve_source",
    "score_official_runs",
    "to_float",
    "clear_memory_cache",
]

# The official image sets, by the short names the task suites use.
IMAGE_SET_NAMES = ("background", "evaluation", "background_small1", "background_small2")

LAYOUT_HINT = "<set>/<Alphabet>/<characterNN>/<id>_<drawer>.png (e.g. images_background/Greek/character01/0394_01.png)"
RUNS_HINT = "runNN/class_labels.txt, runNN/training/classNN.png, runNN/test/itemNN.png"


# -- preprocessing --------------------------------------------------------------------------------
def preprocess_png(data: bytes, image_size: int, where: str) -> np.ndarray:
    """Decode one PNG to an ``(image_size, image_size)`` uint8 array with strokes 255, background 0.

    ``where`` names the file in the :class:`DataError` raised when the bytes are not an image.

        preprocess_png(Path("0108_01.png").read_bytes(), 28, "0108_01.png").shape  # (28, 28)
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            grey = img.convert("L")  # mode "1" (the Omniglot PNGs) becomes 0/255
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: not a readable image ({exc})") from None
    inverted = grey.point(lambda v: 255 - v)  # black strokes on white -> strokes 255 on 0
    if inverted.size != (image_size, image_size):
        inverted = inverted.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(inverted, dtype=np.uint8)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., H, W) -> float32 in [0, 1] with a channel axis: (..., 1, H, W)."""
    return images.to(torch.float32).div_(255.0).unsqueeze(-3)


# -- reading a zip or a folder ----------------------------------------------------------------------
class _Source:
    """Uniform access to the files of a zip archive or a folder, by POSIX relative path."""

    def __init__(self, path: Path):
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"{path}: not a readable zip file ({exc})") from None
        elif not path.is_dir():
            raise DataError(f"{path}: no such file or folder")

    def __enter__(self) -> "_Source":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._zip is not None:
            self._zip.close()

    def files(self) -> Iterator[PurePosixPath]:
        """Every regular file, skipping macOS resource forks and hidden files."""
        if self._zip is not None:
            names: Iterator[str] = (i.filename for i in self._zip.infolist() if not i.is_dir())
        else:
            names = (
                os.path.relpath(os.path.join(d, f), self.path).replace(os.sep, "/")
                for d, _, fs in os.walk(self.path)
                for f in fs
            )
        for name in names:
            rel = PurePosixPath(name)
            if any(part.startswith(".") or part == "__MACOSX" for part in rel.parts):
                continue
            yield rel

    def read(self, rel: PurePosixPath) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(str(rel))
            return (self.path / rel).read_bytes()
        except (KeyError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise DataError(f"{self.where(rel)}: cannot be read ({exc})") from None

    def where(self, rel: PurePosixPath) -> str:
        """A path a user can find: ``archive.zip:member`` or the file path."""
        return f"{self.path}:{rel}" if self._zip is not None else str(self.path / rel)


def resolve_source(root: str | Path | None, name: str) -> Path:
    """Find an image set: a short name (``background_small1``) or a path, relative to ``root``.

    A short name looks for the folder ``images_<name>/`` first, then ``images_<name>.zip``; any
    other name is a zip or folder path (absolute, or relative to ``root``).

        resolve_source("../shared/data/omniglot", "background_small1")
        # PosixPath('../shared/data/omniglot/images_background_small1.zip')
    """
    base = Path(root) if root is not None else Path.cwd()
    if name in IMAGE_SET_NAMES:
        candidates = [base / f"images_{name}", base / f"images_{name}.zip"]
    else:
        path = Path(name).expanduser()
        candidates = [path if path.is_absolute() else base / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    hint = (
        " (run `metanmt data omniglot --to DIR` to download the official zips, or set data.root)"
        if name in IMAGE_SET_NAMES
        else ""
    )
    raise DataError(f"Omniglot image set {name!r} not found: looked for {', '.join(map(str, candidates))}{hint}")


# -- image sets ---------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """All images of one Omniglot set (zip or folder) in one tensor.

    ``images[i]`` is an (H, W) uint8 image (strokes 255) of character ``characters[character[i]]``;
    characters are named ``Alphabet/characterNN`` and sorted, images sorted by file name within a
    character, so the order does not depend on the zip or the file system.
    """

    source: str
    images: torch.Tensor  # (M, H, W) uint8
    character: torch.Tensor  # (M,) int64: index into `characters`
    characters: list[str]
    files: list[str]  # relative path of each image, for messages

    def __post_init__(self) -> None:
        order = np.argsort(self.character.numpy(), kind="stable")
        if not np.array_equal(order, np.arange(len(order))):
            raise ValueError("ImageSet images must be grouped by character")
        counts = np.bincount(self.character.numpy(), minlength=len(self.characters))
        self._offsets = np.concatenate([[0], np.cumsum(counts)])

    @property
    def alphabets(self) -> list[str]:
        """Alphabet names, sorted."""
        return sorted({c.split("/")[0] for c in self.characters})

    def indices_of(self, char: int) -> np.ndarray:
        """Row numbers in :attr:`images` of character number ``char``."""
        return np.arange(self._offsets[char], self._offsets[char + 1])

    def count(self, char: int) -> int:
        return int(self._offsets[char + 1] - self._offsets[char])


_MEMORY: dict[tuple[Any, ...], ImageSet] = {}
_LOCK = threading.Lock()


def clear_memory_cache() -> None:
    """Forget every loaded set (tests use it to check the on-disk cache)."""
    with _LOCK:
        _MEMORY.clear()


def _fingerprint(path: Path) -> tuple[str, int, int]:
    """What identifies the content of a zip or folder cheaply: its path, total size and newest mtime."""
    resolved = path.resolve()
    if resolved.is_file():
        st = resolved.stat()
        return str(resolved), st.st_size, st.st_mtime_ns
    size = 0
    mtime = resolved.stat().st_mtime_ns
    for d, _, fs in os.walk(resolved):
        mtime = max(mtime, os.stat(d).st_mtime_ns)
        for f in fs:
            st = os.stat(os.path.join(d, f))
            size += st.st_size
            mtime = max(mtime, st.st_mtime_ns)
    return str(resolved), size, mtime


def load_image_set(path: str | Path, image_size: int = 28, cache_dir: str | Path | None = None) -> ImageSet:
    """Read every ``<Alphabet>/<character>/<image>.png`` under a zip or folder into an :class:`ImageSet`.

    The images may sit under one common prefix folder (``images_background/`` inside the official
    zips, or a folder holding the unzipped set); all must be at the same depth. Raises
    :class:`DataError` naming the path for a missing path, a layout that is not Omniglot's, or an
    image that cannot be decoded.

        s = load_image_set("images_background_small1.zip")          # decoded once per process
        s2 = load_image_set("images_background_small1.zip")         # same object, from memory
        load_image_set("images_background.zip", cache_dir="~/.cache/metanmt")  # also an .npz cache
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder (expected an Omniglot zip or folder laid out as {LAYOUT_HINT})"
        )
    if image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    key = (*_fingerprint(path), image_size)
    with _LOCK:
        if key in _MEMORY:
            return _MEMORY[key]
    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir).expanduser() / f"omniglot-{path.stem}-{image_size}px-{digest}.npz"
    loaded = _read_npz(cache_file, str(path)) if cache_file is not None and cache_file.is_file() else None
    if loaded is None:
        loaded = _decode(path, image_size)
        if cache_file is not None:
            _write_npz(cache_file, loaded)
    with _LOCK:
        return _MEMORY.setdefault(key, loaded)


def _decode(path: Path, image_size: int) -> ImageSet:
    with _Source(path) as src:
        pngs = [f for f in src.files() if f.suffix.lower() == ".png"]
        if not pngs:
            raise DataError(f"{path}: no PNG images found; expected the Omniglot layout {LAYOUT_HINT}")
        depths = {len(p.parts) for p in pngs}
        if len(depths) > 1:
            shallow = min(pngs, key=lambda p: len(p.parts))
            deep = max(pngs, key=lambda p: len(p.parts))
            raise DataError(
                f"{path}: images are not laid out as {LAYOUT_HINT}; "
                f"{src.where(shallow)} and {src.where(deep)} are at different depths"
            )
        if min(depths) < 3:
            raise DataError(
                f"{path}: image {src.where(pngs[0])} is not inside an <Alphabet>/<character>/ folder; "
                f"expected {LAYOUT_HINT}"
            )
        prefixes = sorted({p.parts[:-3] for p in pngs})
        if len(prefixes) > 1:
            shown = ", ".join("/".join(p) or "." for p in prefixes[:4])
            raise DataError(
                f"{path}: holds several image sets ({shown}); "
                f"point at one of them (a zip or a folder laid out as {LAYOUT_HINT})"
            )
        pngs.sort(key=lambda p: (p.parts[-3], p.parts[-2], p.name))
        characters: list[str] = []
        char_of: list[int] = []
        for p in pngs:
            name = f"{p.parts[-3]}/{p.parts[-2]}"
            if not characters or characters[-1] != name:
                characters.append(name)
            char_of.append(len(characters) - 1)
        images = np.empty((len(pngs), image_size, image_size), dtype=np.uint8)
        for i, p in enumerate(pngs):
            images[i] = preprocess_png(src.read(p), image_size, src.where(p))
    return ImageSet(
        source=str(path),
        images=torch.from_numpy(images),
        character=torch.tensor(char_of, dtype=torch.int64),
        characters=characters,
        files=[str(p) for p in pngs],
    )


def _read_npz(cache_file: Path, source: str) -> ImageSet | None:
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            return ImageSet(
                source=source,
                images=torch.from_numpy(data["images"].copy()),
                character=torch.from_numpy(data["character"].astype(np.int64)),
                characters=[str(c) for c in data["characters"]],
                files=[str(f) for f in data["files"]],
            )
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # a stale or truncated cache is rebuilt from the source, not trusted


def _write_npz(cache_file: Path, s: ImageSet) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # write then rename, so a killed process never leaves a truncated cache under the final name
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                images=s.images.numpy(),
                character=s.character.numpy(),
                characters=np.array(s.characters),
                files=np.array(s.files),
            )
        os.replace(tmp, cache_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the official one-shot runs ----------------------------------------------------------------------
@dataclass
class OfficialRun:
    """One of Lake et al.'s 20-way 1-shot runs: 20 training images (one per class) and 20 test items.

    ``support_y[i]`` is the class of ``support_x[i]``: classes are numbered by the sorted training
    file names (``class01.png`` -> 0); ``query_y`` comes from ``class_labels.txt``.
    """

    name: str
    support_x: torch.Tensor  # (C, 1, H, W) float32 in [0, 1]
    support_y: torch.Tensor  # (C,) int64
    query_x: torch.Tensor  # (T, 1, H, W)
    query_y: torch.Tensor  # (T,) int64
    query_files: list[str]


_RUN_DIR = re.compile(r"^run\d+$")


def read_official_runs(path: str | Path, image_size: int = 28) -> list[OfficialRun]:
    """Read ``all_runs.zip`` (or its unzipped folder): every ``runNN/`` with its ``class_labels.txt``.

    Each line of ``class_labels.txt`` is ``test/itemNN.png training/classMM.png``; the official
    file writes both paths with the run folder in front (``run01/test/item01.png ...``), and both
    forms are accepted.

        runs = read_official_runs("../shared/data/omniglot/all_runs.zip")
        len(runs), runs[0].support_x.shape    # 20, (20, 1, 28, 28)
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected all_runs.zip or a folder of {RUNS_HINT})")
    with _Source(path) as src:
        files = set(src.files())
        label_files = sorted(
            (f for f in files if f.name == "class_labels.txt" and len(f.parts) >= 2 and _RUN_DIR.match(f.parts[-2])),
            key=lambda f: f.parts[-2],
        )
        if not label_files:
            raise DataError(
                f"{path}: no runNN/class_labels.txt found; expected the official runs laid out as {RUNS_HINT}"
            )
        runs = []
        for label_file in label_files:
            run_dir = label_file.parent
            runs.append(_read_run(src, files, run_dir, label_file, image_size))
    return runs


def _read_run(
    src: _Source, files: set[PurePosixPath], run_dir: PurePosixPath, label_file: PurePosixPath, image_size: int
) -> OfficialRun:
    training = sorted(f for f in files if f.parent == run_dir / "training" and f.suffix.lower() == ".png")
    if not training:
        raise DataError(f"{src.where(run_dir / 'training')}: no training images; expected {RUNS_HINT}")
    class_of = {f: i for i, f in enumerate(training)}
    text = src.read(label_file).decode("utf-8", errors="replace")
    query_files: list[PurePosixPath] = []
    query_labels: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DataError(
                f"{src.where(label_file)}:{lineno}: expected 'test/itemNN.png training/classNN.png', "
                f"got {line.strip()!r}"
            )
        item, cls = (_in_run(run_dir, f) for f in fields)
        if item not in files:
            raise DataError(f"{src.where(label_file)}:{lineno}: test image {src.where(item)} does not exist")
        if cls not in class_of:
            raise DataError(f"{src.where(label_file)}:{lineno}: training image {src.where(cls)} does not exist")
        query_files.append(item)
        query_labels.append(class_of[cls])
    if not query_files:
        raise DataError(f"{src.where(label_file)}: lists no test images")

    def stack(paths: Sequence[PurePosixPath]) -> torch.Tensor:
        arr = np.stack([preprocess_png(src.read(p), image_size, src.where(p)) for p in paths])
        return to_float(torch.from_numpy(arr))

    return OfficialRun(
        name=run_dir.name,
        support_x=stack(training),
        support_y=torch.arange(len(training), dtype=torch.int64),
        query_x=stack(query_files),
        query_y=torch.tensor(query_labels, dtype=torch.int64),
        query_files=[str(f) for f in query_files],
    )


def _in_run(run_dir: PurePosixPath, field: str) -> PurePosixPath:
    """``run01/test/item01.png`` or ``test/item01.png`` -> the member path inside the source."""
    rel = PurePosixPath(field.replace("\\", "/"))
    if rel.parts and rel.parts[0] == run_dir.name:
        rel = PurePosixPath(*rel.parts[1:])
    return run_dir / rel


AdaptAndPredict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]


def score_official_runs(
    runs_path: str | Path, adapt_and_predict: AdaptAndPredict, image_size: int = 28
) -> dict[str, Any]:
    """Error % of a few-shot learner on each official run and overall (Lake et al. 2015's benchmark).

    ``adapt_and_predict(support_x, support_y, query_x)`` gets one run's 20 training images
    ``(20, 1, H, W)`` float32 in [0, 1] with labels 0..19, and its 20 test images; it returns the
    predicted label of each test image (a tensor, array or list of ints). The overall error is the
    mean of the per-run errors (every run has 20 test items, so it is also the pooled error).

        def nearest_pixel(sx, sy, qx):
            return sy[torch.cdist(qx.flatten(1), sx.flatten(1)).argmin(1)]
        score_official_runs("all_runs.zip", nearest_pixel)
        # {'official_runs_error_pct': ..., 'per_run_error_pct': [... 20 values]}
    """
    runs = read_official_runs(runs_path, image_size=image_size)
    per_run = []
    for run in runs:
        predicted = adapt_and_predict(run.support_x.clone(), run.support_y.clone(), run.query_x.clone())
        predicted = torch.as_tensor(np.asarray(predicted.detach().cpu() if torch.is_tensor(predicted) else predicted))
        if predicted.shape != run.query_y.shape:
            raise ValueError(
                f"adapt_and_predict returned {tuple(predicted.shape)} predictions for {run.name}; "
                f"expected {tuple(run.query_y.shape)}"
            )
        per_run.append(100.0 * float((predicted.to(torch.int64) != run.query_y).to(torch.float64).mean()))
    return {"official_runs_error_pct": float(np.mean(per_run)), "per_run_error_pct": per_run}
