"""Tables of the MOSS-Speech-Nano evaluation, and the shipped checkpoint's model card with them.

    python training/nano_report.py --eval outputs/nano/eval \
        --checkpoint modeling_moss_speech/pretrained/moss-speech-nano

Reads the `moss-speech eval` JSON files of the recipe (`final_*.json`, `ablation_final_*.json` and the stage-I text
checks `stage1_test_t2t.json` / `ablation_stage1_test_t2t.json`; also `v5_final_*.json` and `v4_final_*.json` (the
checkpoints shipped before, made by chains of recipes), `v3_final_*.json` (made by
`training/recipes/nano.sh`), `v2_final_*.json` (the checkpoint before its robust-codes round) and
`v1_final_*.json` / `v1_ablation_final_*.json` (the earlier recipe without the voices round)
where present, kept with the shipped checkpoint as the before columns; `budget_final_*.json` /
`budget_ablation_final_*.json` (training/recipes/nano_budget.sh's latest run, renamed; its earlier runs',
`budget1_*`, `budget2_*` and `budget3_*`, and the one-command versions' `budget5_*` and `budget6_*`, are kept
beside them and read by no table; `budget_local_final_*.json`, its main line retrained on the codes of a local
tokenizer, `training/configs/nano_codec_local.json`);
`lever_<run>_*.json` of `training/recipes/nano_levers.sh`, and `budget_lever_<run>_*.json`, its runs from the 2-hour
recipe's checkpoint, the frame-level lever's variants among them), prints the Markdown tables (one column per run
found, per split; the variants: one row each) and writes `README.md` (the nano model card: the experiment from
`model_cards/moss_speech_nano.md`, these tables, and the hand-written reading of this run's results, `findings.md` of
the eval directory, where there is one) into `--checkpoint`.

Without running the recipe, the tables of the shipped checkpoint:

    python training/nano_report.py --eval modeling_moss_speech/pretrained/moss-speech-nano/eval
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from modeling_moss_speech.apps.evaluation import markdown_comparison
from modeling_moss_speech.apps.script_utils import ScriptArgumentParser, threads_field
from modeling_moss_speech.hub.publish import render_model_card
from modeling_moss_speech.threads import set_threads

# How spoken answers are scored: first by a recogniser independent of the codec, then by the codec's own CTC head.
SCORING = ("S->S and T->S: the spoken answer, decoded by the codec in the canonical voice, is heard first by an "
           "independent recogniser (PocketSphinx with a grammar of the world's 135 answers; it hears 121 of 135 "
           "(90 %) clean canonical espeak-ng answer words right), then read by the codec's own CTC head (secondary: "
           "it shares the codec's features). The codec round trip is heard the same way, with a grammar of the "
           "world's questions. Runs evaluated before independent scoring (eval schema /1) have the CTC rows only.")

SPLITS = {"test": "held-out facts (seen only as text), held-out voice — the transfer test",
          "test_seen": "facts trained as speech, held-out voice",
          "test_dialect": "held-out facts, held-out dialect and voice",
          "test_seen_dialect": "facts trained as speech, held-out dialect and voice"}
# (column title, file stem) of every run a table may show, in column order
RUNS = (("shipped (v6): nano_budget.sh, one command, 101 min", "final"),
        ("v5: v4 + a second frame-level round, word ends weighted 30", "v5_final"),
        ("v4 + a second frame-level round, unweighted", "v4_round2_final"),
        ("v4: 2-hour recipe on local codes + frame-level lever round", "v4_final"),
        ("no freezing, local codes (ablation, no lever round)", "ablation_final"),
        ("v3: frozen stage I + voices round + robust codes + sentence decoder (nano.sh)", "v3_final"),
        ("v2: frozen stage I + voices round, before the robust codes", "v2_final"),
        ("v1: frozen stage I, no voices round", "v1_final"),
        ("v1: no freezing, no voices round", "v1_ablation_final"),
        ("2-hour recipe (nano_budget.sh): frozen stage I", "budget_final"),
        ("2-hour recipe: no freezing", "budget_ablation_final"),
        ("2-hour recipe's main line on local codes (tokenizer made local)", "budget_local_final"))
# training/recipes/nano_levers.sh: one more round from a checkpoint (these were run from v2), with or without an
# alignment lever; their own tables, their starting checkpoint as the first column
LEVER_RUNS = (("v2 (their starting point)", "v2_final"),
              ("lever: none (one more round)", "lever_control"),
              ("lever: word-level interleaving", "lever_wordmix"),
              ("lever: cosine state alignment", "lever_align"),
              ("lever: contrastive state alignment", "lever_contrast"))
# the same recipe from the 2-hour recipe's main checkpoint (nano_levers.sh with BASE at it): the frame-level lever
BUDGET_LEVER_RUNS = (("2-hour recipe (their starting point)", "budget_final"),
                     ("lever: none (one more round)", "budget_lever_control"),
                     ("lever: frame-level alignment", "budget_lever_frames"))
# Variants of the frame-level lever, each run by hand as nano_levers.sh's frames run with one change (findings.md
# says which): one row per run, the transfer beside the trained facts, test voice / dialect voice
FRAMES_VARIANTS = (("frame-level lever (nano_levers.sh)", "budget_lever_frames"),
                   ("+ twin chats in stage II's text mix", "budget_lever_frames_twin"),
                   ("+ twin chats, stage II from the teacher", "budget_lever_frames_teacher"),
                   ("+ spliced reading sentences", "budget_lever_frames_splice"),
                   ("+ spliced reading sentences + twin chats", "budget_lever_frames_splice_twin"),
                   ("+ reading sentences said by 12 voices", "budget_lever_frames_reading12"),
                   ("no spoken QA in stage II", "budget_lever_frames_noqa"),
                   ("no spoken QA in stage II, weight 100", "budget_lever_frames_noqa_w100"),
                   ("local codes: from the main line on local codes (v4)", "budget_lever_frames_local"),
                   ("local codes + reading sentences said by 12 voices", "budget_lever_frames_local_reading12"),
                   ("local codes + spliced reading sentences", "budget_lever_frames_local_splice"),
                   ("local codes + random word sequences, 3,000 steps", "budget_lever_frames_local_babble"),
                   ("local codes + random word sequences + 12-voice reading, 3,000 steps",
                    "budget_lever_frames_local_babble_reading12"),
                   ("local codes, rows that end a word weigh 10", "budget_lever_frames_local_wordend10"),
                   ("local codes, rows that end a word weigh 30", "budget_lever_frames_local_wordend30"),
                   ("local codes, rows that end a word weigh 100", "budget_lever_frames_local_wordend100"),
                   ("local codes, word ends weigh 30 + random sequences + 12-voice reading, 3,000 steps",
                    "budget_lever_frames_local_wordend30_babble_reading12"))
VARIANT_COLUMNS = (("held-out S->T", "s2t", ("test", "test_dialect")),
                   ("held-out S->S (recogniser)", "s2s", ("test", "test_dialect")),
                   ("trained S->T", "s2t", ("test_seen", "test_seen_dialect")),
                   ("trained S->S (recogniser)", "s2s", ("test_seen", "test_seen_dialect")))
# Hand-written reading of one run's results, kept in its eval directory and appended to the card's evaluation.
FINDINGS = "findings.md"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def variant_table(eval_dir: Path) -> str | None:
    """Markdown: one row per `FRAMES_VARIANTS` run found, each cell `test % / dialect %` of one mode and fact set;
    None when fewer than two are there (nothing to compare; the recipe's own run has the tables above)."""
    found = [(name, stem) for name, stem in FRAMES_VARIANTS if (eval_dir / f"{stem}_test.json").is_file()]
    if len(found) < 2:
        return None

    def cell(results: dict[str, dict | None], mode: str, splits: tuple[str, ...]) -> str:
        got = [None if results[split] is None else results[split]["modes"].get(mode) for split in splits]
        return " / ".join("n/a" if g is None else f"{100 * g['correct'] / g['total']:.0f} %" for g in got)

    lines = ["| stage II of the round | " + " | ".join(title for title, _, _ in VARIANT_COLUMNS) + " |",
             "|---|" + "---|" * len(VARIANT_COLUMNS)]
    splits = dict.fromkeys(split for _, _, pair in VARIANT_COLUMNS for split in pair)
    for name, stem in found:
        results = {split: _load(eval_dir / f"{stem}_{split}.json") for split in splits}  # each file read once
        lines.append(f"| {name} | " + " | ".join(cell(results, mode, pair) for _, mode, pair in VARIANT_COLUMNS)
                     + " |")
    return ("Variants of the frame-level lever (each one more round from the 2-hour recipe's checkpoint, SFT "
            "500 steps after; cells: test voice / dialect voice, greedy decoding):\n\n" + "\n".join(lines))


def report(eval_dir: Path) -> str:
    """Markdown: one comparison table per split found (the recipe's runs, then the lever runs), plus text retention
    right after stage I."""
    parts = []
    for runs_of, title in ((RUNS, "Split"), (LEVER_RUNS, "Alignment levers, split"),
                           (BUDGET_LEVER_RUNS, "Alignment levers from the 2-hour recipe's checkpoint, split")):
        for split, meaning in SPLITS.items():
            runs = {name: _load(eval_dir / f"{stem}_{split}.json") for name, stem in runs_of}
            runs = {k: v for k, v in runs.items() if v is not None}
            if runs_of is not RUNS and len(runs) == (runs_of[0][0] in runs):
                continue  # no lever run in this directory
            if runs:
                count = next(iter(runs.values()))["counts"]["spoken_questions"]
                parts.append(f"{title} `{split}` ({meaning}; {count} spoken questions, greedy decoding):\n\n"
                             + markdown_comparison(runs))
    variants = variant_table(eval_dir)
    if variants:
        parts.append(variants)
    stage1 = {name: _load(eval_dir / f"{stem}_test_t2t.json")
              for name, stem in (("frozen stage I", "stage1"), ("no freezing", "ablation_stage1"))}
    stage1 = {k: v for k, v in stage1.items() if v is not None}
    if stage1:
        parts.append("Text knowledge right after stage I (T->T on the `test` facts):\n\n" + markdown_comparison(stage1))
    if not parts:
        raise ValueError(f"no evaluation results in {str(eval_dir)!r}.")
    return "\n\n".join([*parts, SCORING])


@dataclass
class NanoReportArguments:
    """Flags of `training/nano_report.py`."""

    eval: str = field(default="outputs/nano/eval", metadata={"help": "Directory of the recipe's eval JSON files."})
    checkpoint: str | None = field(default=None, metadata={
        "help": "Write the model card (README.md) into this checkpoint."})
    repo_id: str = field(default="moss-speech/MOSS-Speech-Nano", metadata={"help": "Hub repo id the card names."})
    threads: int | None = threads_field()


def make_parser() -> ScriptArgumentParser:
    """The command-line parser (`--config file.yaml` and the flags of `NanoReportArguments`)."""
    return ScriptArgumentParser(NanoReportArguments, description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> str:
    """Print the tables of the eval JSON files (and write the model card with `--checkpoint`); returns them."""
    (args,) = make_parser().parse_args_and_config(argv)
    set_threads(args.threads)
    tables = report(Path(args.eval))
    print(tables)
    if args.checkpoint:
        evaluation = (tables + "\n\nMeasured with `moss-speech eval` (JSON in this checkpoint's `eval/` folder). "
                      "Targets for facts trained as speech, asked in unseen voices: S->T >= 85 %, S->S >= 70 %; "
                      "for facts known only as text: S->T >= 30 %.")
        findings = Path(args.eval) / FINDINGS
        if findings.is_file():  # the reading of these numbers belongs to this run only, so it lives beside them
            evaluation += "\n\n" + findings.read_text().strip()
        card = render_model_card(args.checkpoint, card="nano", repo_id=args.repo_id, codec_location="codec",
                                 values={"evaluation": evaluation})
        (Path(args.checkpoint) / "README.md").write_text(card)
    return tables


if __name__ == "__main__":
    main()
