"""Messages that name the real cause (issue 17): a working set given to ``pagein report``,
missing S3 credentials, a handler that exits while it starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from pagein.cli.main import main
from pagein.errors import HandlerError
from pagein.serve.handler import HandlerProcess
from pagein.snapshot import workingset
from pagein.snapshot.raw import RawFileSource


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_report_on_a_working_set_says_what_to_pass(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    mem = tmp_path / "mem"
    mem.write_bytes(os.urandom(64 * 4096))
    ws = tmp_path / "vm.ws"
    with RawFileSource(str(mem)) as src:
        workingset.write(str(ws), src, [0, 4096, 40960])
    (tmp_path / "vm.ws.trace.json").write_text("{}")
    code, err = run(capsys, "report", str(ws), "--out", str(tmp_path / "x.png"))
    assert code == 1
    assert err.startswith(f"pagein: error: {ws} is a working set (written by --record), not "
                          "a trace: pass its trace"), err
    assert f"({ws}.trace.json is there)" in err
    assert "codec" not in err
    assert not (tmp_path / "x.png").exists()


def test_report_on_binary_garbage_says_it_is_not_a_trace(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\xff\xfe\x00garbage")
    code, err = run(capsys, "report", str(junk), "--out", str(tmp_path / "x.png"))
    assert code == 1 and err.startswith(f"pagein: error: {junk} is not a pagein trace")


def test_missing_s3_credentials_are_not_an_unreachable_network(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    monkeypatch.setenv("HOME", str(tmp_path))
    code, err = run(capsys, "store", "ls", "--store", "s3://bucket",
                    "--endpoint-url", "http://127.0.0.1:9")
    assert code == 1
    assert err.startswith("pagein: error: no AWS credentials to sign "), err
    for word in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "--profile"):
        assert word in err
    assert "unreachable" not in err
    code, err = run(capsys, "store", "ls", "--store", "s3://bucket", "--profile", "ghost",
                    "--endpoint-url", "http://127.0.0.1:9")
    assert code == 1 and err.startswith("pagein: error: --store: AWS profile 'ghost' is not "
                                        "configured"), err


def test_a_handler_that_exits_while_starting_says_so(tmp_path: Path) -> None:
    """It used to say "did not start within 30 s" after a fraction of a second."""
    work = tempfile.mkdtemp(dir=tmp_path)
    opts = HandlerProcess.options_for_one_vm(str(tmp_path / "missing.mem"), work)
    with pytest.raises(HandlerError) as info:
        HandlerProcess.start(opts, work, timeout=60)
    msg = str(info.value)
    assert "exited with status 1 during start" in msg, msg
    assert "does not exist" in msg and "within" not in msg
