#!/usr/bin/env bash
# A brief DSpark draft for Gemma-3-270M-it (the packaged Q4_K_M GGUF, target name
# gemma3-270m) through the normal pipeline, on a CPU: the target answers the training
# prompts itself, the answers are tokenized with the Gemma-3 chat template, the target's
# features are cached, the draft is trained and evaluated. Every stage is resumable:
# rerun the script (or one stage) after an interruption and it continues where it stopped.
#
#   bash scripts/train_gemma3_draft.sh [regenerate|tokenize|features|train|eval|all]
#
# Sizes are for a shared 2-core CPU (see configs/dspark/dspark_gemma3_270m.py); on a real
# machine raise REGEN_SAMPLES, MAX_NEW_TOKENS and the config's epochs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/gemma3}
REGEN_SAMPLES=${REGEN_SAMPLES:-160}      # per prompt file
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-192}
LAYERS=1,5,9,13,16                       # = configs/_targets.py gemma3_270m target_layer_ids
stage=${1:-all}

run() { echo "+ $*" >&2; "$@"; }

if [[ $stage == regenerate || $stage == all ]]; then
  # Gemma-3's recommended sampling: temperature 1.0, top-k 64, top-p 0.95.
  run "$PY" -m deepspec_jax.data.regenerate --target=gemma3-270m \
    --prompts=../shared/train_prompts/gsm8k_train.jsonl,../shared/train_prompts/self_instruct_seed.jsonl \
    --output="$DATA/answers.jsonl" --max_samples="$REGEN_SAMPLES" --batch_size=32 \
    --max_new_tokens="$MAX_NEW_TOKENS" --temperature=1.0 --top_k=64 --top_p=0.95
fi
if [[ $stage == tokenize || $stage == all ]]; then
  run "$PY" -m deepspec_jax.data.tokenize --input="$DATA/answers.jsonl" --output="$DATA/tokens" \
    --target=gemma3-270m --chat_template=gemma --max_length=256 --overwrite
fi
if [[ $stage == features || $stage == all ]]; then
  run "$PY" -m deepspec_jax.data.build_features --tokens="$DATA/tokens" --target=gemma3-270m \
    --layer_ids=$LAYERS --output="$DATA/features" --batch_size=8 --dtype=bfloat16
fi
if [[ $stage == train || $stage == all ]]; then
  run "$PY" -m deepspec_jax.train --config=configs/dspark/dspark_gemma3_270m.py \
    --config.data.feature_cache="$DATA/features" ${TRAIN_ARGS:-}
fi
if [[ $stage == eval || $stage == all ]]; then
  for t in 0 1; do
    run "$PY" -m deepspec_jax.eval --target=gemma3-270m --draft=runs/dspark_gemma3_270m/final \
      --datasets=gsm8k,mt-bench --max_samples=${EVAL_SAMPLES:-2} --max_new_tokens=64 \
      --temperature=$t --output_dir="runs/eval/dspark_gemma3_270m_T$t" ${EVAL_ARGS:-}
  done
fi
