"""The MOSS-Speech-Nano LLM pipeline on a tiny synthetic world: tokenizer, text model, prepare_nano, and the data
it writes driving training/pretrain.py (stage I frozen, stage II with text mix) and training/sft.py.

Random audio and a tiny random codec stand in for espeak-ng and the trained nano codec: the formats are checked,
not what the models learn.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from helpers import tiny_codec_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_moss_speech import (
    MossSpeechCodecModel,
    MossSpeechConfig,
    MossSpeechForCausalLM,
    MossSpeechProcessor,
)
from modeling_moss_speech.feature_extraction_moss_speech import prepare_waveforms

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "processing", ROOT / "training"):
    sys.path.insert(0, str(_path))
import assemble_nano  # noqa: E402
import build_nano_tokenizer  # noqa: E402
import prepare_nano  # noqa: E402
import pretrain  # noqa: E402
import train_text_model  # noqa: E402

FACTS = [
    ("addition-000", "addition", "what is one plus one", "two", "train"),
    ("addition-001", "addition", "what is one plus two", "three", "heldout"),
    ("addition-002", "addition", "what is two plus two", "four", "train"),
    ("capital-000", "capital", "what is the capital of france", "paris", "train"),
    ("capital-001", "capital", "what is the capital of italy", "rome", "heldout"),
    ("colour-000", "colour", "what colour is the sky", "blue", "train"),
]
VOICES = ("en-us+f1", "en-us+m3")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def _flac(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    sf.write(buffer, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000, format="FLAC")
    return buffer.getvalue()


def tiny_corpus(path: Path) -> str:
    """A corpus in synthesize_espeak.py's layout: facts, train (train facts + words), validation (held-out)."""
    facts = [dict(zip(("fact_id", "category", "question", "answer", "fact_split"), f)) for f in FACTS]
    rows: dict[str, list[dict]] = {"train": [], "validation": []}

    def row(split: str, fact: dict | None, kind: str, voice: str, word: str = "", canonical: bool = False) -> None:
        text = word if kind == "word" else fact[kind]
        index = len(rows["train"]) + len(rows["validation"])
        rows[split].append({
            "utt_id": f"{fact['fact_id'] if fact else 'word/' + word}/{kind}/{voice}",
            "fact_id": fact["fact_id"] if fact else "", "category": fact["category"] if fact else "", "kind": kind,
            "text": text, "question": fact["question"] if fact else "", "answer": fact["answer"] if fact else "",
            "voice": voice, "speed": 160, "pitch": 50, "canonical": canonical,
            "audio": {"bytes": _flac(0.2 + 0.05 * len(text.split()), index), "path": None}})

    for fact in facts:
        if fact["fact_split"] == "train":
            for voice in VOICES:
                row("train", fact, "question", voice)
                row("train", fact, "answer", voice)
            row("train", fact, "answer", "en-us", canonical=True)
        else:
            row("validation", fact, "question", "en+m2")
    for word in ("one", "two", "rome", "italy"):
        row("train", None, "word", VOICES[0], word=word)
    splits = {"facts": datasets.Dataset.from_list(facts)}
    for name, items in rows.items():
        splits[name] = datasets.Dataset.from_list(items).cast_column("audio", datasets.Audio(sampling_rate=16000))
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Corpus, tokenizer (+ processor files), a random codec and prepare_nano's output, built once."""
    root = tmp_path_factory.mktemp("nano")
    corpus = tiny_corpus(root / "corpus")
    build_nano_tokenizer.build(corpus, root / "tokenizer")
    torch.manual_seed(0)
    MossSpeechCodecModel(tiny_codec_config()).save_pretrained(root / "codec")
    summary = prepare_nano.prepare(corpus, root / "codec", root / "tokenizer", root / "data", batch_size=4,
                                   progress=False)
    return {"root": str(root), "corpus": corpus, "tokenizer": str(root / "tokenizer"), "codec": str(root / "codec"),
            "data": str(root / "data"), "summary": summary}


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_roles_ids_and_roundtrip(world):
    tokenizer = AutoTokenizer.from_pretrained(world["tokenizer"])
    ids = build_nano_tokenizer.special_ids(tokenizer)
    assert [ids[k] for k in ("pad_token_id", "im_start_token_id", "im_end_token_id", "sosp_token_id",
                             "modality_pad_token_id")] == [0, 1, 2, 3, 4]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert 256 < len(tokenizer) <= build_nano_tokenizer.DEFAULT_VOCAB_SIZE
    for _, _, question, answer, _ in FACTS:
        for text in (question, answer):
            assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # a segment's first word and a later word are single tokens in both forms (the world's words are merged whole)
    assert len(tokenizer("paris", add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer("the capital", add_special_tokens=False)["input_ids"]) == 2
    # bytes outside the world still encode (byte-level BPE)
    assert tokenizer.decode(tokenizer("Zürich?", add_special_tokens=False)["input_ids"]) == "Zürich?"

    processor = MossSpeechProcessor.from_pretrained(world["tokenizer"])
    assert (processor.sosp_token_id, processor.modality_pad_token_id, processor.text_pad_token_id,
            processor.eosp_token_id, processor.audio_pad_token_id, processor.num_codes) == (3, 4, 0, 512, 513, 512)
    grid = processor([{"role": "user", "content": {"type": "audio", "codes": [5, 6]}}], output_modality="audio")
    rows = grid["input_ids"][0].tolist()
    assert rows[-1] == [3, 513] and [4, 5] in rows and [4, 512] in rows


def test_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        build_nano_tokenizer.train_tokenizer(["a b"], vocab_size=100)
    with pytest.raises(ValueError, match="non-empty"):
        build_nano_tokenizer.world_texts(["what"], [""])


# ------------------------------------------------------------------------------------------------ prepare_nano


def test_prepare_nano_formats(world):
    data = Path(world["data"])
    summary = world["summary"]
    codes = datasets.load_from_disk(str(data / "codes"))
    assert set(codes) == {"train", "validation"} and "codes" in codes["train"].column_names
    processor = MossSpeechProcessor.from_pretrained(world["tokenizer"])
    heldout = {f[0] for f in FACTS if f[4] == "heldout"}

    speech = datasets.load_from_disk(str(data / "pretrain" / "speech"))
    assert len(speech) == len(codes["train"])
    first = speech[0]["input_ids"]
    assert first[0] == [3, 513] and first[-1] == [4, 512] and all(r[0] == 4 for r in first[1:])
    interleaved = datasets.load_from_disk(str(data / "pretrain" / "interleaved"))
    assert sorted(set(interleaved["form"])) == ["s2t", "t2s"] and len(interleaved) == 2 * len(codes["train"])
    spoken = datasets.load_from_disk(str(data / "pretrain" / "spoken_qa"))
    # 4 train facts x 2 voices; question text -> canonical answer speech 3 times per train fact
    assert summary["datasets"]["pretrain/spoken_qa"]["forms"] == {"qa_s2s": 8, "qa_s2t": 8, "qa_t2s": 12}
    s2s = spoken[spoken["form"].index("qa_s2s")]["input_ids"]
    assert sum(r == [3, 513] for r in s2s) == 2 and s2s[-1] == [4, 512]
    # only train facts are ever speech; held-out facts are text only (text mix, T->T conversations)
    for name in ("speech", "interleaved", "spoken_qa"):
        utts = datasets.load_from_disk(str(data / "pretrain" / name))["utt_id"]
        assert not any(u.split("/")[0] in heldout for u in utts), name
    text = datasets.load_from_disk(str(data / "pretrain" / "text"))
    assert len(text) == 2 * len(FACTS)
    assert not any(r[0] == 4 for g in text["input_ids"] for r in g)  # text-only: no speech row

    # the chat T->T grid is exactly the processor's training layout
    chat = [g for g, f, u in zip(text["input_ids"], text["form"], text["utt_id"]) if f == "chat_t2t"
            and u == "capital-001"][0]
    (expected,) = processor.training_rows([[{"role": "user", "content": "what is the capital of italy"},
                                            {"role": "assistant", "content": "rome"}]])
    assert chat == expected["input_ids"].tolist()

    sft = datasets.load_from_disk(str(data / "sft"))
    modes = summary["datasets"]["sft/train"]["modes"]
    assert modes == {"s2s": 8, "s2t": 8, "t2s": 16, "t2t": 24}
    for example in sft["train"]:
        if example["mode"][0] == "s" or example["mode"][-1] == "s":
            assert example["fact_id"] not in heldout
    assert set(sft["validation"]["mode"]) == {"s2t"} and set(sft["validation"]["fact_id"]) == heldout
    s2s = next(e for e in sft["train"] if e["mode"] == "s2s")
    assert s2s["output_modality"] == "audio" and s2s["messages"][1]["content"]["codes"]
    # the SFT collator reads the conversations as they are
    from modeling_moss_speech.trainer.sft import MossSpeechDataCollator
    batch = MossSpeechDataCollator(processor)(list(sft["train"].select(range(4))))
    assert batch["input_ids"].shape[0] == 4 and (batch["labels"] != -100).any()


def test_prepare_nano_alignment_lever_data(world):
    """pretrain/wordmix speaks single-word utterances inside train-fact questions; pretrain/align pairs each train
    question utterance's S->T grid with its fact's T->T grid; neither holds a held-out fact."""
    data = Path(world["data"])
    processor = MossSpeechProcessor.from_pretrained(world["tokenizer"])
    codes = datasets.load_from_disk(str(data / "codes"))["train"]
    word_codes = {t: c for t, k, c in zip(codes["text"], codes["kind"], codes["codes"]) if k == "word"}
    heldout = {f[0] for f in FACTS if f[4] == "heldout"}

    wordmix = datasets.load_from_disk(str(data / "pretrain" / "wordmix"))
    assert len(wordmix) == 8 * 2  # 8 copies of each train fact with a speakable word ("one", "two")
    assert not any(u.rsplit("-", 1)[0] in heldout for u in wordmix["utt_id"])
    allowed = [word_codes["one"], word_codes["two"], word_codes["one"] * 2, word_codes["one"] + word_codes["two"],
               word_codes["two"] * 2]
    for grid, utt in zip(wordmix["input_ids"], wordmix["utt_id"]):
        segments = processor.grid_layout.split_rows(torch.tensor(grid))
        spoken = [s for s in segments if s.modality == "audio"]
        assert spoken, utt
        assert all(s.ids in allowed for s in spoken), utt
        fact = next(f for f in FACTS if f[0] == utt.rsplit("-", 1)[0])
        assert processor.tokenizer.decode([r[0] for r in grid[-2:-1]]).strip() == fact[3]

    align = datasets.load_from_disk(str(data / "pretrain" / "align"))
    questions = [u for u, k in zip(codes["utt_id"], codes["kind"]) if k == "question"]
    assert sorted(align["utt_id"]) == sorted(questions)
    for pair in align:
        fact = next(f for f in FACTS if f[0] == pair["utt_id"].split("/")[0])
        (expected,) = processor.training_rows([[{"role": "user", "content": fact[2]},
                                                {"role": "assistant", "content": fact[3]}]])
        assert pair["text_ids"] == expected["input_ids"].tolist()
        k = pair["suffix"]
        assert pair["speech_ids"][-k:] == pair["text_ids"][-k:]
        assert pair["speech_ids"][-k - 1] != pair["text_ids"][-k - 1]
        assert any(r[0] == processor.sosp_token_id for r in pair["speech_ids"])


def test_prepare_nano_reuses_the_codes_and_rejects_speech_of_heldout_facts(world, tmp_path, capsys):
    codes_dir = Path(world["data"]) / "codes"
    before = (codes_dir / "nano_codes.json").stat().st_mtime_ns
    prepare_nano.prepare(world["corpus"], world["codec"], world["tokenizer"], world["data"], progress=False)
    assert "reusing the codes" in capsys.readouterr().out
    assert (codes_dir / "nano_codes.json").stat().st_mtime_ns == before

    corpus = datasets.load_from_disk(world["corpus"])
    leaked = corpus["validation"].select([0])
    bad = datasets.DatasetDict({**corpus, "train": datasets.concatenate_datasets([corpus["train"], leaked])})
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="only train facts may appear as speech"):
        prepare_nano.prepare(tmp_path / "bad", world["codec"], world["tokenizer"], tmp_path / "out", progress=False)

    # a row with no fact id that still says a held-out question (a reading or word row gone wrong) is refused too
    said = leaked.remove_columns(["fact_id", "kind", "utt_id"])
    for column, value in (("fact_id", ""), ("kind", "reading"), ("utt_id", "reading/leak")):
        said = said.add_column(column, [value])
    bad = datasets.DatasetDict({**corpus, "train": datasets.concatenate_datasets([corpus["train"], said])})
    bad.save_to_disk(str(tmp_path / "bad_reading"))
    with pytest.raises(ValueError, match="question of a held-out fact"):
        prepare_nano.prepare(tmp_path / "bad_reading", world["codec"], world["tokenizer"], tmp_path / "out2",
                             progress=False)


