#!/bin/bash
# Issue #16's candidate default (docs/results.md): the saturated profile cut to fit 25 minutes.
# Usage, from the repository root: docs/regime/candidate_2400.sh ROOT
set -eu
root=${1:?usage: $0 ROOT}
start=$(date +%s)
.venv/bin/sparsellama run --profile saturated --set project.root="$root" --set tracking.enabled=false \
  --set data.train_tokens=5000000 --set base.train.steps=2400 --set base.train.eval_every=600 \
  --set pretrain.train.steps=300 --set pretrain.train.eval_every=100 \
  --set finetune.dense.steps=500 --set finetune.sparse.steps=500 \
  --set downstream.train_size=4000 --set downstream.test_size=200
echo "wall_s=$(( $(date +%s) - start ))"
