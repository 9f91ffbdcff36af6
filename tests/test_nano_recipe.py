"""training/recipes/nano.sh (dry run: the steps and their order) and training/nano_report.py (the shipped tables)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_recipe(tmp_path: Path, recipe: str = "nano.sh", **env: str) -> subprocess.CompletedProcess:
    """A dry run of training/recipes/`recipe` into tmp_path (nothing is executed or written there)."""
    env = {**os.environ, "NANO_DRY_RUN": "1", "NANO_OUT": str(tmp_path / "out"), "LEVERS_OUT": str(tmp_path / "out"),
           "NANO_DATA": str(tmp_path / "data"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(ROOT / "training" / "recipes" / recipe)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, env=env)


def _dry_run(tmp_path: Path, recipe: str = "nano.sh", **env: str) -> list[str]:
    """The recipe's '== step: command' lines of a dry run into tmp_path."""
    result = _run_recipe(tmp_path, recipe, **env)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith("== ") and ": " in line]


def _stand_in_python(tmp_path: Path, body: str = "exit 0") -> str:
    """A stand-in interpreter for real (not dry) recipe runs: a bash script whose body decides each step's fate."""
    stub = tmp_path / "python"
    stub.write_text(f"#!/usr/bin/env bash\n{body}\n")
    stub.chmod(0o755)
    return str(stub)


def test_recipe_steps_in_order(tmp_path):
    lines = _dry_run(tmp_path)
    steps = [line[3:].split(":", 1)[0] for line in lines]
    order = ["corpus", "codec_tokenizer", "codec_decoder", "codec_voice", "text_model", "prepare", "corpus_voices",
             "prepare_voices", "codec_tokenizer_robust", "codec_voice_robust", "corpus_decoder",
             "codec_voice_sentences", "prepare_robust", "stage1", "stage2",
             "sft", "sft_voices", "stage2_voices_1", "sft_voices_1", "stage2_voices_2", "sft_voices_2",
             "stage2_voices_4", "sft_voices_4", "stage2_robust_1", "sft_robust_1", "assemble", "ablation_stage1",
             "ablation_sft_voices_4",
             "ablation_assemble", "eval_final_test_seen_dialect", "report", "ship"]
    assert [s for s in steps if s in order] == order
    commands = dict(line[3:].split(": ", 1) for line in lines)
    # the first corpus has no question voices; the voices round reads the corpus that has them
    assert commands["corpus"].endswith("--question_voices none --overwrite --no_progress")
    assert "--question_voices" not in commands["corpus_voices"]
    assert f"{tmp_path}/data/voices/sft" in commands["sft_voices_4"]
    assert "--model_name_or_path " + f"{tmp_path}/out/stage2_voices_4" in commands["sft_voices_4"]
    assert f"--model {tmp_path}/out/sft_voices_3 " in commands["stage2_voices_4"]
    # the robust-codes round continues the voices round on the re-encoded corpus; the main checkpoint ships the
    # robust codec with it, the ablation (no robust round) keeps the codec its codes came from
    assert "--vtlp 0.08 --time_stretch 0.1" in commands["codec_tokenizer_robust"]
    assert f"--init_from {tmp_path}/out/codec_voice " in commands["codec_tokenizer_robust"]
    assert f"--codec {tmp_path}/out/codec_tokenizer_robust " in commands["prepare_robust"]
    assert f"--model {tmp_path}/out/sft_voices_4 " in commands["stage2_robust_1"]
    assert f"{tmp_path}/data/robust/pretrain/speech" in commands["stage2_robust_1"]
    assert f"--dataset_name {tmp_path}/data/robust/sft " in commands["sft_robust_1"]
    assert f"--model {tmp_path}/out/sft_robust_1 " in commands["assemble"]
    # the shipped checkpoint's rounds keep their configs' seed (the commands that made it)
    assert "--seed" not in commands["stage2_robust_1"] and "--seed" not in commands["sft_voices_4"]
    # the decoder's sentences: the assistant's voice asks the train-fact questions in a corpus of its own, and the
    # flow trained on them (from the robust codec, whose codes it keeps) is the one the main checkpoint ships
    assert commands["corpus_decoder"].endswith("--question_voices none --canonical_questions --num_workers 2 "
                                               "--overwrite --no_progress")
    assert f"--codec {tmp_path}/out/codec_voice_robust --corpus {tmp_path}/data/decoder/corpus " in \
        commands["codec_voice_sentences"]
    assert "--canonical_only" in commands["codec_voice_sentences"]
    assert f"--codec {tmp_path}/out/codec_voice_sentences " in commands["assemble"]
    assert f"--data {tmp_path}/data/robust " in commands["assemble"]
    assert f"--voices_dir {tmp_path}/out/voices_robust " in commands["assemble"]
    assert f"--save_voices {tmp_path}/out/voices_robust" in commands["codec_voice_robust"]
    assert f"--model {tmp_path}/out/ablation/sft_voices_4 " in commands["ablation_assemble"]
    assert f"--codec {tmp_path}/out/codec_voice " in commands["ablation_assemble"]
    assert "robust" not in " ".join(step for step in steps if step.startswith("ablation"))
    assert f"--corpus {tmp_path}/data/voices/corpus --split test_dialect" in commands["eval_final_test_dialect"]
    assert commands["report"].endswith(f"training/nano_report.py --eval {tmp_path}/out/eval --checkpoint "
                                       f"{tmp_path}/out/final")
    assert commands["ship"].startswith("not asked for, skipped")  # the package's checkpoint is left alone
    assert not (tmp_path / "out" / "final").exists()