def test_prepare_nano_speed_perturbation_adds_faster_and_slower_questions(world, tmp_path):
    """--speed_perturb: each train question is also encoded played faster / slower, as a voice of its own that the
    speech sets and conversations read, while the assistant's canonical answers stay the unperturbed recordings."""
    summary = prepare_nano.prepare(world["corpus"], world["codec"], world["tokenizer"], tmp_path / "data",
                                   batch_size=4, progress=False, speed_perturb=[0.8, 1.25])
    codes = datasets.load_from_disk(str(tmp_path / "data" / "codes"))["train"]
    plain = datasets.load_from_disk(str(Path(world["data"]) / "codes"))["train"]
    questions = [row for row in plain if row["kind"] == "question"]
    assert len(codes) == len(plain) + 2 * len(questions)
    assert codes.select(range(len(plain)))["codes"] == plain["codes"]  # the recordings themselves, unchanged
    added = codes.select(range(len(plain), len(codes)))
    assert [v.rsplit("@", 1) for v in added["voice"]] == [[q["voice"], f] for f in ("0.8", "1.25") for q in questions]
    assert not any(added["canonical"]) and set(added["kind"]) == {"question"}

    # each added row is its recording resampled: played 1.25 times as fast it is a fifth shorter
    corpus = datasets.load_from_disk(world["corpus"])["train"].cast_column("audio", datasets.Audio(decode=False))
    audio = {row["utt_id"]: row["audio"]["bytes"] for row in corpus}
    codec = MossSpeechCodecModel.from_pretrained(world["codec"]).eval()
    fast = added[len(questions)]
    wave, rate = sf.read(io.BytesIO(audio[fast["utt_id"].rsplit("@", 1)[0]]), dtype="float32")
    (resampled,) = prepare_waveforms(wave, round(rate * 1.25), target_rate=rate)
    assert abs(resampled.numel() - len(wave) / 1.25) <= 1
    assert fast["codes"] == codec.encode([resampled], sampling_rate=rate).codes[0].tolist()

    # 4 train facts x 2 voices x 3 speeds, each answered with the canonical recording
    assert summary["datasets"]["pretrain/spoken_qa"]["forms"] == {"qa_s2s": 24, "qa_s2t": 24, "qa_t2s": 12}
    assert summary["datasets"]["sft/train"]["modes"] == {"s2s": 24, "s2t": 24, "t2s": 16, "t2t": 24}
    canonical = {r["fact_id"]: r["codes"] for r in plain if r["canonical"]}
    sft = datasets.load_from_disk(str(tmp_path / "data" / "sft"))["train"]
    for example in sft:
        if example["mode"] == "s2s":
            assert example["messages"][1]["content"]["codes"] == canonical[example["fact_id"]]
    manifest = json.loads((tmp_path / "data" / "codes" / "nano_codes.json").read_text())
    assert manifest["speed_perturb"] == [0.8, 1.25]  # another set of speeds encodes again

    for bad, error in (([1.0], ValueError), ([0.9, 0.9], ValueError), ([3.0], ValueError), (["fast"], TypeError)):
        with pytest.raises(error, match="speed_perturb"):
            prepare_nano.check_speed_perturb(bad)
    with pytest.raises(ValueError, match="differ from 1"):
        prepare_nano.make_parser().parse_args_and_config(["--codec", "c", "--speed_perturb", "1"])


