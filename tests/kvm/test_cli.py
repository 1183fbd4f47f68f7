"""`pagein vm` as a user runs it: console forwarding, exit status, stats, errors."""

from __future__ import annotations

from _guest import pagein_vm

from pagein.vmm.reference import FunctionReference, scan_line
from pagein.vmm.workloads import parse_workload


def test_run_function_forwards_requests_and_prints_stats() -> None:
    ref = FunctionReference(8 << 20, 9)
    requests = [f"get {ref.key(100)}", "sum 0 5000", "checksum"]
    res = pagein_vm("run", "--mem", "64M", "--vcpus", "2", "--workload", "function",
                    "state=8M", "seed=9", "--stats", stdin="\n".join(requests) + "\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [ref.answer(r) for r in requests]
    assert "[pagein] status 0" in res.stderr and "IoOut:READY" in res.stderr


def test_run_scan_and_exit_status() -> None:
    res = pagein_vm("run", "--mem", "48M", "--workload", "scan", "pattern=stride", "stride=3")
    assert res.returncode == 0, res.stderr
    wa = parse_workload("scan", ["pattern=stride", "stride=3"])
    assert res.stdout.strip() == scan_line(wa.args, 32 << 20)
    res = pagein_vm("run", "--mem", "32M", "--workload", "hello", "status=9")
    assert res.returncode == 9 and res.stdout == "hello from vcpu 0\n"


def test_run_errors_are_one_line() -> None:
    res = pagein_vm("run", "--mem", "32M", "--workload", "function", "state=64M")
    assert res.returncode == 2
    assert res.stderr.strip() == ("pagein: error: guest memory of 32 MiB is too small for "
                                  "workload 'function': it needs at least 88 MiB (raise --mem)")
    res = pagein_vm("run", "--mem", "33M", "--workload", "hello")
    assert res.returncode == 2 and "multiple of 2 MiB" in res.stderr
    res = pagein_vm("run", "--workload", "scan", "pattern=zigzag")
    assert res.returncode == 2 and "pattern='zigzag'" in res.stderr


def test_build_guest_lists_every_workload() -> None:
    res = pagein_vm("build-guest")
    assert res.returncode == 0, res.stderr
    assert {line.split(":")[0] for line in res.stdout.splitlines()} == {
        "function", "hello", "scan"}
