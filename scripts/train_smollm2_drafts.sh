#!/usr/bin/env bash
# The project's proof run: train DSpark, DFlash and Eagle3 drafts for the embedded
# SmolLM2-135M-Instruct target on a CPU, evaluate them, and (optionally) ship the
# DSpark draft as the eval's embedded default. Every stage is resumable: rerun the
# script (or one stage) after an interruption and it continues where it stopped.
#
#   bash scripts/train_smollm2_drafts.sh [regenerate|tokenize|features|train|eval|ship|all|piece|finetune]
#
# Sizes are chosen for a 2-core CPU (see the configs' docstrings); on a real machine
# raise REGEN_SAMPLES and the configs' steps. The shipped DSpark continues the previous
# ones: fine-tuned from the shipped draft on more data each time (docs/BENCHMARKS.md,
# "SmolLM2 proof run", v3-v7 commands). Since v6 the data is kept in pieces, one per
# session of regeneration, each with its own answers, tokens and feature cache, so a new
# piece rebuilds nothing:
#
#   PIECE=s23 PIECE_PROMPTS=a.jsonl,b.jsonl bash scripts/train_smollm2_drafts.sh piece
#   PIECES=". s22 s23" RUN=runs/dspark_v7 bash scripts/train_smollm2_drafts.sh finetune
#
# (a piece is a directory under $DATA, "." being $DATA itself; its prompt files are taken
# in turn, so a regeneration stopped early still holds a mix; rerun to resume.
# PIECE_TEMPERATURE=0 regenerates greedily, the answers a T=0 eval sees: piece s24.)
# Prompt sets written for the project: deepspec_jax.data.code_prompts (stubs with doctests,
# plus --word_problems), deepspec_jax.data.code_families (crossed stubs, piece s25) and
# deepspec_jax.data.chat_prompts (kinds, then two crossed sets; s25 took the second's
# 1,652 prompts, the file's last lines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/smollm2}
REGEN_SAMPLES=${REGEN_SAMPLES:-1500}     # per prompt file
LAYERS=1,8,15,22,28                      # = configs/_targets.py smollm2_135m target_layer_ids
stage=${1:-all}

run() { echo "+ $*" >&2; "$@"; }

if [[ $stage == regenerate || $stage == all ]]; then
  # Code prompts written for the project (deepspec_jax/data/code_prompts.py; the shared
  # prompt files hold math and chat only). SmolLM2's recommended sampling: T 0.2, top-p 0.9.
  run "$PY" -m deepspec_jax.data.code_prompts --output="$DATA/code_prompts.jsonl"
  run "$PY" -m deepspec_jax.data.regenerate \
    --prompts=../shared/train_prompts/gsm8k_train.jsonl,../shared/train_prompts/self_instruct_seed.jsonl,"$DATA/code_prompts.jsonl" \
    --output="$DATA/answers.jsonl" --max_samples="$REGEN_SAMPLES" --batch_size=32 \
    --max_new_tokens=256 --temperature=0.2 --top_p=0.9
fi
if [[ $stage == tokenize || $stage == all ]]; then
  run "$PY" -m deepspec_jax.data.tokenize --input="$DATA/answers.jsonl" --output="$DATA/tokens" \
    --target=smollm2-135m --max_length=512 --overwrite
fi
if [[ $stage == features || $stage == all ]]; then
  run "$PY" -m deepspec_jax.data.build_features --tokens="$DATA/tokens" --target=smollm2-135m \
    --layer_ids=$LAYERS --output="$DATA/features" --batch_size=8 --dtype=bfloat16
fi
if [[ $stage == train || $stage == all ]]; then
  for arch in dspark dflash eagle3; do
    run "$PY" -m deepspec_jax.train --config="configs/$arch/${arch}_smollm2_135m.py" \
      --config.data.feature_cache="$DATA/features" ${TRAIN_ARGS:-}
  done
fi
if [[ $stage == eval || $stage == all ]]; then
  for arch in dspark dflash eagle3; do
    for t in 0 1; do
      run "$PY" -m deepspec_jax.eval --target=smollm2-135m --draft="runs/${arch}_smollm2_135m/final" \
        --datasets=gsm8k,humaneval,mt-bench --max_samples=${EVAL_SAMPLES:-8} --max_new_tokens=256 \
        --temperature=$t --output_dir="runs/eval/${arch}_T$t" ${EVAL_ARGS:-}
    done
  done
fi
if [[ $stage == piece ]]; then
  P="$DATA/${PIECE:?set PIECE=<directory under $DATA>}"
  mkdir -p "$P"
  run "$PY" -m deepspec_jax.data.regenerate --prompts="${PIECE_PROMPTS:?set PIECE_PROMPTS=a.jsonl,b.jsonl}" \
    --interleave --output="$P/answers.jsonl" --max_samples="${PIECE_SAMPLES:-0}" --batch_size=32 \
    --max_new_tokens=256 --temperature="${PIECE_TEMPERATURE:-0.2}" --top_p=0.9
  run "$PY" -m deepspec_jax.data.tokenize --input="$P/answers.jsonl" --output="$P/tokens" \
    --target=smollm2-135m --max_length=512 --overwrite
  run "$PY" -m deepspec_jax.data.build_features --tokens="$P/tokens" --target=smollm2-135m \
    --layer_ids=$LAYERS --output="$P/features" --batch_size=8 --dtype=bfloat16
fi
if [[ $stage == finetune ]]; then
  # The shipped DSpark (INIT_FROM) trained further on every piece in PIECES; with
  # RESELECT_VOCAB=True the run selects its draft vocabulary (the config's
  # draft_vocab_size) from all the pieces instead of keeping the shipped draft's (v8).
  stores=() caches=()
  for p in ${PIECES:?set PIECES=". s22 s23"}; do
    d="$DATA/$p" && d="${d%/.}"          # "." is $DATA itself (tensorstore refuses "/./")
    stores+=("'$d/tokens'") caches+=("$d/features")
  done
  run "$PY" -m deepspec_jax.train --config=configs/dspark/dspark_smollm2_135m.py \
    --config.output_dir="${RUN:?set RUN=runs/<name>}" \
    --config.data.train="($(IFS=,; echo "${stores[*]}"),)" \
    --config.data.feature_cache="$(IFS=,; echo "${caches[*]}")" \
    --config.draft.init_from="${INIT_FROM:-deepspec_jax/assets/default_draft}" \
    --config.train.num_epochs="${EPOCHS:-2}" --config.train.lr="${LR:-3e-4}" \
    --config.draft.init_reselect_vocab="${RESELECT_VOCAB:-False}" ${TRAIN_ARGS:-}
fi
if [[ $stage == ship ]]; then
  # The eval's embedded default: bf16, ONE model.safetensors in vLLM's speculators format
  # (+ config.json; embed and a full-vocabulary lm_head are the target's and left out), so a
  # re-ship replaces one file and the draft loads in vLLM as shipped. SHIP_FROM picks the
  # checkpoint (default: the DSpark run's final export); afterwards re-record the quality
  # guard: python scripts/record_draft_quality.py
  dst=deepspec_jax/assets/default_draft
  work=$(mktemp -d)
  run "$PY" -m convert.to_speculators --src "${SHIP_FROM:-runs/dspark_smollm2_135m/final}" \
    --dst "$work/speculators" --target smollm2-135m --dtype bfloat16
  rm -rf "$dst" && mv "$work/speculators" "$dst" && rm -rf "$work"
fi