def test_recipe_ships_into_the_package_only_when_asked(tmp_path):
    shipped = ROOT / "modeling_moss_speech" / "pretrained" / "moss-speech-nano"
    before = sorted(path.name for path in shipped.iterdir())
    commands = dict(line[3:].split(": ", 1) for line in _dry_run(tmp_path, NANO_SHIP="1"))
    assert commands["ship"].startswith("bash -c ")
    assert "rm -rf 'modeling_moss_speech/pretrained/moss-speech-nano' && " \
        f"cp -r '{tmp_path}/out/final' 'modeling_moss_speech/pretrained/moss-speech-nano'" in commands["ship"]
    assert sorted(path.name for path in shipped.iterdir()) == before  # a dry run copies nothing


def test_budget_recipe_ships_the_main_line_only_when_asked(tmp_path):
    commands = dict(line[3:].split(": ", 1) for line in _dry_run(tmp_path, "nano_budget.sh", NANO_SHIP="1",
                                                                 NANO_SHIP_DIR=str(tmp_path / "ship")))
    assert f"rm -rf '{tmp_path}/ship' && cp -r '{tmp_path}/out/final' '{tmp_path}/ship'" in commands["ship"]
    assert list(commands)[-1] == "ship"


def test_recipe_voices_rounds_knob(tmp_path):
    steps = [line[3:].split(":", 1)[0] for line in _dry_run(tmp_path, VOICES_ROUNDS="1")]
    assert "sft_voices_1" in steps and "stage2_voices_2" not in steps
    assert [s for s in steps if s.startswith("assemble")] == ["assemble"]


def test_ship_replaces_the_checkpoint_and_keeps_the_earlier_runs_results(tmp_path):
    out, ship = tmp_path / "out", tmp_path / "ship"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_text("new")
    (out / "eval").mkdir()
    (out / "eval" / "final_test.json").write_text("new")
    (out / "logs").mkdir()
    (out / "logs" / "timings.txt").write_text("stage1 1 s\n")
    (ship / "eval").mkdir(parents=True)
    (ship / "model.safetensors").write_text("old")
    (ship / "stale.bin").write_text("old")
    for name in ("final_test.json", "v1_final_test.json", "findings.md"):
        (ship / "eval" / name).write_text("old")
    # a real run of the ship step alone; the stand-in interpreter plays the model card step
    result = _run_recipe(tmp_path, "nano.sh", NANO_DRY_RUN="0", PYTHON=_stand_in_python(tmp_path), NANO_STEPS="ship",
                         NANO_SHIP="1", NANO_SHIP_DIR=str(ship))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (ship / "model.safetensors").read_text() == "new" and not (ship / "stale.bin").exists()
    assert (ship / "eval" / "final_test.json").read_text() == "new"
    assert (ship / "eval" / "v1_final_test.json").read_text() == "old"
    assert (ship / "eval" / "findings.md").read_text() == "old"
    assert (ship / "eval" / "training_times.txt").read_text() == "stage1 1 s\n"


