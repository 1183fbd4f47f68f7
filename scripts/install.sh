#!/usr/bin/env bash
# Install everything pagein needs on a fresh Debian 12 machine (run as root):
# Debian packages, a virtualenv in .venv with pagein and its test tools, the guest workloads.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for cmd in gcc make; do command -v "$cmd" >/dev/null || need_apt+=("$cmd"); done
[ -e /usr/include/linux/userfaultfd.h ] || need_apt+=(linux-libc-dev)
[ -e /usr/include/stdio.h ] || need_apt+=(libc6-dev)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# The C fault core (pagein.serve._core) needs the headers of the Python the venv uses;
# without them pip still installs pagein, with the pure-Python engine only.
py_include=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -e "$py_include/Python.h" ] || need_apt+=(python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
echo "== pip install -e .[test,plot]"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test,plot]'

if .venv/bin/pagein vm --help >/dev/null 2>&1; then
  echo "== building the guest workloads"
  .venv/bin/pagein vm build-guest
fi
if .venv/bin/python -c 'import pagein.serve._core' 2>/dev/null; then
  echo "== C fault core built"
else
  echo "== WARNING: the C fault core did not build; serving uses the Python engine"
fi
echo "== installed: $(.venv/bin/pagein --version)"
