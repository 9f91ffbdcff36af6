#!/usr/bin/env bash
# MOSS-Speech-Nano end to end on CPU, one command from the repository root:
#
#   bash training/recipes/nano.sh
#
# corpus (espeak-ng) -> speech tokenizer (encoder + VQ + CTC) -> speech decoder (flow, Griffin-Lim) -> recogniser
# head on decoded speech -> the flow fine-tuned on the assistant's voice -> text tokenizer
# -> text model (every fact as text) -> codes and training data -> stage I (frozen text backbone) -> stage II (joint,
# text mixed in) -> SFT (TRL, four modes) -> the voices round (the corpus again with 35 more voices asking the train
# facts: SFT, then VOICES_ROUNDS x (stage II, SFT)) -> the robust-codes round (the tokenizer fine-tuned on all 47
# voices with vocal-tract-length and speaking-rate perturbation, the flow fine-tuned on its codes, the corpus
# re-encoded, then ROBUST_ROUNDS x (stage II, SFT) on the new codes) -> checkpoint outputs/nano/final; then the
# ablation (the same recipe with stage I unfrozen, without the robust-codes round) -> outputs/nano/ablation_final;
# then `moss-speech eval` of both on the test splits
# and the model card with the result tables (training/nano_report.py) -> outputs/nano/final/README.md.
# It made v3 (over 5 hours of steps); the shipped checkpoint (v5) is training/recipes/nano_budget.sh's main line, as
# it was at commit 1289890 with LOCAL_TOKENIZER_MINUTES=30, after two rounds of nano_levers.sh's frame-level lever,
# the second with FRAMES_WORD_END_WEIGHT=30 (the measured results of every run: the checkpoint's eval/findings.md).
# Everything is written under NANO_DATA and NANO_OUT; the package's shipped checkpoint
# (modeling_moss_speech/pretrained/moss-speech-nano) is replaced only with NANO_SHIP=1.
#
# Knobs (environment variables, defaults in brackets):
#   NANO_DATA [data/nano]     generated data: corpus/, codes/, pretrain/, sft/, and voices/ (the same for the corpus
#                             with the question voices)
#   NANO_OUT [outputs/nano]   models, logs/ (one log per step + timings.txt), eval/ (JSON results)
#   THREADS [2]               CPU threads of every step (torch/OpenMP; espeak-ng workers)
#   PYTHON [.venv/bin/python if present, else python]  interpreter with the package installed (pip install -e .[dev])
#   NANO_RESUME [1]           1: skip steps already completed (markers in $NANO_OUT/.done) and resume an interrupted
#                             pre-training from its last checkpoint; 0: run every step from scratch
#   NANO_STEPS [all]          run only these steps (space-separated names, as printed), e.g. "stage1 stage2"
#   NANO_DRY_RUN [0]          1: print each step's command without running anything
#   NANO_SHIP [0]             1: last step `ship`: copy outputs/nano/final, its eval JSON and step times into the
#                             package as the shipped checkpoint (replacing it; the earlier runs' eval/v*_*.json,
#                             lever_*.json and findings.md stay), then rewrite its model card
#   NANO_SHIP_DIR [modeling_moss_speech/pretrained/moss-speech-nano]   where `ship` puts the checkpoint
#   Budgets: CODEC_TOKENIZER_MINUTES [20] CODEC_DECODER_MINUTES [18] CODEC_VOICE_MINUTES [25, twice] TEXT_MINUTES [6] STAGE1_STEPS [1100]
#            STAGE2_STEPS [750] SFT_STEPS [1000] (steps measured at ~0.8 s (stage I/II) and ~0.55 s (SFT) per step on
#            a busy 2-core machine: <= 15, 10 and 10 minutes), VOICES_ROUNDS [4], ROBUST_TOKENIZER_MINUTES [28],
#            ROBUST_VOICE_MINUTES [30], SENTENCES_VOICE_MINUTES [15], ROBUST_ROUNDS [1],
#            EVAL_SPLITS ["test test_seen test_dialect test_seen_dialect"] (held-out facts; trained facts; in the unseen
#            test voice, then in the unseen dialect test voice)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python}
NANO_DATA=${NANO_DATA:-data/nano}
NANO_OUT=${NANO_OUT:-outputs/nano}
THREADS=${THREADS:-2}
NANO_RESUME=${NANO_RESUME:-1}
NANO_STEPS=${NANO_STEPS:-}
CODEC_TOKENIZER_MINUTES=${CODEC_TOKENIZER_MINUTES:-20}
CODEC_DECODER_MINUTES=${CODEC_DECODER_MINUTES:-18}
CODEC_VOICE_MINUTES=${CODEC_VOICE_MINUTES:-25}
TEXT_MINUTES=${TEXT_MINUTES:-6}
STAGE1_STEPS=${STAGE1_STEPS:-1100}
STAGE2_STEPS=${STAGE2_STEPS:-750}
SFT_STEPS=${SFT_STEPS:-1000}
EVAL_SPLITS=${EVAL_SPLITS:-test test_seen test_dialect test_seen_dialect}
VOICES_ROUNDS=${VOICES_ROUNDS:-4}
ROBUST_TOKENIZER_MINUTES=${ROBUST_TOKENIZER_MINUTES:-28}
ROBUST_VOICE_MINUTES=${ROBUST_VOICE_MINUTES:-30}
SENTENCES_VOICE_MINUTES=${SENTENCES_VOICE_MINUTES:-15}
ROBUST_ROUNDS=${ROBUST_ROUNDS:-1}
NANO_DRY_RUN=${NANO_DRY_RUN:-0}