def test_budget_recipe_steps_in_order(tmp_path):
    lines = _dry_run(tmp_path, "nano_budget.sh", ABLATION="1", ROUNDS="6")
    steps = [line[3:].split(":", 1)[0] for line in lines]
    order = ["corpus_voices", "codec_tokenizer_a", "corpus", "tokenizer", "text_model", "corpus_decoder",
             "codec_tokenizer", "prepare", "codec_decoder", "ablation_stage1", "ablation_stage2_1", "ablation_sft_1",
             "ablation_stage2_3", "ablation_sft_3", "ablation_sft_last", "ablation_assemble",
             "eval_ablation_final_test_seen_dialect",
             "stage1", "stage2_1", "sft_1", "stage2_2", "sft_2", "stage2_6", "sft_6", "sft_last",
             "frames_teacher_1", "frames_stage2_1", "frames_sft_1", "frames_teacher_2", "frames_stage2_2",
             "frames_sft_2", "assemble", "eval_final_test", "eval_final_test_seen_dialect", "eval_stage1_t2t",
             "report"]
    assert [s for s in steps if s in order] == order
    assert len(steps) == len(set(steps))
    commands = dict(line[3:].split(": ", 1) for line in lines)
    # the 12-voice corpus has no question voices; the tokenizer and the LLM read the one with them
    assert commands["corpus"].endswith("--question_voices none --overwrite --no_progress")
    assert "--question_voices" not in commands["corpus_voices"]
    for step in ("codec_tokenizer_a", "codec_tokenizer"):
        assert f"--corpus {tmp_path}/data/voices/corpus " in commands[step]
    # a curriculum: plain from scratch, then warped from the plain phase's weights; local from the first step (no
    # position table, windowed attention)
    assert "--init_from" not in commands["codec_tokenizer_a"] and "--vtlp" not in commands["codec_tokenizer_a"]
    assert "--vtlp 0.08 --time_stretch 0.1" in commands["codec_tokenizer"]
    assert "--max_minutes 12 " in commands["codec_tokenizer_a"] and "--max_minutes 30 " in commands["codec_tokenizer"]
    assert f"--init_from {tmp_path}/out/codec_tokenizer_a " in commands["codec_tokenizer"]
    for step in ("codec_tokenizer_a", "codec_tokenizer"):
        assert "--codec_config training/configs/nano_codec_local.json " in commands[step]
    assert f"--corpus {tmp_path}/data/voices/corpus --codec {tmp_path}/out/codec_tokenizer " in commands["prepare"]
    # the frame-level pairs weigh the rows that complete a word 30
    assert "--frames_word_end_weight 30 " in commands["prepare"]
    # the decoder: from scratch on the tokenizer's codes, the assistant's voice only, whole questions included
    assert commands["corpus_decoder"].endswith("--question_voices none --canonical_questions --num_workers 1 "
                                               "--overwrite --no_progress")
    decoder = commands["codec_decoder"]
    assert f"--codec {tmp_path}/out/codec_tokenizer --corpus {tmp_path}/data/decoder/corpus " in decoder
    assert "--canonical_only --inference_noise_scale 0" in decoder
    # its length is a number of steps (a slower machine gets the same decoder), capped in minutes
    assert "--max_steps 15000 --max_minutes 56 " in decoder
    assert f"--save_voices {tmp_path}/out/voices" in decoder
    # stage I from the text model (frozen vs not), then rounds of stage II + SFT, each from the previous SFT
    assert "--config training/configs/nano.yaml --init_from_text_model" in commands["stage1"]
    assert "--config training/configs/nano_ablation.yaml --init_from_text_model" in commands["ablation_stage1"]
    assert f"--model {tmp_path}/out/stage1 " in commands["stage2_1"]
    assert f"--model {tmp_path}/out/sft_1 " in commands["stage2_2"]
    assert f"--model {tmp_path}/out/ablation/sft_2 " in commands["ablation_stage2_3"]
    assert commands["stage2_1"].endswith("--max_steps 750 --seed 1 --output_dir " + f"{tmp_path}/out/stage2_1")
    assert "--max_steps 500 --seed 2 " in commands["stage2_2"]
    assert commands["sft_2"].endswith("--max_steps 500 --seed 2")
    # after the rounds, a last SFT of its own (twice a round's steps, the next seed); it is what both lines ship
    for prefix, root in (("", "out"), ("ablation_", "out/ablation")):
        last = commands[f"{prefix}sft_last"]
        assert f"--model_name_or_path {tmp_path}/{root}/sft_6 " in last
        assert last.endswith(f"--output_dir {tmp_path}/{root}/sft_last --max_steps 1000 --seed 7")
    # every round draws its own data orders, the ablation's the same as the main line's
    assert commands["sft_1"].endswith("--max_steps 1000 --seed 1") and commands["ablation_sft_3"].endswith("--seed 3")
    assert f"--dataset_name {tmp_path}/data/sft " in commands["sft_3"]
    # the main line (only) ends with three frame-level alignment rounds: a teacher from the model (text only: the twin
    # chats and the text set), stage II aligned to it row for row, SFT; the next round starts from that SFT
    for n, start in ((1, "sft_last"), (2, "frames_sft_1"), (3, "frames_sft_2")):
        teacher = commands[f"frames_teacher_{n}"]
        assert f"--model {tmp_path}/out/{start} " in teacher
        assert (f"--datasets {{path: {tmp_path}/data/pretrain/twin_text, kind: text}} "
                f"{{path: {tmp_path}/data/pretrain/text, kind: text}} ") in teacher
        assert "--text_mix_ratio 1 --max_steps 400 " in teacher
        stage2 = commands[f"frames_stage2_{n}"]
        assert f"--model {tmp_path}/out/{start} " in stage2 and "--max_steps 1000 " in stage2
        assert (f"--align_dataset {tmp_path}/data/pretrain/frames --align_weight 30 "
                f"--align_teacher {tmp_path}/out/frames_teacher_{n} ") in stage2
        assert f"--model_name_or_path {tmp_path}/out/frames_stage2_{n} " in commands[f"frames_sft_{n}"]
        assert commands[f"frames_sft_{n}"].endswith("--max_steps 500")
    assert not any(step.startswith("ablation_frames") for step in steps)
    assert "frames_teacher_4" not in commands
    for name, model in (("assemble", "frames_sft_3"), ("ablation_assemble", "ablation/sft_last")):
        assert f"--model {tmp_path}/out/{model} " in commands[name]
        assert f"--codec {tmp_path}/out/codec " in commands[name]
        assert f"--data {tmp_path}/data " in commands[name]
        assert f"--voices_dir {tmp_path}/out/voices " in commands[name]
    assert f"--corpus {tmp_path}/data/voices/corpus --split test_dialect" in commands["eval_final_test_dialect"]
    assert commands["report"].endswith(f"training/nano_report.py --eval {tmp_path}/out/eval --checkpoint "
                                       f"{tmp_path}/out/final")
    assert commands["ship"].startswith("not asked for, skipped")  # the budget recipe ships only when asked
    assert not (tmp_path / "out" / "final").exists()


