#!/usr/bin/env bash
# The whole test suite: lint (ruff), types (mypy --strict), then pytest on the real kernel,
# then the serving tests a second time on the Python fault engine.
# Under CI=true a skipped test is a failure (CI machines have every feature), and
# "no tests ran" is a failure too.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run scripts/install.sh first" >&2; exit 2; }

echo "== ruff"
$PY -m ruff check src tests benchmarks || exit 1
echo "== mypy --strict"
$PY -m mypy || exit 1
echo "== pytest"
$PY -m pytest --durations=25 "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
[ $rc -eq 0 ] || exit $rc
[ $# -eq 0 ] || exit 0   # a chosen selection runs once

# Both fault engines pass the same tests: every serving test again on the Python engine
# (the default engine of pagein serve and of every handler a restore spawns).
echo "== pytest: the serving tests again with PAGEIN_ENGINE=python"
PAGEIN_ENGINE=python $PY -m pytest -q --durations=10 tests/kernel/test_serve_*.py \
  tests/kernel/test_workingset_serve.py tests/kernel/test_fc_client.py \
  tests/kvm/test_restore.py tests/kvm/test_restore_cli.py tests/kvm/test_restore_trust.py tests/kvm/test_workingset_vm.py \
  tests/kvm/test_restore_identity.py \
  tests/kvm/test_restore_share.py tests/kvm/test_restore_peer.py tests/kvm/test_hugetlb.py \
  tests/kvm/test_restore_collapse.py \
  tests/s3/test_s3_serve.py
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
