# Step runner of the nano recipes (sourced by nano.sh and nano_levers.sh, from the repository root).
# Reads PY, NANO_STEPS, NANO_RESUME, NANO_DRY_RUN, LOGS (one log per step + timings.txt) and DONE (completion
# markers), which the recipe sets before sourcing this file.

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