def test_budget_recipe_defaults_make_the_main_line_only(tmp_path):
    lines = _dry_run(tmp_path, "nano_budget.sh")
    steps = [line[3:].split(":", 1)[0] for line in lines]
    # no ablation LLM by default (ABLATION=1 adds it to the decoder's lane); three rounds, the last SFT, then three
    # frame-level alignment rounds
    assert not any(step.startswith(("ablation_", "eval_ablation_")) for step in steps)
    assert "sft_3" in steps and "stage2_4" not in steps and "eval_stage1_t2t" in steps
    assert "frames_sft_3" in steps and "frames_teacher_4" not in steps
    commands = dict(line[3:].split(": ", 1) for line in lines)
    assert commands["sft_last"].endswith("--max_steps 1000 --seed 4")
    assert f"--model_name_or_path {tmp_path}/out/sft_3 " in commands["sft_last"]
    assert f"--model {tmp_path}/out/frames_sft_3 " in commands["assemble"]
    result = _run_recipe(tmp_path, "nano_budget.sh", ABLATION="yes")
    assert result.returncode == 2 and "ABLATION=yes" in result.stderr


def test_budget_recipe_main_lane_takes_every_thread_once_the_decoder_is_done(tmp_path):
    # every step of the stand-in interpreter logs its thread count; stage I outlasts the decoder
    log = tmp_path / "threads.log"
    python = _stand_in_python(tmp_path, f'echo "$OMP_NUM_THREADS $*" >> {log}\n'
                                        '[[ "$*" == *configs/nano.yaml* ]] && sleep 2\nexit 0')
    lane_steps = ("codec_decoder stage1 stage2_1 sft_1 sft_last frames_teacher_1 frames_stage2_1 frames_sft_1 assemble "
                  "eval_final_test")
    result = _run_recipe(tmp_path, "nano_budget.sh", NANO_DRY_RUN="0", PYTHON=python, THREADS="2", ROUNDS="1",
                         FRAMES_ROUNDS="1", NANO_STEPS=lane_steps)
    assert result.returncode == 0, result.stdout + result.stderr
    threads = {}
    for line in log.read_text().splitlines():
        count, command = line.split(" ", 1)
        threads.setdefault(command.split()[0], []).append(int(count))
    assert threads["training/train_speech_decoder.py"] == [1]
    pretrain = threads["training/pretrain.py"]  # stage I beside the decoder, then stage II, teacher, aligned stage II
    assert pretrain[0] == 1 and pretrain[1:] == [2, 2, 2]
    assert set(threads["training/sft.py"]) == {2} and set(threads["-m"]) == {2}


