"""URL look-alikes are refused, naming pagein's flag, and nothing is written (issue 17):
``--store s3:/bucket`` used to push into a new local directory ``./s3:`` and succeed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pagein.cli.main import main
from pagein.errors import SourceError
from pagein.snapshot.open import SOURCE_SCHEMES, open_source
from pagein.snapshot.urls import split_location

LOOK_ALIKES = ["s3:/bucket", "s3:bucket", "dir:/srv/store", "S3:/bucket", "file:relative"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("url", LOOK_ALIKES)
def test_store_look_alike_is_refused_and_nothing_is_written(
        url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mem").write_bytes(os.urandom(300_000))
    for argv in (["store", "push", "mem", "vm1", "--store", url, "-q"],
                 ["store", "ls", "--store", url]):
        code, err = run(capsys, *argv)
        assert code == 1
        assert err.startswith(f"pagein: error: --store: store URL {url!r} looks like a URL "
                              "but is not one"), err
        assert f"./{url} for a local path" in err
    assert sorted(os.listdir(tmp_path)) == ["mem"]  # no ./s3: directory, nothing pushed


def test_store_look_alike_in_the_environment_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PAGEIN_STORE", "s3:/bucket")
    code, err = run(capsys, "store", "ls")
    assert code == 1 and err.startswith("pagein: error: PAGEIN_STORE: store URL 's3:/bucket'")
    assert "write s3://bucket" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("--source", "s3:/bucket/vm1", "looks like a URL but is not one"),
    ("--source", "s3:bucket/vm1", "write s3://bucket/vm1"),
    ("--source", "ftp://host/vm1", "unknown scheme 'ftp'"),
    ("--mem-file", "s3://bucket/vm1", "served with --source URL"),
])
def test_serve_names_its_flag(flag: str, value: str, words: str, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "s.sock"
    code, err = run(capsys, "serve", "--socket", str(sock), flag, value, "--workers", "0")
    assert code == 1
    assert err.startswith(f"pagein: error: {flag}: ") and words in err, err
    assert "mem_file_path" not in err  # Firecracker's field is not pagein's flag
    assert not sock.exists()


def test_serve_missing_file_names_the_flag_not_firecracker(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "serve", "--socket", str(tmp_path / "s"), "--source",
                    str(tmp_path / "nope"))
    assert code == 1 and err.startswith("pagein: error: --source: snapshot memory file ")
    assert "mem_file_path" not in err


def test_split_location() -> None:
    assert split_location("/a/b", SOURCE_SCHEMES, what="x") == (None, "/a/b")
    assert split_location("./s3:/b", SOURCE_SCHEMES, what="x") == (None, "./s3:/b")
    assert split_location("s3://b/n", SOURCE_SCHEMES, what="x") == ("s3", "b/n")
    assert split_location("dir:///srv/n", SOURCE_SCHEMES, what="x") == ("dir", "/srv/n")
    # file:/abs is the short form of a file URL (RFC 8089): accepted, means /abs
    assert split_location("file:/abs/m", SOURCE_SCHEMES, what="x") == ("file", "/abs/m")
    with pytest.raises(SourceError, match=r"write dir:///srv/n, or \./dir:/srv/n"):
        split_location("dir:/srv/n", SOURCE_SCHEMES, what="x")


def test_file_short_url_opens_the_file(tmp_path: Path) -> None:
    (tmp_path / "mem").write_bytes(b"\x01" * 8192)
    with open_source(f"file:{tmp_path / 'mem'}") as src:
        assert src.size == 8192
