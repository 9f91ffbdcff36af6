# Step runner of the nano recipes (sourced by nano.sh, nano_budget.sh and nano_levers.sh, from the repository root).
# Reads PY, THREADS, NANO_STEPS, NANO_RESUME and NANO_DRY_RUN, which the recipe sets before sourcing this file, and
# LOGS (one log per step + timings.txt) and DONE (completion markers), which recipe_setup sets.

# recipe_setup OUT DATA: every step runs offline with THREADS threads and unbuffered output; logs in OUT/logs,
# completion markers in OUT/.done, results in OUT/eval; TOTAL_START: when the recipe started
recipe_setup() {
  export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  LOGS=$1/logs
  DONE=$1/.done
  mkdir -p "$LOGS" "$DONE" "$1/eval" "$2"
  TOTAL_START=$SECONDS
}

# wanted NAME: whether step NAME runs now (in NANO_STEPS, and not completed before when resuming); says why not.
wanted() {
  if [[ -n "$NANO_STEPS" && " $NANO_STEPS " != *" $1 "* ]]; then
    echo "== $1: not in NANO_STEPS, skipped"
    return 1
  fi
  if [[ "$NANO_RESUME" == 1 && -f "$DONE/$1" ]]; then
    echo "== $1: completed before, skipped (rm $DONE/$1 to rerun it)"
    return 1
  fi
}

# run_step NAME COMMAND...: runs the command (output to the terminal and $LOGS/NAME.log), prints its time.
run_step() {
  local name=$1
  shift
  wanted "$name" || return 0
  # a recipe may define before_step NAME, e.g. to give a step more threads once another lane is done
  if declare -F before_step > /dev/null; then before_step "$name"; fi
  echo "== $name: $*"
  [[ "$NANO_DRY_RUN" == 1 ]] && return 0
  rm -f "$DONE/$name"
  local start=$SECONDS
  "$@" 2>&1 | tee "$LOGS/$name.log"
  local took=$((SECONDS - start))
  printf '%-24s %6d s  (%d min)\n' "$name" "$took" "$((took / 60))" | tee -a "$LOGS/timings.txt"
  touch "$DONE/$name"
}

# pretrain NAME OUTPUT_DIR ARGS...: training/pretrain.py into OUTPUT_DIR; with NANO_RESUME=1 an interrupted run
# continues from its last checkpoint, otherwise OUTPUT_DIR starts empty.
pretrain() {
  local name=$1 out=$2
  shift 2
  wanted "$name" || return 0
  local resume=()
  if [[ "$NANO_RESUME" == 1 ]] && compgen -G "$out/checkpoint-*" > /dev/null; then
    resume=(--resume_from latest)
  elif [[ "$NANO_DRY_RUN" != 1 ]]; then
    rm -rf "$out"
  fi
  run_step "$name" "$PY" training/pretrain.py "$@" --output_dir "$out" ${resume[@]+"${resume[@]}"}
}

# frames_teacher NAME OUT BASE DIR STEPS [ARGS...]: the frame-level lever's teacher, into OUT: BASE after STEPS
# text-only steps on DIR/twin_text (every fact's chat with each question word repeated 1-9 times, the rate of speech)
# and DIR/text (DIR: a pretrain/ of prepare_nano.py), so it answers the twins of held-out facts too
frames_teacher() {
  local name=$1 out=$2 base=$3 d=$4 steps=$5
  shift 5
  pretrain "$name" "$out" --config training/configs/nano_stage2.yaml --model "$base" \
    --datasets "{path: $d/twin_text, kind: text}" "{path: $d/text, kind: text}" \
    --eval_datasets "{path: $d/text_eval, kind: text}" --text_mix_ratio 1 --max_steps "$steps" "$@"
}

# eval_stage1_text OUT DATA CODEC [NAMES]: text knowledge right after stage I, frozen vs not (OUT/stage1 and
# OUT/ablation/stage1 with the nano processor and CODEC): steps eval_stage1_t2t, eval_ablation_stage1_t2t (NAMES:
# which of the two, default both)
eval_stage1_text() {
  local out=$1 data=$2 codec=$3 name src
  for name in ${4:-stage1 ablation_stage1}; do
    src=$out/${name/ablation_/ablation/}
    run_step "eval_${name}_t2t" bash -c "rm -rf '$out/eval_$name' && mkdir -p '$out/eval_$name' && \
      cp '$src/config.json' '$src/model.safetensors' '$out/tokenizer/'* '$out/eval_$name/' && \
      cp -r '$codec' '$out/eval_$name/codec' && '$PY' -m modeling_moss_speech eval \
      --model '$out/eval_$name' --corpus '$data/corpus' --split test --tasks t2t \
      --baseline-text-model '$out/text_model' -o '$out/eval/${name}_test_t2t.json'"
  done
}

