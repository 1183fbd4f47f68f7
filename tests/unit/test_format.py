from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagein.cli._format import parse_size, table
from pagein.errors import SnapshotFormatError
from pagein.snapshot.open import open_source


@pytest.mark.parametrize(("text", "value"), [
    ("4096", 4096), ("64K", 64 << 10), ("256M", 256 << 20), ("1G", 1 << 30),
    ("2MiB", 2 << 20), ("1g", 1 << 30), (" 3 M ", 3 << 20),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1M", "12X", "lots"])
def test_parse_size_rejects_with_example(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"e\.g\. 256M"):
        parse_size(text)


@given(st.integers(0, 1 << 20), st.sampled_from(["", "K", "M", "G"]))
def test_parse_size_oracle(n: int, unit: str) -> None:
    assert parse_size(f"{n}{unit}") == n * {"": 1, "K": 1024, "M": 1 << 20, "G": 1 << 30}[unit]


def test_table_aligns_columns() -> None:
    out = table(["name", "n"], [["a", "1"], ["longer", "22"]]).splitlines()
    assert out[0] == "name     n"
    assert out[1] == "------  --"
    assert out[2] == "a        1"
    assert out[3] == "longer  22"


def test_open_source_unknown_scheme_names_the_choices() -> None:
    with pytest.raises(SnapshotFormatError, match=r"ftp://x.*s3://bucket/name"):
        open_source("ftp://x")


def test_only_the_named_subcommand_module_is_loaded() -> None:
    from pagein.cli.main import _command_modules

    every = _command_modules([])
    assert {"demo", "lab", "report", "serve", "store", "vm"} <= set(every)
    assert _command_modules(["-v", "serve", "--socket", "s", "--mem-file", "vm"]) == ["serve"]
    assert _command_modules(["bogus"]) == every  # argparse then lists every choice
