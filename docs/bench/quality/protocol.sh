# The quality protocol of docs/quality.md for one packaged model, sourced by screen.sh and run.sh: the bench settings
# every run shares (dropout on in every block for every method: the same regime on both sides of each comparison),
# the held-out metrics (the first ranks) and the methods.
case "${1:-}" in
  minilm)  bench=(--model minilm --data rotten_tomatoes --batch-size 16 --seq-len 64 --steps 100 --eval 1275); metrics=accuracy,loss ;;
  smollm2) bench=(--model smollm2 --data boolq --batch-size 4 --seq-len 128 --steps 40 --eval 200); metrics=loss,first_token_accuracy ;;
  *) echo "usage: bash $0 minilm|smollm2 [WORK_DIR]" >&2; exit 2 ;;
esac
bench+=(--repeats 1 --set train.frozen_dropout=true)
methods=full,lift,lisa,freeze,salf,lora,ist,meft
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
