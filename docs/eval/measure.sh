#!/usr/bin/env bash
# The numbers of docs/eval.md: SmolLM2-135M-Instruct before and after LIFT on packaged BoolQ, scored by EleutherAI's
# lm-evaluation-harness on the held-out split (layerwise eval). About 25 minutes on 2 idle CPU cores with bf16 units.
#   bash docs/eval/measure.sh OUT
set -euo pipefail
out=${1:?usage: bash docs/eval/measure.sh OUT}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

lift() {  # the settings of tests/test_eval.py's slow test
  layerwise train --model smollm2 --data "$1" --method lift --max-steps 16 --output "$2" \
    --set method.switch_every=8 --set train.lr=3e-4 --set train.warmup_steps=2 --set train.batch_size=8 \
    --set data.max_length=192 --set data.max_train_samples=128 --set data.max_eval_samples=8 \
    --set train.eval_before=false --set train.sample_generations=0 --set train.progress=false
}
score() { time layerwise eval "$@" --dtype bfloat16; }

lift boolq_chat "$out/lift-chat"
lift boolq "$out/lift-plain"
score "$out/lift-chat" --limit 400                  # boolq_layerwise_chat through the chat template
score "$out/lift-plain" --limit 400                 # boolq_layerwise, plain prompt
for task in boolq_layerwise boolq_layerwise_chat; do
  for template in off on; do
    score "$out/lift-chat" --model smollm2 --tasks "$task" --chat-template "$template" --limit 400 \
      --output "$out/base-$task-template-$template"
  done
done
score "$out/lift-chat" --output "$out/lift-chat/eval-all"                        # all 1270 held-out rows
score "$out/lift-chat" --model smollm2 --output "$out/lift-chat/eval-smollm2-all"
# float32 (the model's own dtype), as the slow test scores on CPUs without bf16 units
layerwise eval "$out/lift-chat" --limit 400 --output "$out/lift-chat/eval-float32"
layerwise eval "$out/lift-chat" --model smollm2 --limit 400 --output "$out/lift-chat/eval-smollm2-float32"