# the step runner shared with the other nano recipes: recipe_setup, wanted, run_step, pretrain, stage2_sft_round,
# sft_step, eval_checkpoint, eval_stage1_text, ship_checkpoint
source training/recipes/steps.sh
recipe_setup "$NANO_OUT" "$NANO_DATA"

# pre-training data: --datasets takes several entries, each a directory or a YAML mapping {path, kind}
P=$NANO_DATA/pretrain
SPEECH_DATA=("$P/speech" "$P/interleaved" "$P/spoken_qa")
MIXED_DATA=("$P/speech" "$P/interleaved" "$P/spoken_qa" "{path: $P/text, kind: text}")
EVAL_DATA=("$P/eval")
MIXED_EVAL_DATA=("$P/eval" "{path: $P/text_eval, kind: text}")

# ---------------------------------------------------------------------------------------------- data and codec
# the corpus of every step up to the first SFT: the twelve training voices (no question voices)
run_step corpus "$PY" processing/synthesize_espeak.py --output "$NANO_DATA/corpus" --num_workers "$THREADS" \
  --question_voices none --overwrite --no_progress
# two phases (the second restarts the schedule at half the learning rate from the first's weights and codebook)
run_step codec_tokenizer "$PY" training/train_speech_tokenizer.py --corpus "$NANO_DATA/corpus" \
  --codec_config training/configs/nano_codec.json --output "$NANO_OUT/codec_tokenizer_a" --max_steps 3000 \
  --max_minutes "$CODEC_TOKENIZER_MINUTES" --batch_size 16 --learning_rate 2e-3 --eval_every 400 --threads "$THREADS"
run_step codec_tokenizer_b "$PY" training/train_speech_tokenizer.py --corpus "$NANO_DATA/corpus" \
  --codec_config training/configs/nano_codec.json --init_from "$NANO_OUT/codec_tokenizer_a" \
  --output "$NANO_OUT/codec_tokenizer" --max_steps 2500 --max_minutes "$CODEC_TOKENIZER_MINUTES" --batch_size 16 \
  --learning_rate 1e-3 --eval_every 500 --threads "$THREADS"
run_step codec_decoder "$PY" training/train_speech_decoder.py --codec "$NANO_OUT/codec_tokenizer" \
  --corpus "$NANO_DATA/corpus" --codec_config training/configs/nano_codec.json --output "$NANO_OUT/codec" \
  --max_minutes "$CODEC_DECODER_MINUTES" --threads "$THREADS" --save_voices "$NANO_OUT/voices"

# the recogniser (CTC head only) also learns the codec's own decoded speech; encoder and codes are unchanged
run_step codec_recognizer "$PY" training/train_speech_recognizer.py --codec "$NANO_OUT/codec" \
  --corpus "$NANO_DATA/corpus" --voice "$NANO_OUT/voices/canonical.safetensors" --output "$NANO_OUT/codec_asr" \
  --max_train_examples 4000 --max_steps 2000 --threads "$THREADS"

# the assistant speaks every answer in the canonical voice: the flow is fine-tuned on that voice alone, in two phases
# (the second at half the learning rate), and integrates from zero noise (a small flow leaves unit noise in its mel)
run_step codec_voice_a "$PY" training/train_speech_decoder.py --codec "$NANO_OUT/codec_asr" \
  --corpus "$NANO_DATA/corpus" --output "$NANO_OUT/codec_voice_a" --canonical_only --inference_noise_scale 0 \
  --max_minutes "$CODEC_VOICE_MINUTES" --learning_rate 1e-3 --warmup_steps 20 --eval_examples 4 --threads "$THREADS"