def test_budget_recipe_rounds_knob(tmp_path):
    lines = _dry_run(tmp_path, "nano_budget.sh", ROUNDS="1", THREADS="4", DECODER_STEPS="7", DECODER_MINUTES="3")
    steps = [line[3:].split(":", 1)[0] for line in lines]
    assert "sft_1" in steps and "stage2_2" not in steps and "ablation_stage2_2" not in steps
    commands = dict(line[3:].split(": ", 1) for line in lines)
    assert f"--model_name_or_path {tmp_path}/out/sft_1 " in commands["sft_last"]
    assert commands["sft_last"].endswith("--seed 2")
    assert f"--model {tmp_path}/out/sft_last " in commands["frames_teacher_1"]
    # each lane gets half the threads; the corpus of all voices, the warped tokenizer phase (after the lanes) and
    # `prepare` get them all
    assert "--threads 2" in commands["codec_tokenizer_a"] and "--num_workers 4" in commands["corpus_voices"]
    assert commands["codec_tokenizer"].endswith("--threads 4")
    assert "--max_steps 7 --max_minutes 3 " in commands["codec_decoder"]
    assert "--threads 4" in commands["prepare"]


def test_budget_recipe_lanes_run_side_by_side_and_a_failed_lane_fails_the_recipe(tmp_path):
    # every step of the stand-in interpreter sleeps a little; the text model fails
    python = _stand_in_python(tmp_path, 'sleep 0.2\n[[ "$*" == *train_text_model* ]] && exit 3\nexit 0')
    result = _run_recipe(tmp_path, "nano_budget.sh", NANO_DRY_RUN="0", PYTHON=python)
    assert result.returncode != 0
    assert "lanes: tokenizer or text failed" in result.stderr
    done = {path.name for path in (tmp_path / "out" / ".done").iterdir()}
    # the other lane ran to its end; nothing after the lanes ran
    assert {"corpus_voices", "codec_tokenizer_a", "corpus", "tokenizer"} <= done
    assert "text_model" not in done and "codec_tokenizer" not in done and "prepare" not in done
    assert (tmp_path / "out" / "logs" / "lane_tokenizer.log").is_file()