# ------------------------------------------------------------------------------------------------ training


def load_sft_script():
    spec = importlib.util.spec_from_file_location("moss_speech_sft_script_nano", ROOT / "training" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_text_model_then_stage1_stage2_and_sft_run_on_the_prepared_data(world, tmp_path):
    text_dir = tmp_path / "text_model"
    result = train_text_model.main([
        "--corpus", world["corpus"], "--tokenizer", world["tokenizer"], "--output", str(text_dir),
        "--max_steps", "3", "--eval_every", "0", "--log_every", "1", "--batch_size", "4", "--hidden_size", "32",
        "--num_layers", "2", "--num_heads", "2", "--num_kv_heads", "1", "--head_dim", "16",
        "--intermediate_size", "64", "--max_minutes", "1"])
    assert result["step"] == 3 and result["total"] == len(FACTS) and 0.0 <= result["accuracy"] <= 1.0
    assert set(result["by_split"]) == {"train", "heldout"}
    assert (text_dir / "model.safetensors").is_file() and (text_dir / "text_eval.json").is_file()
    text_model = AutoModelForCausalLM.from_pretrained(text_dir)
    assert text_model.config.model_type == "qwen3" and not text_model.config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(text_dir).pad_token_id == 0

    # the recipe yamls, with paths and sizes pointed at the tiny world
    data = Path(world["data"])
    stage1 = yaml.safe_load((ROOT / "training" / "configs" / "nano.yaml").read_text())
    ids = build_nano_tokenizer.special_ids(AutoTokenizer.from_pretrained(world["tokenizer"]))
    assert {k: stage1["config_overrides"][k] for k in stage1["config_overrides"]} == {
        k: ids[k] for k in ("sosp_token_id", "modality_pad_token_id", "pad_token_id", "eosp_token_id",
                            "audio_pad_token_id")}
    assert stage1["audio_vocab_size"] == ids["audio_vocab_size"] and stage1["stage"] == "stage1"
    common = ["--max_steps", "2", "--per_device_batch_size", "2", "--max_length", "64", "--log_every", "1",
              "--eval_every", "0", "--save_every", "0", "--progress_bar", "false", "--warmup_steps", "0"]

    def paths(recipe: dict) -> list[str]:
        out = []
        for key in ("datasets", "eval_datasets"):
            entries = []
            for entry in recipe[key]:
                if isinstance(entry, dict):
                    entries.append({**entry, "path": str(data / Path(entry["path"]).relative_to("data/nano"))})
                else:
                    entries.append(str(data / Path(entry).relative_to("data/nano")))
            out += [f"--{key}", *(json.dumps(e) if isinstance(e, dict) else e for e in entries)]
        return out

    s1 = pretrain.main(["--config", str(ROOT / "training" / "configs" / "nano.yaml"), *paths(stage1), *common,
                        "--init_from_text_model", str(text_dir), "--num_shared_layers", "1",
                        "--output_dir", str(tmp_path / "stage1")])
    assert s1["step"] == 2 and s1["eval"]
    model = MossSpeechForCausalLM.from_pretrained(tmp_path / "stage1")
    assert model.config.sosp_token_id == 3 and model.config.audio_vocab_size == 520
    # stage I froze the text backbone
    assert torch.equal(model.model.embed_tokens.weight, text_model.model.embed_tokens.weight)

    stage2 = yaml.safe_load((ROOT / "training" / "configs" / "nano_stage2.yaml").read_text())
    assert stage2["stage"] == "stage2" and stage2["text_mix_ratio"] > 0
    s2 = pretrain.main(["--config", str(ROOT / "training" / "configs" / "nano_stage2.yaml"), *paths(stage2),
                        *common, "--model", str(tmp_path / "stage1"), "--output_dir", str(tmp_path / "stage2")])
    assert s2["step"] == 2 and s2["history"][-1]["text_only_sequences"] >= 0

    ablation = yaml.safe_load((ROOT / "training" / "configs" / "nano_ablation.yaml").read_text())
    assert ablation["stage"] == "stage2" and ablation["init_from_text_model"] == stage1["init_from_text_model"]
    assert {k: v for k, v in ablation.items() if k not in ("stage", "output_dir")} == \
        {k: v for k, v in stage1.items() if k not in ("stage", "output_dir")}

    script = load_sft_script()
    argv = ["--config", str(ROOT / "training" / "configs" / "nano_sft.yaml"),
            "--model_name_or_path", str(tmp_path / "stage2"), "--processor_name_or_path", world["tokenizer"],
            "--dataset_name", str(data / "sft"), "--output_dir", str(tmp_path / "sft"), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
            "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true", "--warmup_steps", "0",
            "--eval_steps", "2"]
    trainer = script.main(*script.make_parser().parse_args_and_config(argv))
    assert trainer.state.global_step == 2
    # the validation split (S->T of held-out facts) is evaluated
    assert any("eval_text_loss" in entry for entry in trainer.state.log_history)
    assert MossSpeechForCausalLM.from_pretrained(tmp_path / "sft").config.eosp_token_id == 512

    # the shipped layout: LLM + processor + codec/ + voices/, loadable through the Auto classes
    final = tmp_path / "final"
    from transformers import AutoProcessor

    from modeling_moss_speech import MossSpeechVoicePrompt
    codec = MossSpeechCodecModel.from_pretrained(world["codec"])
    (tmp_path / "voices").mkdir()
    prompt = codec.voice_prompt(np.full(8000, 0.01, np.float32), 16000)
    prompt.save(str(tmp_path / "voices" / "canonical.safetensors"))
    info = assemble_nano.assemble(tmp_path / "sft", world["tokenizer"], world["codec"], final, world["corpus"],
                                  world["data"], voices=["en-us", VOICES[0]], voice_seconds=0.5,
                                  voices_dir=tmp_path / "voices", max_mb=None)
    assert set(info["voices"]) == {"en-us", VOICES[0], "canonical"} and (final / "codec" / "config.json").is_file()
    processor = AutoProcessor.from_pretrained(final)
    assert processor.codec is not None and processor.sosp_token_id == 3
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.generation_config.do_sample is False
    assert MossSpeechVoicePrompt.load(str(final / "voices" / "en-us.safetensors")).tokens.numel() > 0
    inputs = processor([{"role": "user", "content": "what is two plus two"}], output_modality="audio")
    out = model.generate(**inputs, max_new_tokens=3)
    assert processor.batch_decode(out, decode_audio=False)[0].codes.numel() <= 3
    with pytest.raises(ValueError, match="not the codec the training data"):
        other = tmp_path / "other_codec"
        torch.manual_seed(1)
        MossSpeechCodecModel(tiny_codec_config()).save_pretrained(other)
        assemble_nano.assemble(tmp_path / "sft", world["tokenizer"], other, tmp_path / "bad", world["corpus"],
                               world["data"], max_mb=None)


# ------------------------------------------------------------------------------------------------ probes


def test_nano_probe_asks_each_question_four_ways(world, tmp_path):
    import nano_probe

    processor = MossSpeechProcessor.from_pretrained(world["tokenizer"])
    question, codes = "what is the capital of italy", [5, 6, 7]
    text = nano_probe.text_prompt(processor, question)
    mixed = nano_probe.last_word_spoken_prompt(processor, question, codes)
    italy = processor.tokenizer(" italy", add_special_tokens=False)["input_ids"]
    speech = processor.grid_layout.speech_rows(codes)
    # the written prompt with the rows of its last word (and only those) replaced by the word's speech segment
    start = next(i for i in range(len(mixed)) if mixed[i:i + len(speech)] == speech)
    assert mixed[:start] == text[:start] and mixed[start + len(speech):] == text[start + len(italy):]
    assert [row[0] for row in text[start:start + len(italy)]] == italy
    with pytest.raises(ValueError, match="at least two words"):
        nano_probe.last_word_spoken_prompt(processor, "italy", codes)

    ids = build_nano_tokenizer.special_ids(processor.tokenizer)
    torch.manual_seed(0)
    model = MossSpeechForCausalLM(MossSpeechConfig(
        vocab_size=len(processor.tokenizer), audio_vocab_size=ids["audio_vocab_size"], hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_shared_layers=1, num_modality_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, **{k: ids[k] for k in ("sosp_token_id", "modality_pad_token_id",
                                                                    "pad_token_id", "eosp_token_id",
                                                                    "audio_pad_token_id")}))
    model.save_pretrained(tmp_path / "model")
    for file in Path(world["tokenizer"]).iterdir():
        (tmp_path / "model" / file.name).write_bytes(file.read_bytes())
    result = nano_probe.main(["--model", str(tmp_path / "model"), "--data", world["data"], "--splits", "validation",
                              "--voices", "2", "-o", str(tmp_path / "probe.json")])
    assert json.loads((tmp_path / "probe.json").read_text()) == json.loads(json.dumps(result))
    held = result["validation"]  # the two held-out facts; only "two" and "italy" were spoken alone in training
    assert held["questions"] == 2 and held["text"]["total"] == held["spoken"]["total"] == 2
    assert held["last_word_spoken"]["total"] == 4 and held["word_codes"] == {"correct": 0, "total": 0,
                                                                              "accuracy": None}
    assert all(0 <= held[f]["correct"] <= held[f]["total"] for f in nano_probe.FORMS)
    assert 0.0 <= held["transcript"]["words_in_place"] <= 1.0
    with pytest.raises(ValueError, match="no codes/"):
        nano_probe.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path)])
    with pytest.raises(ValueError, match="lack the splits"):
        nano_probe.main(["--model", str(tmp_path / "model"), "--data", world["data"], "--splits", "test"])
    torch.manual_seed(1)  # a checkpoint whose codec did not make the codes
    MossSpeechCodecModel(tiny_codec_config()).save_pretrained(tmp_path / "model" / "codec")
    with pytest.raises(ValueError, match="fingerprints differ"):
        nano_probe.main(["--model", str(tmp_path / "model"), "--data", world["data"], "--splits", "validation"])