run_step codec_voice "$PY" training/train_speech_decoder.py --codec "$NANO_OUT/codec_voice_a" \
  --corpus "$NANO_DATA/corpus" --output "$NANO_OUT/codec_voice" --canonical_only --inference_noise_scale 0 \
  --max_minutes "$CODEC_VOICE_MINUTES" --learning_rate 5e-4 --warmup_steps 20 --eval_examples 4 --threads "$THREADS"

# ---------------------------------------------------------------------------------------------- text LLM
run_step tokenizer "$PY" processing/build_nano_tokenizer.py --corpus "$NANO_DATA/corpus" \
  --output "$NANO_OUT/tokenizer"
run_step text_model "$PY" training/train_text_model.py --corpus "$NANO_DATA/corpus" \
  --tokenizer "$NANO_OUT/tokenizer" --output "$NANO_OUT/text_model" --max_minutes "$TEXT_MINUTES" \
  --threads "$THREADS"
# codes of every utterance (cached in $NANO_DATA/codes; the decoder step leaves the encoder as is, so these are the
# shipped codec's codes), then grids and conversations
run_step prepare "$PY" processing/prepare_nano.py --corpus "$NANO_DATA/corpus" --codec "$NANO_OUT/codec_tokenizer" \
  --tokenizer "$NANO_OUT/tokenizer" --output "$NANO_DATA" --threads "$THREADS" --no_progress
# the same corpus plus 35 question voices (train-fact questions only; every other row is byte-identical), for the
# voices round after the first SFT; its test_dialect splits are what the evaluation also reads
run_step corpus_voices "$PY" processing/synthesize_espeak.py --output "$NANO_DATA/voices/corpus" \
  --num_workers "$THREADS" --overwrite --no_progress
run_step prepare_voices "$PY" processing/prepare_nano.py --corpus "$NANO_DATA/voices/corpus" \
  --codec "$NANO_OUT/codec_tokenizer" --tokenizer "$NANO_OUT/tokenizer" --output "$NANO_DATA/voices" \
  --threads "$THREADS" --no_progress

# the robust codes: the tokenizer continues on all 47 voices with each example's mel warped in frequency (vocal tract
# length, +-8 %) and time (speaking rate, +-10 %): the character error rate of its CTC head on the held-out voices
# halves (test voice 17 -> 9 %, dialect 17.5 -> 12 %). The codebook drifts (about a quarter of the codes stay the
# same), so the flow is fine-tuned on the new codes and the LLM gets ROBUST_ROUNDS more rounds on them (below)
run_step codec_tokenizer_robust "$PY" training/train_speech_tokenizer.py --corpus "$NANO_DATA/voices/corpus" \
  --codec_config training/configs/nano_codec.json --init_from "$NANO_OUT/codec_voice" \
  --output "$NANO_OUT/codec_tokenizer_robust" --max_steps 4000 --max_minutes "$ROBUST_TOKENIZER_MINUTES" \
  --batch_size 16 --learning_rate 1e-3 --eval_every 500 --vtlp 0.08 --time_stretch 0.1 \
  --report_splits validation test test_seen test_dialect test_seen_dialect --threads "$THREADS"
run_step codec_voice_robust "$PY" training/train_speech_decoder.py --codec "$NANO_OUT/codec_tokenizer_robust" \
  --corpus "$NANO_DATA/voices/corpus" --output "$NANO_OUT/codec_voice_robust" --canonical_only \
  --inference_noise_scale 0 --max_minutes "$ROBUST_VOICE_MINUTES" --learning_rate 1e-3 --warmup_steps 20 \
  --eval_examples 4 --threads "$THREADS" --save_voices "$NANO_OUT/voices_robust"
# the decoder speaks every answer and round trip in the assistant's voice, which says only words and answers in the
# corpus: a small corpus where it also asks the train-fact questions, and the flow fine-tuned on it (whole questions
# through the codec heard 24 -> 88 % in that voice, 14 -> 42 % in the unseen test voice; answer words 89 -> 87 %)
run_step corpus_decoder "$PY" processing/synthesize_espeak.py --output "$NANO_DATA/decoder/corpus" \
  --question_voices none --canonical_questions --num_workers "$THREADS" --overwrite --no_progress
run_step codec_voice_sentences "$PY" training/train_speech_decoder.py --codec "$NANO_OUT/codec_voice_robust" \
  --corpus "$NANO_DATA/decoder/corpus" --output "$NANO_OUT/codec_voice_sentences" --canonical_only \
  --inference_noise_scale 0 --max_minutes "$SENTENCES_VOICE_MINUTES" --learning_rate 5e-4 --warmup_steps 20 \
  --eval_examples 4 --threads "$THREADS"
