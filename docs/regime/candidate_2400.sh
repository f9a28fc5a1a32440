#!/bin/bash
cd /work/main
start=$(date +%s)
.venv/bin/sparsellama run --profile saturated --set project.root=/work/cand --set tracking.enabled=false \
  --set data.train_tokens=5000000 --set base.train.steps=2400 --set base.train.eval_every=600 \
  --set pretrain.train.steps=300 --set pretrain.train.eval_every=100 \
  --set finetune.dense.steps=500 --set finetune.sparse.steps=500 \
  --set downstream.train_size=4000 --set downstream.test_size=200
echo "rc=$? wall_s=$(( $(date +%s) - start ))"