def test_budget_recipe_frames_knobs(tmp_path):
    lines = _dry_run(tmp_path, "nano_budget.sh", FRAMES_ROUNDS="1", FRAMES_TEACHER_STEPS="7", FRAMES_STAGE2_STEPS="8",
                     FRAMES_SFT_STEPS="9", FRAMES_WORD_END_WEIGHT="5")
    commands = dict(line[3:].split(": ", 1) for line in lines)
    assert "frames_sft_1" in commands and "frames_teacher_2" not in commands
    assert "--max_steps 7 " in commands["frames_teacher_1"] and "--max_steps 8 " in commands["frames_stage2_1"]
    assert commands["frames_sft_1"].endswith("--max_steps 9")
    assert "--frames_word_end_weight 5 " in commands["prepare"]
    assert f"--model {tmp_path}/out/frames_sft_1 " in commands["assemble"]
    # no frame-level round: the main line ships its last SFT
    commands = dict(line[3:].split(": ", 1) for line in _dry_run(tmp_path, "nano_budget.sh", FRAMES_ROUNDS="0"))
    assert "frames_teacher_1" not in commands and f"--model {tmp_path}/out/sft_last " in commands["assemble"]


def test_budget_recipe_refuses_the_removed_local_tokenizer_knob(tmp_path):
    # the tokenizer is local from its first step: the knob that added a local phase would otherwise be ignored
    result = _run_recipe(tmp_path, "nano_budget.sh", LOCAL_TOKENIZER_MINUTES="30")
    assert result.returncode == 2 and "LOCAL_TOKENIZER_MINUTES is gone" in result.stderr


def test_nano_report_tables_of_the_shipped_eval():
    sys.path.insert(0, str(ROOT / "training"))
    from nano_report import RUNS, SPLITS, report

    from modeling_moss_speech.pretrained import nano_path

    eval_dir = Path(nano_path()) / "eval"
    tables = report(eval_dir)
    for split in SPLITS:
        if (eval_dir / f"final_{split}.json").is_file():
            assert f"Split `{split}`" in tables
    for title, stem in RUNS:
        assert (title in tables) == any(eval_dir.glob(f"{stem}_test*.json")), title
    assert "| S->T |" in tables


def test_nano_report_writes_the_card_with_the_experiment_and_this_run_s_findings(tmp_path):
    sys.path.insert(0, str(ROOT / "training"))
    from nano_report import main

    from modeling_moss_speech.pretrained import nano_path

    checkpoint = tmp_path / "nano"
    shutil.copytree(nano_path(), checkpoint, ignore=shutil.ignore_patterns("*.safetensors", "eval"))
    eval_dir = tmp_path / "eval"
    shutil.copytree(Path(nano_path()) / "eval", eval_dir)
    tables = main(["--eval", str(eval_dir), "--checkpoint", str(checkpoint)])
    card = (checkpoint / "README.md").read_text()
    assert tables in card
    assert "**The experiment.** A closed world of 255 facts" in card  # the template's recipe section
    assert "**What they show, honestly.**" in card  # eval/findings.md
    (eval_dir / "findings.md").unlink()  # a fresh run of the recipe has no reading of its numbers yet
    main(["--eval", str(eval_dir), "--checkpoint", str(checkpoint)])
    assert "What they show" not in (checkpoint / "README.md").read_text()
    assert (checkpoint / "README.md").read_text().split("## Evaluation")[0] == card.split("## Evaluation")[0]