run_step prepare_robust "$PY" processing/prepare_nano.py --corpus "$NANO_DATA/voices/corpus" \
  --codec "$NANO_OUT/codec_tokenizer_robust" --tokenizer "$NANO_OUT/tokenizer" --output "$NANO_DATA/robust" \
  --threads "$THREADS" --no_progress

# ---------------------------------------------------------------------------------------------- speech LLM
# main run: stage I frozen, stage II joint, SFT; ablation: stage I unfrozen (nano_ablation.yaml), same afterwards
for run in main ablation; do
  if [[ $run == main ]]; then
    root=$NANO_OUT prefix="" stage1_config=training/configs/nano.yaml final=$NANO_OUT/final
  else
    root=$NANO_OUT/ablation prefix=ablation_ stage1_config=training/configs/nano_ablation.yaml
    final=$NANO_OUT/ablation_final
  fi
  pretrain "${prefix}stage1" "$root/stage1" --config "$stage1_config" \
    --init_from_text_model "$NANO_OUT/text_model" --datasets "${SPEECH_DATA[@]}" --eval_datasets "${EVAL_DATA[@]}" \
    --max_steps "$STAGE1_STEPS"
  pretrain "${prefix}stage2" "$root/stage2" --config training/configs/nano_stage2.yaml --model "$root/stage1" \
    --datasets "${MIXED_DATA[@]}" --eval_datasets "${MIXED_EVAL_DATA[@]}" --max_steps "$STAGE2_STEPS"
  model=$root/stage2
  sft_step sft "$NANO_DATA" "$SFT_STEPS"
  # the voices round: SFT, then VOICES_ROUNDS x (stage II, SFT), on the corpus with the 35 question voices (S->T of
  # trained facts in the unseen test voice: 25 % after the first SFT, 42 % after sft_voices, then 64, 77, 83, 87 %
  # after rounds 1-4; each round ~15-25 min on a busy 2-core machine)
  sft_step sft_voices "$NANO_DATA/voices" "$SFT_STEPS"
  for round in $(seq 1 "$VOICES_ROUNDS"); do
    stage2_sft_round "voices_$round" "$NANO_DATA/voices" "$STAGE2_STEPS" "$SFT_STEPS"
  done
  codec=$NANO_OUT/codec_voice data=$NANO_DATA voices=$NANO_OUT/voices
  if [[ $run == main ]]; then
    # the robust-codes round: stage II and SFT on the corpus re-encoded by the robust tokenizer
    for round in $(seq 1 "$ROBUST_ROUNDS"); do
      stage2_sft_round "robust_$round" "$NANO_DATA/robust" "$STAGE2_STEPS" "$SFT_STEPS"
    done
    # voice prompts hold the tokenizer's codes of their audio: the robust codec's own (the sentences step trains
    # the flow only, so its codes are the robust codec's)
    codec=$NANO_OUT/codec_voice_sentences data=$NANO_DATA/robust voices=$NANO_OUT/voices_robust
  fi
  # the shipped layout: LLM + processor + codec/ + voices/ (the decoder step's canonical/female/male prompts)
  run_step "${prefix}assemble" "$PY" training/assemble_nano.py --model "$model" \
    --processor "$NANO_OUT/tokenizer" --codec "$codec" --corpus "$NANO_DATA/corpus" --data "$data" \
    --voices_dir "$voices" --voices none --output "$final"
done

# ---------------------------------------------------------------------------------------------- evaluation
for name in final ablation_final; do
  eval_checkpoint "$name" "$NANO_DATA"
done

# text knowledge right after stage I, frozen vs not (the stage-I checkpoints with the nano processor and codec)
eval_stage1_text "$NANO_OUT" "$NANO_DATA" "$NANO_OUT/codec_voice"
# the result tables, and the model card with them in the frozen recipe's checkpoint
run_step report "$PY" training/nano_report.py --eval "$NANO_OUT/eval" --checkpoint "$NANO_OUT/final"
# ship (only when asked, NANO_SHIP=1): the frozen recipe's checkpoint becomes the package's default model
ship_checkpoint

echo "== nano recipe finished in $(((SECONDS - TOTAL_START) / 60)) min; step times in $LOGS/timings.txt"
echo "   checkpoints: $NANO_OUT/final (frozen stage I), $NANO_OUT/ablation_final (no freezing); results: $NANO_OUT/eval/"
echo "   model card with the tables: $NANO_OUT/final/README.md"
