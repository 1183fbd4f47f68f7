#!/usr/bin/env bash
# The whole test suite: lint (ruff), types (mypy --strict), then pytest on the real kernel.
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
$PY -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