def test_levers_recipe_runs_differ_only_in_stage_two(tmp_path):
    commands = dict(line[3:].split(": ", 1) for line in _dry_run(tmp_path, "nano_levers.sh"))
    stage2 = {lever: commands[f"{lever}_stage2"] for lever in ("control", "wordmix", "align", "contrast")}
    base = "--model modeling_moss_speech/pretrained/moss-speech-nano "
    assert all(base in command for command in stage2.values())
    assert f"{tmp_path}/data/pretrain/wordmix --eval_datasets" in stage2["wordmix"]
    assert "--align" not in stage2["control"] + stage2["wordmix"] and "wordmix" not in stage2["control"]
    assert f"--align_dataset {tmp_path}/data/pretrain/align --align_weight 1 --output_dir" in stage2["align"]
    assert "--align_temperature 0.1 --align_batch_size 16" in stage2["contrast"]
    # the same SFT for every run, then eval JSON files named for nano_report.py's lever columns
    sft = {lever: commands[f"{lever}_sft"].replace(lever, "RUN") for lever in stage2}
    assert len(set(sft.values())) == 1
    assert commands["eval_contrast_test"].endswith(f"-o {tmp_path}/out/eval/lever_contrast_test.json")
    assert not (tmp_path / "out" / "control").exists()
    assert "corpus_reading" not in commands  # the reading corpus is made only for the reading lever
    bad = _run_recipe(tmp_path, "nano_levers.sh", LEVERS="nope")
    assert bad.returncode == 2 and "unknown lever 'nope'" in bad.stderr


def test_levers_recipe_reading_run_reads_its_own_corpus(tmp_path):
    commands = dict(line[3:].split(": ", 1) for line in _dry_run(tmp_path, "nano_levers.sh", LEVERS="control reading"))
    assert "--reading_voices 4 " in commands["corpus_reading"]
    assert f"--corpus {tmp_path}/data/reading/corpus " in commands["prepare_reading"]
    assert f"--output {tmp_path}/data/reading " in commands["prepare_reading"]
    run = (f"{tmp_path}/out/reading/", f"{tmp_path}/out/control/")
    reading, control = commands["reading_stage2"], commands["control_stage2"]
    assert reading.replace(f"{tmp_path}/data/reading/pretrain/", f"{tmp_path}/data/voices/pretrain/") \
        .replace(*run) == control
    assert commands["reading_sft"].replace(*run) == commands["control_sft"]


def test_nano_report_shows_the_lever_runs_it_finds(tmp_path):
    sys.path.insert(0, str(ROOT / "training"))
    from nano_report import report

    from modeling_moss_speech.pretrained import nano_path

    shipped = Path(nano_path()) / "eval" / "final_test.json"
    for stem in ("lever_control", "lever_align"):
        shutil.copy(shipped, tmp_path / f"{stem}_test.json")
    parts = report(tmp_path).split("\n\n")
    assert parts[0].startswith("Alignment levers, split `test`")
    header = parts[1].splitlines()[0]
    assert "lever: none (one more round)" in header and "lever: cosine state alignment" in header
    assert "starting point" not in header and "contrastive" not in header
    # with the levers' starting checkpoint (v2): the recipe's table shows it, the levers' table starts with it
    shutil.copy(shipped, tmp_path / "v2_final_test.json")
    parts = report(tmp_path).split("\n\n")
    assert parts[0].startswith("Split `test`") and "lever" not in parts[1] and "v2:" in parts[1]
    lever_header = parts[parts.index(next(p for p in parts if p.startswith("Alignment levers"))) + 1].splitlines()[0]
    assert lever_header.index("v2 (their starting point)") < lever_header.index("lever: none")
    # the frame-level lever's runs (from the 2-hour recipe's checkpoint) get tables of their own
    assert not any(p.startswith("Alignment levers from") for p in parts)
    shutil.copy(shipped, tmp_path / "budget_lever_frames_test.json")
    parts = report(tmp_path).split("\n\n")
    title = next(p for p in parts if p.startswith("Alignment levers from the 2-hour recipe's checkpoint, split `test`"))
    header = parts[parts.index(title) + 1].splitlines()[0]
    assert "lever: frame-level alignment" in header and "v2" not in header and "cosine" not in header


