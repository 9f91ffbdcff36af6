#!/usr/bin/env bash
# The alignment-lever ablation of MOSS-Speech-Nano: does anything make the model answer spoken questions about facts
# it knows only as text? One command from the repository root:
#
#   bash training/recipes/nano_levers.sh
#
# Every run continues the same checkpoint (BASE, default: the shipped one) with one round of the recipe's voices
# round: stage II (STAGE2_STEPS on the corpus with the question voices, text mixed in) and SFT (SFT_STEPS), then is
# assembled with BASE's processor, codec and voices and evaluated on the held-out facts (test, test_dialect) and the
# trained facts (test_seen, test_seen_dialect). The runs differ only in stage II:
#   control    nothing more (so the other rows are compared with one more round of the plain recipe)
#   wordmix    + pretrain/wordmix: word-level interleaved questions of train facts (a random half of the words
#              spoken, the rest written) followed by the answer text
#   align      + alignment_loss (weight 1, cosine): the trunk and text-tail states of the final rows after a spoken
#              question are pulled toward those after the same question as text (pretrain/align pairs)
#   contrast   + alignment_loss (weight 1, InfoNCE at temperature 0.1 over 16 pairs per micro-batch)
#   reading    the round's data from the corpus with reading sentences too (synthesize_espeak.py --reading_voices 4:
#              question frames filled with other categories' phrases, "what colour is france", each said by 4 of the
#              47 voices; no fact, no answer), so the model must read questions word by word
#   frames     + alignment_loss row for row against a frozen teacher (weight 30): each spoken train question (47
#              voices) is paired with its text twin, the same grid with every code row replaced by the word heard by
#              then (pretrain/frames of the voices corpus: CTC forced alignment on BASE's codec); the teacher is BASE
#              after FRAMES_TEACHER_STEPS [400] text-only steps on pretrain/twin_text (every fact's chat, each question
#              word repeated 1-9 times: the rate of speech), so it answers the twins of held-out facts too
# The lever data (pretrain/wordmix, pretrain/align) comes from the 12-voice corpus, the round's data from the corpus
# with the 35 question voices (reading: from the one with reading sentences), all encoded with BASE's codec and
# tokenizer. A run takes about 25-35 min on a busy
# 2-core machine; the tables: python training/nano_report.py --eval $LEVERS_OUT/eval
#
# Knobs (environment variables, defaults in brackets), as in nano.sh where the names are the same:
#   BASE [modeling_moss_speech/pretrained/moss-speech-nano]   checkpoint every run starts from
#   NANO_DATA [data/nano]   corpus/ and voices/corpus/ (made here unless present), their codes and datasets
#   LEVERS_OUT [outputs/nano_levers]   runs, logs/, eval/ (lever_<run>_<split>.json)
#   LEVERS [control wordmix align contrast]   runs to make (reading: also the reading corpus, made when asked for)
#   THREADS [2], PYTHON, NANO_RESUME [1], NANO_STEPS [all], NANO_DRY_RUN [0], STAGE2_STEPS [500], SFT_STEPS [500],
#   FRAMES_TEACHER_STEPS [400],
#   FRAMES_WORD_END_WEIGHT [1]   weight of the rows that complete a word after the first in pretrain/frames
#              (prepare_nano.py --frames_word_end_weight; made by prepare_voices: rm $LEVERS_OUT/.done/prepare_voices
#              to remake the pairs with another weight)
#   EVAL_SPLITS ["test test_dialect test_seen test_seen_dialect"]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python}
BASE=${BASE:-modeling_moss_speech/pretrained/moss-speech-nano}
NANO_DATA=${NANO_DATA:-data/nano}
LEVERS_OUT=${LEVERS_OUT:-outputs/nano_levers}
LEVERS=${LEVERS:-control wordmix align contrast}
THREADS=${THREADS:-2}
NANO_RESUME=${NANO_RESUME:-1}
NANO_STEPS=${NANO_STEPS:-}
NANO_DRY_RUN=${NANO_DRY_RUN:-0}
STAGE2_STEPS=${STAGE2_STEPS:-500}
SFT_STEPS=${SFT_STEPS:-500}
FRAMES_TEACHER_STEPS=${FRAMES_TEACHER_STEPS:-400}
FRAMES_WORD_END_WEIGHT=${FRAMES_WORD_END_WEIGHT:-1}
EVAL_SPLITS=${EVAL_SPLITS:-test test_dialect test_seen test_seen_dialect}

source training/recipes/steps.sh
recipe_setup "$LEVERS_OUT" "$NANO_DATA"

# ---------------------------------------------------------------------------------------------- data
# the two corpora of nano.sh (same seed, same rows), encoded with BASE's codec (its encoder is the tokenizer's)
if [[ -d "$NANO_DATA/corpus" && "$NANO_RESUME" == 1 ]]; then
  echo "== corpus: $NANO_DATA/corpus exists, kept"
