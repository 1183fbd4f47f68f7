"""``pagein lab``: the listing, the table, and the JSON view, as a user runs them."""

from __future__ import annotations

import json

import pytest

from pagein.cli.lab import parse_size
from pagein.cli.main import main
from pagein.lab import EXPERIMENTS

pytestmark = pytest.mark.kernel


def test_listing_names_every_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab"]) == 0
    out = capsys.readouterr().out
    for e in EXPERIMENTS:
        assert e.name in out and e.title in out


def test_run_prints_explanation_and_aligned_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "run", "demand-paging", "--size", "4M"]) == 0
    out = capsys.readouterr().out
    exp = EXPERIMENTS[0]
    assert exp.explanation[0] in out and exp.explanation[1] in out
    header = next(line for line in out.splitlines() if line.strip().startswith("step"))
    row = next(line for line in out.splitlines() if "read one byte of every page" in line)
    # Numbers are right-aligned under their header: 4 MiB is 1024 pages, each faulting once
    # (plus the odd fault the interpreter takes).
    end = header.index("minflt") + len("minflt")
    assert row[end] == " " and row[end - 1] != " "
    assert 1024 <= int(row[:end].split()[-1]) < 1024 + 64


def test_run_json_carries_rows_and_facts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "run", "demand-paging", "--size", "4M", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == "demand-paging"
    assert doc["result"]["pfns_after_read"] == 1
    assert [r["step"] for r in doc["result"]["rows"]][1] == "read one byte of every page"


@pytest.mark.parametrize(("text", "size"), [("64M", 64 << 20), ("512K", 512 << 10),
                                            ("65536", 64 << 10), ("1G", 1 << 30),
                                            ("8MiB", 8 << 20)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "1000", "0", "64"])
def test_parse_size_rejects(text: str) -> None:
    import argparse

    if text == "1000":
        text = "1001K"
    with pytest.raises(argparse.ArgumentTypeError, match="size"):
        parse_size(text)


def test_run_refuses_a_size_too_small_to_show_anything(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "run", "zero-pages", "--size", "64K"]) == 2
    assert "--size must be at least 4 MiB" in capsys.readouterr().err
