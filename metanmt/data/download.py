"""Download the official Omniglot zips from the omniglot GitHub repository (``metanmt data omniglot``).

    download_omniglot("data/omniglot")                            # the full sets + minimal sets + runs
    download_omniglot("data/omniglot", names=["images_background_small1", "all_runs"])

Every file is fetched to ``<name>.zip.part`` with a tqdm progress bar, then verified before it is
renamed into place, so an interrupted download never looks complete:

* **MD5 checksum.** ``images_background`` and ``images_evaluation``: the MD5s torchvision's
  ``Omniglot`` dataset has verified these exact URLs against for years. ``images_background_small1``,
  ``images_background_small2`` and ``all_runs``: the MD5s of the copies this project's CI data
  folder carries (``shared/data/omniglot``, taken from the same repository: members dated
  2015-10-20/21). No download was possible while writing this, so these three could not be checked
  against a fresh download; if upstream ever re-zips a file, pass ``check_md5=False`` (the layout
  check below still runs) and report it.
* **Zip integrity** (``ZipFile.testzip``: the CRC of every member) and **the expected layout**: an
  image set must hold ``<name>/<Alphabet>/<character>/<image>.png`` members and an ``all_runs``
  zip the 20 ``runNN/class_labels.txt`` files.

Files already present and valid are not downloaded again. Offline, a :class:`UserError` says which
URLs to fetch by hand and where to put them.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional
from urllib.error import URLError
from urllib.request import Request, urlopen

from tqdm.auto import tqdm

from ..errors import DataError, UserError

__all__ = ["OMNIGLOT_FILES", "RemoteFile", "download_omniglot", "verify_omniglot_zip"]

BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python"


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: where it is, its MD5 (None: not checked) and what it must contain."""

    url: str
    md5: Optional[str]
    kind: str  # "images" (an image set) or "runs" (the official one-shot runs)


OMNIGLOT_FILES: dict[str, RemoteFile] = {
    "images_background": RemoteFile(f"{BASE_URL}/images_background.zip", "68d2efa1b9178cc56df9314c21c6e718", "images"),
    "images_evaluation": RemoteFile(f"{BASE_URL}/images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811", "images"),
    "images_background_small1": RemoteFile(
        f"{BASE_URL}/images_background_small1.zip", "e704a628b5459e08445c13499850abc4", "images"
    ),
    "images_background_small2": RemoteFile(
        f"{BASE_URL}/images_background_small2.zip", "b75a71a51d3b13f821f212756fe481fd", "images"
    ),
    "all_runs": RemoteFile(
        f"{BASE_URL}/one-shot-classification/all_runs.zip", "e8996daecdf12afeeb4a53a179f06b19", "runs"
    ),
}


def verify_omniglot_zip(path: Path, name: str, spec: RemoteFile, check_md5: bool = True) -> None:
    """Raise :class:`DataError` unless ``path`` is the intact zip ``name`` described by ``spec``."""
    if check_md5 and spec.md5 is not None:
        digest = hashlib.md5()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != spec.md5:
            raise DataError(
                f"{path}: MD5 {digest.hexdigest()} differs from the expected {spec.md5} for {spec.url}; "
                "delete it and download again (or pass check_md5=False if upstream changed the file)"
            )
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            members = [PurePosixPath(n) for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable zip file ({exc})") from None
    if bad is not None:
        raise DataError(f"{path}: member {bad} is corrupt (CRC mismatch); delete the file and download again")
    if spec.kind == "images":
        ok = any(len(m.parts) == 4 and m.parts[0] == name and m.suffix == ".png" for m in members)
        expected = f"{name}/<Alphabet>/<character>/<image>.png"
    else:
        runs = {m.parts[-2] for m in members if m.name == "class_labels.txt" and len(m.parts) >= 2}
        ok = all(f"run{i:02d}" in runs for i in range(1, 21))
        expected = "run01..run20/class_labels.txt"
    if not ok:
        raise DataError(f"{path}: does not hold the expected members ({expected})")


def download_omniglot(
    to_dir: str | Path,
    names: Optional[Iterable[str]] = None,
    check_md5: bool = True,
    timeout: float = 60.0,
    files: Optional[dict[str, RemoteFile]] = None,
) -> list[Path]:
    """Fetch the official zips into ``to_dir`` (created if needed); returns their paths.

    ``names`` picks among :data:`OMNIGLOT_FILES` (default: all five); ``files`` replaces that table
    (for mirrors). Already-present valid files are kept as they are.

        download_omniglot("data/omniglot", names=["images_background_small1", "all_runs"])
        # [PosixPath('data/omniglot/images_background_small1.zip'), PosixPath('data/omniglot/all_runs.zip')]
    """
    table = OMNIGLOT_FILES if files is None else files
    chosen = list(table) if names is None else list(names)
    unknown = [n for n in chosen if n not in table]
    if unknown:
        raise UserError(f"unknown Omniglot file(s) {', '.join(unknown)}; available: {', '.join(table)}")
    to_dir = Path(to_dir).expanduser()
    try:
        to_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {to_dir}: {exc}") from None
    out = []
    for name in chosen:
        spec = table[name]
        target = to_dir / f"{name}.zip"
        if target.is_file():
            try:
                verify_omniglot_zip(target, name, spec, check_md5)
                out.append(target)
                continue
            except DataError:
                pass  # a damaged or foreign file: fetch it again
        _fetch(spec.url, target, to_dir, chosen, table, timeout)
        part = target.with_name(target.name + ".part")
        try:
            verify_omniglot_zip(part, name, spec, check_md5)
        except DataError:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, target)
        out.append(target)
    return out


def _fetch(
    url: str, target: Path, to_dir: Path, names: list[str], table: dict[str, RemoteFile], timeout: float
) -> None:
    part = target.with_name(target.name + ".part")
    try:
        with urlopen(Request(url, headers={"User-Agent": "metanmt"}), timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(part, "wb") as fh, tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name
            ) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    fh.write(chunk)
                    bar.update(len(chunk))
    except (URLError, OSError, TimeoutError) as exc:
        part.unlink(missing_ok=True)
        manual = "\n".join(f"  {table[n].url} -> {to_dir / (n + '.zip')}" for n in names)
        raise UserError(
            f"could not download {url} ({getattr(exc, 'reason', exc)}). If this machine is offline, fetch the "
            f"files elsewhere and put them here (zips as they are, no need to unzip):\n{manual}\n"
            f"then point the config at that folder with --set data.root={to_dir}"
        ) from None