else
  run_step corpus "$PY" processing/synthesize_espeak.py --output "$NANO_DATA/corpus" --num_workers "$THREADS" \
    --question_voices none --overwrite --no_progress
fi
if [[ -d "$NANO_DATA/voices/corpus" && "$NANO_RESUME" == 1 ]]; then
  echo "== corpus_voices: $NANO_DATA/voices/corpus exists, kept"
else
  run_step corpus_voices "$PY" processing/synthesize_espeak.py --output "$NANO_DATA/voices/corpus" \
    --num_workers "$THREADS" --overwrite --no_progress
fi
run_step prepare "$PY" processing/prepare_nano.py --corpus "$NANO_DATA/corpus" --codec "$BASE/codec" \
  --tokenizer "$BASE" --output "$NANO_DATA" --threads "$THREADS" --no_progress
run_step prepare_voices "$PY" processing/prepare_nano.py --corpus "$NANO_DATA/voices/corpus" --codec "$BASE/codec" \
  --tokenizer "$BASE" --output "$NANO_DATA/voices" --frames_word_end_weight "$FRAMES_WORD_END_WEIGHT" \
  --threads "$THREADS" --no_progress

if [[ " $LEVERS " == *" reading "* ]]; then
  run_step corpus_reading "$PY" processing/synthesize_espeak.py --output "$NANO_DATA/reading/corpus" \
    --reading_voices 4 --num_workers "$THREADS" --overwrite --no_progress
  run_step prepare_reading "$PY" processing/prepare_nano.py --corpus "$NANO_DATA/reading/corpus" \
    --codec "$BASE/codec" --tokenizer "$BASE" --output "$NANO_DATA/reading" --threads "$THREADS" --no_progress
fi

P=$NANO_DATA/pretrain
V=$NANO_DATA/voices/pretrain
R=$NANO_DATA/reading/pretrain
ROUND_DATA=("$V/speech" "$V/interleaved" "$V/spoken_qa" "{path: $V/text, kind: text}")
ROUND_EVAL_DATA=("$V/eval" "{path: $V/text_eval, kind: text}")

# ---------------------------------------------------------------------------------------------- the runs
for lever in $LEVERS; do
  data=("${ROUND_DATA[@]}") extra=() root=$LEVERS_OUT/$lever
  case $lever in
    control) ;;
    wordmix) data+=("$P/wordmix") ;;
    align) extra=(--align_dataset "$P/align" --align_weight 1) ;;
    contrast) extra=(--align_dataset "$P/align" --align_weight 1 --align_temperature 0.1 --align_batch_size 16) ;;
    reading) data=("$R/speech" "$R/interleaved" "$R/spoken_qa" "{path: $R/text, kind: text}") ;;
    frames) extra=(--align_dataset "$V/frames" --align_weight 30 --align_teacher "$root/teacher") ;;
    *) echo "nano_levers.sh: unknown lever '$lever' (control, wordmix, align, contrast, reading, frames)" >&2
       exit 2 ;;
  esac
  if [[ $lever == frames ]]; then
    frames_teacher frames_teacher "$root/teacher" "$BASE" "$V" "$FRAMES_TEACHER_STEPS" --threads "$THREADS"
  fi
  pretrain "${lever}_stage2" "$root/stage2" --config training/configs/nano_stage2.yaml --model "$BASE" \
    --datasets "${data[@]}" --eval_datasets "${ROUND_EVAL_DATA[@]}" --max_steps "$STAGE2_STEPS" \
    --threads "$THREADS" ${extra[@]+"${extra[@]}"}
  run_step "${lever}_sft" "$PY" training/sft.py --config training/configs/nano_sft.yaml \
    --model_name_or_path "$root/stage2" --processor_name_or_path "$BASE" \
    --dataset_name "$NANO_DATA/voices/sft" --output_dir "$root/sft" --max_steps "$SFT_STEPS"
  run_step "${lever}_assemble" "$PY" training/assemble_nano.py --model "$root/sft" --processor "$BASE" \
    --codec "$BASE/codec" --corpus "$NANO_DATA/corpus" --data "$NANO_DATA" --voices_dir "$BASE/voices" \
    --voices none --output "$root/final"
  for split in $EVAL_SPLITS; do
    run_step "eval_${lever}_$split" "$PY" -m modeling_moss_speech eval --model "$root/final" \
      --corpus "$NANO_DATA/voices/corpus" --split "$split" -o "$LEVERS_OUT/eval/lever_${lever}_$split.json"
  done
done

run_step report "$PY" training/nano_report.py --eval "$LEVERS_OUT/eval"
echo "== lever runs in $LEVERS_OUT; results: $LEVERS_OUT/eval/lever_*.json"