# stage2_sft_round SUFFIX DATA STAGE2_STEPS SFT_STEPS [SEED]: one more round from $model: stage II on DATA's
# pre-training sets (DATA: an output of prepare_nano.py) with its text mixed in, then SFT on DATA/sft (processor
# $NANO_OUT/tokenizer); steps ${prefix}stage2_SUFFIX and ${prefix}sft_SUFFIX into $root/stage2_SUFFIX and
# $root/sft_SUFFIX; $model (the caller's) becomes the SFT checkpoint. SEED (default: each config's own) seeds both
# data orders: a round shorter than an epoch sees only the front of its order, so rounds that share a seed train on
# the same part of the data again and never on the rest
stage2_sft_round() {
  local suffix=$1 d=$2 stage2_steps=$3 sft_steps=$4 seed=()
  [[ -n "${5:-}" ]] && seed=(--seed "$5")
  pretrain "${prefix}stage2_$suffix" "$root/stage2_$suffix" --config training/configs/nano_stage2.yaml \
    --model "$model" --datasets "$d/pretrain/speech" "$d/pretrain/interleaved" "$d/pretrain/spoken_qa" \
    "{path: $d/pretrain/text, kind: text}" \
    --eval_datasets "$d/pretrain/eval" "{path: $d/pretrain/text_eval, kind: text}" --max_steps "$stage2_steps" \
    ${seed[@]+"${seed[@]}"}
  model=$root/stage2_$suffix
  sft_step "sft_$suffix" "$d" "$sft_steps" ${seed[@]+"${seed[@]}"}
}

# sft_step NAME DATA STEPS [--seed N]: SFT (TRL, training/sft.py) of $model on DATA/sft (processor $NANO_OUT/tokenizer):
# step ${prefix}NAME into $root/NAME, which becomes $model
sft_step() {
  local name=$1 d=$2 steps=$3
  shift 3
  run_step "${prefix}$name" "$PY" training/sft.py --config training/configs/nano_sft.yaml \
    --model_name_or_path "$model" --processor_name_or_path "$NANO_OUT/tokenizer" \
    --dataset_name "$d/sft" --output_dir "$root/$name" --max_steps "$steps" "$@"
  model=$root/$name
}

# eval_checkpoint NAME DATA: `moss-speech eval` of $NANO_OUT/NAME on each of EVAL_SPLITS of DATA/voices/corpus (text
# retention against $NANO_OUT/text_model): steps eval_NAME_SPLIT, results $NANO_OUT/eval/NAME_SPLIT.json
eval_checkpoint() {
  local name=$1 data=$2 split
  for split in $EVAL_SPLITS; do
    run_step "eval_${name}_$split" "$PY" -m modeling_moss_speech eval --model "$NANO_OUT/$name" \
      --corpus "$data/voices/corpus" --split "$split" --baseline-text-model "$NANO_OUT/text_model" \
      -o "$NANO_OUT/eval/${name}_$split.json"
  done
}

# ship_checkpoint: with NANO_SHIP=1, step `ship`: $NANO_OUT/final becomes the package's shipped checkpoint
# (NANO_SHIP_DIR, default modeling_moss_speech/pretrained/moss-speech-nano; replaced as a whole) with this run's eval
# JSON, its step times as eval/training_times.txt and the model card with the tables; the earlier runs' results in
# its eval/ (v*_*.json, lever_*.json, findings.md) stay, since the card compares them with this run. Otherwise the
# shipped checkpoint of the working tree is left as it is
ship_checkpoint() {
  local ship=${NANO_SHIP_DIR:-modeling_moss_speech/pretrained/moss-speech-nano}
  if [[ "${NANO_SHIP:-0}" != 1 ]]; then
    echo "== ship: not asked for, skipped (NANO_SHIP=1 copies $NANO_OUT/final into $ship)"
    return 0
  fi
  run_step ship bash -c "rm -rf '$NANO_OUT/ship_history' && mkdir -p '$NANO_OUT/ship_history' && \
    if [[ -d '$ship/eval' ]]; then cp -r '$ship/eval/.' '$NANO_OUT/ship_history/'; fi && \
    rm -rf '$ship' && cp -r '$NANO_OUT/final' '$ship' && mkdir -p '$ship/eval' && \
    cp -r '$NANO_OUT/ship_history/.' '$ship/eval/' && cp '$NANO_OUT/eval/'*.json '$ship/eval/' && \
    cp '$LOGS/timings.txt' '$ship/eval/training_times.txt' && chmod -R a+r '$ship' && \
    '$PY' training/nano_report.py --eval '$ship/eval' --checkpoint '$ship'"
}
