"""Supervised fine-tuning: the collator's grids and labels, the TRL trainer subclass, LoRA presets, training/sft.py.

Tiny random models, the tiny word-level tokenizer and a tiny codec; real espeak-ng speech where audio is encoded.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import torchaudio
from helpers import (
    AUDIO_PAD,
    EOSP,
    IM_END,
    MODALITY_PAD,
    PAD,
    SOSP,
    espeak,
    tiny_codec_config,
    tiny_config,
    tiny_tokenizer,
)
from transformers import TrainerCallback

from modeling_moss_speech import MossSpeechCodecModel, MossSpeechForCausalLM, MossSpeechProcessor
from modeling_moss_speech.trainer.sft import (
    MossSpeechDataCollator,
    MossSpeechSFTTrainer,
    channel_target_counts,
    prepare_sft_config,
)
from modeling_moss_speech.trainer.stages import LORA_PRESETS, lora_config

peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
NL, IM_START = 1, 281
USER, ASSISTANT, SYSTEM = [IM_START, 244, NL], [IM_START, 43, NL], [IM_START, 210, NL]
TEXT_SYSTEM = [271, 40, 28, 94, 43, 2, 178, 263, 215, 162, 2]  # you are a helpful assistant. respond with text outputs.
SPOKEN_SYSTEM = TEXT_SYSTEM[:8] + [205] + TEXT_SYSTEM[9:]     # ... respond with spoken outputs.
HELLO, GOOD_DAY, PARIS = [92], [83, 60], [164]


@pytest.fixture(scope="module")
def codec() -> MossSpeechCodecModel:
    torch.manual_seed(0)
    return MossSpeechCodecModel(tiny_codec_config()).eval()


@pytest.fixture(scope="module")
def processor(codec) -> MossSpeechProcessor:
    return MossSpeechProcessor.from_model_config(tiny_config(), tiny_tokenizer(), codec=codec)


@pytest.fixture(scope="module")
def speech() -> tuple[torch.Tensor, int]:
    return espeak("What is the capital of France?")


def text(ids: list[int]) -> list[list[int]]:
    return [[i, AUDIO_PAD] for i in ids]


def spoken(codes: list[int]) -> list[list[int]]:
    return [[SOSP, AUDIO_PAD]] + [[MODALITY_PAD, c] for c in codes] + [[MODALITY_PAD, EOSP]]


def codes(values: list[int]) -> dict:
    return {"type": "audio", "codes": values}


def load_script():
    spec = importlib.util.spec_from_file_location("moss_speech_sft_script", ROOT / "training" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ collator


@pytest.mark.parametrize("answer", ["text", "audio"])
def test_training_rows_are_the_inference_prompt_plus_the_answer(processor, answer):
    user = [{"role": "user", "content": "what is the capital of france"}]
    content = "paris" if answer == "text" else codes([5, 6, 7])
    (item,) = processor.training_rows([user + [{"role": "assistant", "content": content}]])
    prompt = processor(user, output_modality=answer)["input_ids"][0].tolist()
    rows = item["input_ids"].tolist()
    body = text(PARIS) if answer == "text" else spoken([5, 6, 7])
    if answer == "audio":  # the audio prompt already ends with the answer's start-of-speech row
        assert prompt[-1] == [SOSP, AUDIO_PAD]
        prompt = prompt[:-1]
    assert rows == prompt + body + text([IM_END, NL])
    assert item["assistant_masks"].tolist() == [False] * len(prompt) + [True] * (len(body) + 1) + [False]


def test_collator_labels_only_assistant_turns_both_channels(processor):
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "good day"},
        {"role": "user", "content": codes([1, 2])},
        {"role": "assistant", "content": codes([3, 4, 5])},
    ]
    batch = MossSpeechDataCollator(processor)([{"messages": conversation}])
    rows = batch["input_ids"][0].tolist()
    expected = (
        text(USER + HELLO + [IM_END, NL])
        + text(ASSISTANT + GOOD_DAY + [IM_END, NL])
        + text(USER) + spoken([1, 2]) + text([IM_END, NL])
        + text(SYSTEM + SPOKEN_SYSTEM + [IM_END, NL])  # default system turn: after the history, before the answer
        + text(ASSISTANT) + spoken([3, 4, 5]) + text([IM_END, NL])
    )
    assert rows == expected
    labels = batch["labels"][0].tolist()
    trained = {i: label for i, label in enumerate(labels) if label != [-100, -100]}
    first = len(USER + HELLO) + 2 + len(ASSISTANT)          # "good day" starts here
    second = len(expected) - 2 - 5                          # start-of-speech row of the spoken answer
    assert trained == {
        first: [83, -100], first + 1: [60, -100], first + 2: [IM_END, -100],             # text answer + stop
        second: [SOSP, -100], second + 1: [-100, 3], second + 2: [-100, 4], second + 3: [-100, 5],
        second + 4: [-100, EOSP], second + 5: [IM_END, -100],                            # speech answer + stop
    }
    assert batch["attention_mask"].tolist() == [[1] * len(rows)]


def test_right_and_left_padding_give_the_same_loss(processor):
    examples = [
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "good day"}]},
        {"messages": [{"role": "user", "content": codes([1, 2, 3, 4, 5, 6])},
                      {"role": "assistant", "content": codes([7, 8])}], "output_modality": "audio"},
    ]
    right = MossSpeechDataCollator(processor)(examples)
    left = MossSpeechDataCollator(processor, padding_side="left", pad_to_multiple_of=8)(examples)
    lengths = right["attention_mask"].sum(1).tolist()
    total = right["input_ids"].shape[1]
    assert left["input_ids"].shape[1] % 8 == 0 and left["input_ids"].shape[1] >= total
    for i, n in enumerate(lengths):
        assert right["attention_mask"][i].tolist() == [1] * n + [0] * (total - n)
        assert torch.equal(right["input_ids"][i, :n], left["input_ids"][i, -n:])
        assert torch.equal(right["labels"][i, :n], left["labels"][i, -n:])
        assert right["input_ids"][i, n:].tolist() == [[PAD, AUDIO_PAD]] * (total - n)
        assert (right["labels"][i, n:] == -100).all() and (left["labels"][i, :-n] == -100).all()
    torch.manual_seed(0)
    model = MossSpeechForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        a, b = model(**right), model(**left)
    torch.testing.assert_close(a.text_loss, b.text_loss)
    torch.testing.assert_close(a.audio_loss, b.audio_loss)


def test_audio_dict_at_44k_is_resampled_and_arrow_none_fields_ignored(processor, codec, speech):
    wav, rate = speech
    wav44 = torchaudio.functional.resample(wav, rate, 44100)
    # Arrow gives every struct field to every message: None for the ones a turn does not use.
    user = {"type": "audio", "array": wav44.numpy(), "sampling_rate": 44100, "text": None, "codes": None}
    answer = {"type": "text", "text": "paris", "array": None, "sampling_rate": None, "codes": None}
    batch = MossSpeechDataCollator(processor)([{"messages": [{"role": "user", "content": user},
                                                             {"role": "assistant", "content": answer}]}])
    rows = batch["input_ids"][0]
    got = rows[(rows[:, 0] == MODALITY_PAD), 1][:-1]  # the user turn's codes (eosp row dropped)
    expected = codec.encode([wav44], sampling_rate=44100)
    assert got.tolist() == expected.codes[0].tolist()
    assert len(got) == math.ceil(len(wav) / rate * 12.5)
    assert batch["labels"][0, -3:, 0].tolist() == [164, IM_END, -100]


def test_bad_inputs(processor, caplog):
    collator = MossSpeechDataCollator(processor)
    with pytest.raises(ValueError, match=r"conversations\[0\] has no assistant turn"):
        collator([{"messages": [{"role": "user", "content": "hello"}]}])
    with pytest.raises(ValueError, match="empty"):
        collator([{"messages": [{"role": "user", "content": {"array": [], "sampling_rate": 16000}},
                                {"role": "assistant", "content": "hello"}]}])
    with pytest.raises(ValueError, match=r"\['codes'\] is empty"):
        collator([{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": codes([])}]}])
    with pytest.raises(ValueError, match="'messages' column"):
        collator([{"text": "hello"}])
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left'"):
        MossSpeechDataCollator(processor, padding_side="middle")
    with pytest.raises(ValueError, match="unknown LoRA preset 'tails'; choose one of"):
        lora_config("tails")
    with pytest.raises(ValueError, match="packing"):
        prepare_sft_config(output_dir="unused", use_cpu=True, packing=True)
    long = [{"messages": [{"role": "user", "content": "hello " * 40}, {"role": "assistant", "content": "good day"}]}]
    with pytest.raises(ValueError, match="more than max_length=32"):
        MossSpeechDataCollator(processor, max_length=32, truncation="error")(long)
    with caplog.at_level(logging.WARNING):
        cut = MossSpeechDataCollator(processor, max_length=32)(long)
    assert "cut from the left" in caplog.text
    full = MossSpeechDataCollator(processor)(long)
    assert cut["input_ids"].shape[1] == 32 and torch.equal(cut["input_ids"][0], full["input_ids"][0, -32:])
    assert cut["labels"][0, -4:, 0].tolist() == [83, 60, IM_END, -100]  # the answer and its stop survive


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_presets_target_our_module_names():
    expected = {
        "audio_tail": {"audio_block"},
        "both_tails": {"text_block", "audio_block"},
        "all_linear": {"shared_block", "text_block", "audio_block"},
    }
    assert set(LORA_PRESETS) == set(expected)
    for preset, blocks in expected.items():
        torch.manual_seed(0)
        model = peft.get_peft_model(MossSpeechForCausalLM(tiny_config()), lora_config(preset, r=4, alpha=8))
        wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and n.endswith("_proj")}
        assert {n.split(".")[3] for n in wrapped} == blocks
        per_layer = 7 * sum({"shared_block": 2, "text_block": 1, "audio_block": 1}[b] for b in blocks)
        assert len(wrapped) == per_layer  # q, k, v, o, gate, up, down of every layer of those blocks
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert all("lora_" in n or "modules_to_save" in n for n in trainable)
        assert {n.split(".modules_to_save")[0].split(".")[-1] for n in trainable if "modules_to_save" in n} == {
            "audio_lm_head", "audio_embed"}


def test_merged_lora_reloads_with_the_peft_logits(processor, tmp_path):
    torch.manual_seed(0)
    model = peft.get_peft_model(MossSpeechForCausalLM(tiny_config()), lora_config("both_tails", r=4, alpha=8))
    batch = MossSpeechDataCollator(processor)([
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": codes([3, 4, 5])}]}])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # make the adapters and the saved modules non-trivial
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        before = model(**batch)
    model.merge_and_unload().save_pretrained(tmp_path)
    reloaded = MossSpeechForCausalLM.from_pretrained(tmp_path).eval()
    assert not any("lora" in n or "modules_to_save" in n for n in reloaded.state_dict())
    with torch.no_grad():
        after = reloaded(**batch)
    torch.testing.assert_close(after.text_logits, before.text_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.audio_logits, before.audio_logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ trainer


def conversation_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        user = {"type": "text", "text": "what is the capital of france", "codes": None}
        answer = {"type": "audio", "text": None, "codes": [(7 * i + j) % 60 for j in range(5 + i)]}
        if i % 2:
            user, answer = {"type": "audio", "text": None, "codes": [1, 2, 3]}, {"type": "text", "text": "good day",
                                                                                 "codes": None}
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return rows


def trainer_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3,
                  logging_steps=1, report_to="none", save_strategy="no", bf16=False, use_cpu=True,
                  gradient_checkpointing=False, dataloader_num_workers=0, disable_tqdm=True)
    values.update(overrides)
    return prepare_sft_config(**values)


def test_accumulated_loss_equals_the_full_batch_loss(processor, tmp_path):
    torch.manual_seed(0)
    model = MossSpeechForCausalLM(tiny_config())
    data = datasets.Dataset.from_list(conversation_rows(4))
    trainer = MossSpeechSFTTrainer(model, args=trainer_args(tmp_path), train_dataset=data, processing_class=processor)
    assert "forward" not in vars(model)  # TRL's fused single-head forward is removed again
    collator = trainer.data_collator
    parts = [collator([data[0]]), collator([data[1], data[2]])]
    counts = sum(channel_target_counts(p["labels"]) for p in parts)
    samples, num_items = trainer.get_batch_samples(iter(parts), 2, torch.device("cpu"))
    assert len(samples) == 2 and num_items.tolist() == counts.tolist() and (counts > 0).all()
    model.eval()
    with torch.no_grad():
        accumulated = sum(trainer.compute_loss(model, p, num_items_in_batch=counts) for p in parts)
        full = model(**collator([data[0], data[1], data[2]])).loss
    torch.testing.assert_close(accumulated, full)
    trainer.log({})  # the model is in eval mode: the per-channel losses are logged with the eval_ prefix
    assert set(trainer.state.log_history[-1]) >= {"eval_text_loss", "eval_audio_loss"}


def test_overfits_one_batch(processor, tmp_path):
    torch.manual_seed(0)
    model = MossSpeechForCausalLM(tiny_config())
    data = datasets.Dataset.from_list(conversation_rows(2))
    args = trainer_args(tmp_path, max_steps=100, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0)
    trainer = MossSpeechSFTTrainer(model, args=args, train_dataset=data, processing_class=processor)

    class StopWhenLearned(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            if len(losses) > 1 and losses[-1] <= 0.1 * losses[0]:
                control.should_training_stop = True

    trainer.add_callback(StopWhenLearned())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) <= 100 and losses[-1] <= 0.1 * losses[0], losses
    print(f"overfit: {losses[0]:.3f} -> {losses[-1]:.4f} in {len(losses)} steps")


def test_evaluate_reports_both_channels(processor, tmp_path):
    torch.manual_seed(0)
    data = datasets.Dataset.from_list(conversation_rows(3))
    trainer = MossSpeechSFTTrainer(MossSpeechForCausalLM(tiny_config()), args=trainer_args(tmp_path),
                                   train_dataset=data, processing_class=processor)
    metrics = trainer.evaluate(data)  # one batch of 3: the loss is the sum of the two channel means
    assert metrics["eval_text_loss"] > 0 and metrics["eval_audio_loss"] > 0
    assert math.isclose(metrics["eval_loss"], metrics["eval_text_loss"] + metrics["eval_audio_loss"], rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------ training/sft.py


@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory, codec):
    """A saved tiny model, a processor with its codec saved inside, and a dataset with real espeak-ng speech."""
    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    MossSpeechForCausalLM(tiny_config()).save_pretrained(root / "model")
    MossSpeechProcessor.from_model_config(tiny_config(), tiny_tokenizer(), codec=codec).save_pretrained(root / "proc")

    def audio(sentence: str) -> dict:
        wav, rate = espeak(sentence)
        return {"type": "audio", "array": wav.tolist(), "sampling_rate": rate, "text": None, "codes": None}

    def words(sentence: str) -> dict:
        return {"type": "text", "array": None, "sampling_rate": None, "text": sentence, "codes": None}

    rows = [
        {"messages": [{"role": "user", "content": audio("What is the capital of France?")},
                      {"role": "assistant", "content": words("paris")}], "output_modality": "text"},
        {"messages": [{"role": "user", "content": words("hello")},
                      {"role": "assistant", "content": audio("Hello there, good day.")}], "output_modality": None},
        {"messages": [{"role": "user", "content": audio("Tell me a story.")},
                      {"role": "assistant", "content": {"type": "audio", "array": None, "sampling_rate": None,
                                                        "text": None, "codes": [1, 2, 3, 4]}}],
         "output_modality": "audio"},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(root / "data"))
    return root


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sft_script_three_steps(sft_inputs, tmp_path, mode):
    script = load_script()
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(sft_inputs / "model"), "--processor_name_or_path", str(sft_inputs / "proc"),
            "--dataset_name", str(sft_inputs / "data"), "--output_dir", str(out), "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--learning_rate", "1e-3",
            "--max_length", "256", "--bf16", "false", "--use_cpu", "true", "--report_to", "none",
            "--save_strategy", "no", "--disable_tqdm", "true"]
    if mode == "lora":
        argv += ["--use_peft", "--lora_preset", "audio_tail", "--lora_r", "4", "--lora_alpha", "8", "--merge_lora"]
    trainer = script.main(*script.make_parser().parse_args_and_config(argv))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and trainer.state.global_step == 3
    for entry in logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["text_loss"]) and math.isfinite(entry["audio_loss"])
    reloaded = MossSpeechForCausalLM.from_pretrained(out)
    original = MossSpeechForCausalLM.from_pretrained(sft_inputs / "model")
    changed = {n for n, p in reloaded.state_dict().items() if not torch.equal(p, original.state_dict()[n])}
    if mode == "lora":  # audio_tail: the audio tail's projections (merged), the audio embedding and head
        assert changed and all(n.startswith(("model.audio_block.", "model.audio_embed.", "audio_lm_head.")) for n in
                               changed)
        assert any("audio_block" in n and "_proj" in n for n in changed)
    else:
        assert any(n.startswith("model.shared_block.") for n in changed)
    assert MossSpeechProcessor.from_pretrained(out).codec is not None


def test_sft_script_reads_a_config_file(tmp_path):
    script = load_script()
    config = tmp_path / "sft.yaml"
    config.write_text("model_name_or_path: some/model\ndataset_name: some/data\nstage: audio_tail_only\n"
                      "use_peft: true\nlora_preset: both_tails\nmax_length: 512\noutput_dir: out\nuse_cpu: true\n")
    script_args, training_args, model_args = script.make_parser().parse_args_and_config(
        ["--config", str(config), "--lora_r", "8"])
    assert (script_args.stage, script_args.lora_preset, model_args.lora_r) == ("audio_tail_only", "both_tails", 8)
    assert model_args.use_peft and training_args.max_length == 512 and model_args.model_name_or_path == "some/model"