def test_levers_recipe_frames_run_trains_its_teacher_first(tmp_path):
    lines = _dry_run(tmp_path, "nano_levers.sh", LEVERS="control frames")
    names = [line[3:].split(": ", 1)[0] for line in lines]
    assert names.index("frames_teacher") < names.index("frames_stage2")
    commands = dict(line[3:].split(": ", 1) for line in lines)
    teacher = commands["frames_teacher"]
    assert "--model modeling_moss_speech/pretrained/moss-speech-nano " in teacher
    assert f"--datasets {{path: {tmp_path}/data/voices/pretrain/twin_text, kind: text}} " in teacher
    assert "--text_mix_ratio 1 --max_steps 400 " in teacher and f"--output_dir {tmp_path}/out/frames/teacher" in teacher
    frames, control = commands["frames_stage2"], commands["control_stage2"]
    extra = (f" --align_dataset {tmp_path}/data/voices/pretrain/frames --align_weight 30 "
             f"--align_teacher {tmp_path}/out/frames/teacher")
    run = (f"{tmp_path}/out/frames/", f"{tmp_path}/out/control/")
    assert frames.replace(extra, "").replace(*run) == control
    assert commands["frames_sft"].replace(*run) == commands["control_sft"]
    # the pairs' word-end weight reaches the step that makes them (1: unchanged rows)
    assert "--frames_word_end_weight 1 " in commands["prepare_voices"]
    weighted = dict(line[3:].split(": ", 1) for line in _dry_run(tmp_path, "nano_levers.sh", LEVERS="frames",
                                                                  FRAMES_WORD_END_WEIGHT="30"))
    assert weighted["prepare_voices"] == commands["prepare_voices"].replace("weight 1 ", "weight 30 ")


def test_nano_report_variant_rows_of_the_frame_level_lever(tmp_path):
    sys.path.insert(0, str(ROOT / "training"))
    from nano_report import report, variant_table

    from modeling_moss_speech.pretrained import nano_path

    shipped = Path(nano_path()) / "eval"
    shutil.copy(shipped / "final_test.json", tmp_path / "budget_lever_frames_test.json")
    assert variant_table(tmp_path) is None  # the recipe's own run has its tables; no variant, no rows
    for split, source in (("test", "final_test"), ("test_dialect", "budget_final_test_dialect")):
        shutil.copy(shipped / f"{source}.json", tmp_path / f"budget_lever_frames_noqa_{split}.json")
    table = variant_table(tmp_path)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert list(rows)[1:] == ["frame-level lever (nano_levers.sh)", "no spoken QA in stage II"]

    def percent(name: str) -> str:
        got = json.loads((shipped / f"{name}.json").read_text())["modes"]["s2t"]
        return f"{100 * got['correct'] / got['total']:.0f} %"

    cells = rows["no spoken QA in stage II"].strip("| ").split(" | ")
    assert cells[1] == f"{percent('final_test')} / {percent('budget_final_test_dialect')}"
    assert cells[3] == "n/a / n/a"  # no trained-facts file for this run
    assert table in report(tmp_path)


def test_local_codec_config_differs_from_the_nano_codec_only_by_its_attention_window():
    """training/configs/nano_codec_local.json is nano_codec.json with a local tokenizer: its encoder has no position
    table and a code depends on 41 feature frames (0.41 s), as training/README.md says."""
    import torch

    from modeling_moss_speech import MossSpeechCodecConfig
    from modeling_moss_speech.modeling_moss_speech_codec_encoder import MossSpeechCodecEncoder

    configs = ROOT / "training" / "configs"
    plain = json.loads((configs / "nano_codec.json").read_text())
    local = json.loads((configs / "nano_codec_local.json").read_text())
    window = local["encoder_config"].pop("encoder_attention_window")
    assert window == 6 and local == plain
    local["encoder_config"]["encoder_attention_window"] = window
    with torch.device("meta"):
        encoder = MossSpeechCodecEncoder(MossSpeechCodecConfig(**local).encoder_config)
    assert encoder.embed_positions is None and encoder.receptive_field == 41