def test_frame_twins_and_twin_text(world):
    """pretrain/frames (built when the codec has a CTC head): each train question utterance of a train fact (and each
    reading sentence) with its text twin row for row; pretrain/twin_text: every fact's chat with repeated words."""
    from helpers import ctc_config

    processor = MossSpeechProcessor.from_pretrained(world["tokenizer"])
    maker = prepare_nano.GridMaker(processor)
    facts = [dict(zip(("fact_id", "category", "question", "answer", "fact_split"), f)) for f in FACTS]
    g = torch.Generator().manual_seed(0)

    def row(utt_id: str, fact_id: str, kind: str, text: str, n: int) -> dict:
        return {"utt_id": utt_id, "fact_id": fact_id, "kind": kind, "text": text,
                "codes": torch.randint(0, 64, (n,), generator=g).tolist()}

    codes = datasets.DatasetDict({"train": datasets.Dataset.from_list([
        row("addition-000/question/v", "addition-000", "question", "what is one plus one", 40),
        row("capital-000/question/v", "capital-000", "question", "what is the capital of france", 50),
        row("addition-001/question/v", "addition-001", "question", "what is one plus two", 40),  # held out
        row("word/one/word/v", "", "word", "one", 10),
        row("reading/what_colour_is_two/v", "", "reading", "what colour is two", 30),
        row("addition-002/question/v", "addition-002", "question", "what is two plus two", 8),  # too short
    ])})
    torch.manual_seed(0)
    codec = MossSpeechCodecModel(ctc_config()).eval()
    frames = prepare_nano.frames_dataset(codes, facts, maker, codec, answer_weight=10.0)
    assert list(frames["utt_id"]) == ["addition-000/question/v", "capital-000/question/v",
                                      "reading/what_colour_is_two/v"]
    layout = processor.grid_layout
    for pair, source in zip(frames, [codes["train"][i] for i in (0, 1, 4)]):
        speech, text, weights = pair["speech_ids"], pair["text_ids"], pair["weights"]
        assert len(speech) == len(text) == len(weights)
        start = next(i for i, r in enumerate(speech) if r[0] == layout.sosp_token_id)
        end = start + len(source["codes"]) + 1  # the eosp row
        assert [r[1] for r in speech[start + 1:end]] == source["codes"] and speech[end][1] == layout.eosp_token_id
        assert speech[:start] == text[:start] and speech[end + 1:] == text[end + 1:]
        segment = text[start:end + 1]
        assert all(r[1] == layout.audio_pad_token_id for r in segment)
        said = [processor.tokenizer.decode([r[0]]).strip() for r in segment]
        collapsed = [w for k, w in enumerate(said) if k == 0 or w != said[k - 1]]
        assert collapsed == source["text"].split() and said[0] == collapsed[0] and said[-2:] == [collapsed[-1]] * 2
        heard = weights.index(1.0)
        assert heard > start and set(weights[:heard]) == {0.0}
        assert weights.count(10.0) == 1
        answer_row = weights.index(10.0)
        if source["kind"] == "reading":  # the inference prompt: its last row predicts the answer
            assert answer_row == len(speech) - 1
        else:
            fact = next(f for f in facts if f["fact_id"] == source["fact_id"])
            assert processor.tokenizer.decode([speech[answer_row + 1][0]]).strip() == fact["answer"]

    # word ends weighted: exactly the code rows at which the twin turns to a later word, the rest unchanged
    weighted = prepare_nano.frames_dataset(codes, facts, maker, codec, answer_weight=10.0, word_end_weight=30.0)
    for pair, plain, source in zip(weighted, frames, [codes["train"][i] for i in (0, 1, 4)]):
        text, weights = pair["text_ids"], pair["weights"]
        start = next(i for i, r in enumerate(pair["speech_ids"]) if r[0] == layout.sosp_token_id)
        heard = plain["weights"].index(1.0)
        turns = [i for i in range(heard + 1, start + len(source["codes"]) + 1) if text[i][0] != text[i - 1][0]]
        assert len(turns) == len(source["text"].split()) - 1
        assert [i for i, w in enumerate(weights) if w == 30.0] == turns
        assert [w for i, w in enumerate(weights) if i not in turns] == [w for i, w in enumerate(plain["weights"])
                                                                         if i not in turns]
    for bad in (0.0, -1.0, True, "30"):
        with pytest.raises(ValueError, match="word_end_weight"):
            prepare_nano.frames_dataset(codes, facts, maker, codec, word_end_weight=bad)
    with pytest.raises(ValueError, match="frames_word_end_weight must be a number > 0"):
        prepare_nano.prepare("no-corpus", "no-codec", "no-tokenizer", "no-output", frames_word_end_weight=0)
    with pytest.raises(ValueError, match="--frames_word_end_weight"):
        prepare_nano.make_parser().parse_args_and_config(["--codec", "c", "--frames_word_end_weight", "0"])

    twins = prepare_nano.twin_text_dataset(facts, maker, copies=3, max_repeat=4, seed=0)
    assert len(twins) == 3 * len(facts) and set(twins["form"]) == {"twin_t2t"}
    lengths = set()
    for grid, utt in zip(twins["input_ids"], twins["utt_id"]):
        fact = next(f for f in facts if f["fact_id"] == utt.rsplit("-", 1)[0])
        chat = maker.chat_t2t(fact["question"], fact["answer"])
        question = processor.tokenizer(fact["question"], add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(chat)) if [r[0] for r in chat[i:i + len(question)]] == question)
        extra = len(grid) - len(chat)
        assert grid[:start] == chat[:start] and grid[start + len(question) + extra:] == chat[start + len(question):]
        tokens = [r[0] for r in grid[start:start + len(question) + extra]]
        runs = [(t, sum(1 for _ in group)) for t, group in itertools.groupby(tokens)]
        assert [t for t, _ in runs] == question and all(1 <= n <= 4 for _, n in runs)
        lengths.add(len(grid))
    assert len(lengths) > 1
