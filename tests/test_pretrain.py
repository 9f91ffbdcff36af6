"""training/pretrain.py: exact resume, stage I freezing, packing, text mix, overfitting, recipe errors, DDP (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from helpers import AUDIO_PAD, EOSP, MODALITY_PAD, SOSP, audio_rows, make_prompt, text_rows, tiny_config
from transformers import Qwen3Config, Qwen3ForCausalLM

from modeling_moss_speech import MossSpeechForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
import pretrain  # noqa: E402
import pretrain_data  # noqa: E402

TEXT_BACKBONE = ("model.embed_tokens.", "model.shared_block.", "model.text_block.", "model.text_norm.",
                 "text_lm_head.")


def save_model(path: Path, seed: int = 0) -> str:
    torch.manual_seed(seed)
    MossSpeechForCausalLM(tiny_config()).save_pretrained(path)
    return str(path)


def save_grids(path: Path, grids: list) -> str:
    rows = [g.tolist() if isinstance(g, torch.Tensor) else g for g in grids]
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(path))
    return str(path)


def speech_only(seed: int, n_codes: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return audio_rows(torch.randint(0, EOSP, (n_codes,), generator=g).tolist())


def text_only(seed: int, n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return text_rows(torch.randint(0, 250, (n,), generator=g).tolist())


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


@pytest.fixture
def mixed_data(tmp_path) -> str:
    """Speech-only, interleaved and text-only sequences of varied lengths in one dataset."""
    grids = [speech_only(i, 4 + 3 * i) for i in range(4)] + [make_prompt(10 + i, 8 + 2 * i) for i in range(4)]
    grids += [text_only(20 + i, 6 + i) for i in range(3)]
    return save_grids(tmp_path / "data", grids)


def argv(model: str, data: str | list, out: Path, **overrides) -> list[str]:
    values = dict(model=model, datasets=data if isinstance(data, list) else [data], output_dir=str(out),
                  stage="stage2", max_length=32, per_device_batch_size=2, gradient_accumulation_steps=1,
                  learning_rate=1e-3, warmup_steps=1, max_steps=3, log_every=1, progress_bar=False, seed=0)
    values.update(overrides)
    out = []
    for key, value in values.items():  # a list flag takes its entries as separate values; a mapping as JSON text
        if value == []:  # an empty list: no flag
            continue
        out += [f"--{key}", *(v if isinstance(v, str) else json.dumps(v) for v in
                              (value if isinstance(value, list) else [value]))]
    return out


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, mixed_data, monkeypatch):
    model = save_model(tmp_path / "init")
    common = dict(max_steps=6, save_every=3, gradient_accumulation_steps=2, text_mix_ratio=0.3,
                  eval_datasets=[mixed_data], eval_every=3)
    full = pretrain.main(argv(model, mixed_data, tmp_path / "full", **common))
    assert [h["step"] for h in full["history"]] == [1, 2, 3, 4, 5, 6]
    assert full["history"][-1]["epoch"] >= 1  # the run crosses an epoch boundary

    class Crash(Exception):
        pass

    save = pretrain.save_checkpoint

    def save_then_crash(accelerator, output_dir, step, limit):
        save(accelerator, output_dir, step, limit)
        raise Crash(step)

    monkeypatch.setattr(pretrain, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        pretrain.main(argv(model, mixed_data, tmp_path / "split", **common))
    monkeypatch.setattr(pretrain, "save_checkpoint", save)
    first = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    second = pretrain.main(argv(model, mixed_data, tmp_path / "split", resume_from="latest", **common))
    assert [h["step"] for h in second["history"]] == [4, 5, 6]

    resumed = [h for h in first if "loss" in h] + second["history"]
    for key in ("loss", "text_loss", "audio_loss", "lr", "grad_norm"):
        assert [h[key] for h in resumed] == [h[key] for h in full["history"]], key  # exact in float32 on CPU
    assert [e["eval_loss"] for e in second["eval"]] == [e["eval_loss"] for e in full["eval"][1:]]
    with pytest.raises(ValueError, match="data settings changed \\(per_device_batch_size: 2 -> 1\\)"):
        pretrain.main(argv(model, mixed_data, tmp_path / "other", **dict(
            common, resume_from=str(tmp_path / "split" / "checkpoint-3"), per_device_batch_size=1)))
    a = MossSpeechForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    b = MossSpeechForCausalLM.from_pretrained(tmp_path / "split").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_stage1_leaves_the_text_backbone_bit_identical(tmp_path, mixed_data):
    model = save_model(tmp_path / "init")
    result = pretrain.main(argv(model, mixed_data, tmp_path / "out", stage="stage1", learning_rate=1e-2,
                                text_mix_ratio=0.0))
    before = MossSpeechForCausalLM.from_pretrained(model).state_dict()
    after = MossSpeechForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    frozen = [k for k in before if k.startswith(TEXT_BACKBONE)]
    trained = [k for k in before if not k.startswith(TEXT_BACKBONE)]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    assert result["trainable_parameters"] == sum(before[k].numel() for k in trained)


def test_scan_grids_reads_the_selected_rows():
    grids = [speech_only(1, 5), text_only(3, 4), speech_only(2, 7)]
    data = datasets.Dataset.from_dict({"input_ids": grids}).select([2, 1])  # an indices mapping, reordered
    lengths, text_only_flags = pretrain_data._scan_grids(data, MODALITY_PAD, "auto", "memory")
    assert lengths.tolist() == [len(grids[2]), len(grids[1])] and text_only_flags.tolist() == [False, True]


def test_packed_batch_equals_the_sequences_alone(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    model = MossSpeechForCausalLM(config).eval()
    grids = [torch.tensor(speech_only(1, 5)), make_prompt(2, 9), torch.tensor(text_only(3, 4))]
    source = pretrain.GridSource([{"path": save_grids(tmp_path / "d", grids), "kind": "auto"}], MODALITY_PAD)
    assert source.text_only.tolist() == [False, False, True]

    def batch_for(pack: bool) -> dict:
        plan = pretrain.plan_epoch(source, 0, 0, max_length=64, pack=pack, shuffle=False)
        rows = pretrain.PackedRows(source, plan, config)
        return pretrain.RowCollator(config, pack)([rows[i] for i in range(len(rows))])

    packed = batch_for(pack=True)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed  # one row, positions only
    lengths = [len(g) for g in grids]
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert packed["position_ids"][0, : sum(lengths)].tolist() == sum((list(range(n)) for n in lengths), [])
    assert all((packed["labels"][0, s] == -100).all() for s in starts)  # no target across a boundary
    with torch.no_grad():
        out = pretrain.forward_batch(model, packed)
        for grid, start in zip(grids, starts):
            alone = model(grid[None], use_cache=False)
            n = len(grid)
            torch.testing.assert_close(out.text_logits[0, start : start + n], alone.text_logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(out.audio_logits[0, start : start + n], alone.audio_logits[0], atol=1e-5,
                                       rtol=0)
        separate = batch_for(pack=False)  # one right-padded sequence per row, with an attention mask
        assert separate["input_ids"].shape[0] == 3 and "position_ids" not in separate
        ref = pretrain.forward_batch(model, separate)
        for key in ("loss", "text_loss", "audio_loss"):
            torch.testing.assert_close(getattr(out, key), getattr(ref, key), atol=1e-5, rtol=0)
        # the position resets are what keeps the sequences apart: plain positions let them see each other
        leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
        assert not torch.allclose(pretrain.forward_batch(model, leaky).text_logits[0, starts[1]],
                                  out.text_logits[0, starts[1]], atol=1e-3)


def test_long_sequences_are_cut_into_pieces(tmp_path):
    source = pretrain.GridSource([{"path": save_grids(tmp_path / "d", [make_prompt(0, 20)]), "kind": "speech"}],
                                 MODALITY_PAD)
    plan = pretrain.plan_epoch(source, 0, 0, max_length=8, pack=False)
    assert plan.length.tolist() == [8, 8, 5] and plan.start.tolist() == [0, 8, 16]


def test_text_mix_ratio_is_respected(tmp_path):
    speech = save_grids(tmp_path / "speech", [speech_only(i, 3 + i % 5) for i in range(30)])
    text = save_grids(tmp_path / "text", [text_only(100 + i, 3 + i % 4) for i in range(50)])
    model = save_model(tmp_path / "init")
    result = pretrain.main(argv(model, [speech, {"path": text, "kind": "auto"}], tmp_path / "out",
                                text_mix_ratio=0.25, pack=False, per_device_batch_size=4, max_steps=20))
    last = result["history"][-1]
    assert last["sequences"] == 80  # two epochs of 30 speech + round(30 * 0.25 / 0.75) = 10 text sequences
    assert last["text_only_sequences"] == 20

    source = pretrain.GridSource([{"path": speech, "kind": "auto"}, {"path": text, "kind": "text"}], MODALITY_PAD)
    for ratio in (0.0, 0.1, 0.5, 0.8):
        plan = pretrain.plan_epoch(source, 3, 0, 64, pack=True, text_mix_ratio=ratio)
        expected = round(30 * ratio / (1 - ratio))
        assert plan.text_only.sum() == expected and (~plan.text_only).sum() == 30
    # successive epochs walk through the whole text pool before repeating a sequence
    drawn = [pretrain.plan_epoch(source, e, 0, 64, pack=True, text_mix_ratio=0.25).example for e in range(5)]
    text_examples = [x for plan in drawn for x in plan.tolist() if x >= 30]
    assert sorted(text_examples[:50]) == list(range(30, 80))
    natural = pretrain.plan_epoch(source, 0, 0, 64, pack=True)
    assert natural.text_only.sum() == 50


def test_overfitting_one_batch(tmp_path):
    data = save_grids(tmp_path / "one", [make_prompt(5, 12), speech_only(6, 8)])
    model = save_model(tmp_path / "init")
    result = pretrain.main(argv(model, data, tmp_path / "out", max_steps=40, learning_rate=1e-2, warmup_steps=5,
                                log_every=1))
    losses = [h["loss"] for h in result["history"]]  # losses[0]: before any update
    assert len(losses) == 40
    assert min(losses) <= 0.1 * losses[0], (losses[0], min(losses))


def test_init_from_text_model_and_yaml_recipe(tmp_path, mixed_data):
    torch.manual_seed(0)
    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        tie_word_embeddings=False))
    qwen.save_pretrained(tmp_path / "qwen")
    recipe = {
        "init_from_text_model": str(tmp_path / "qwen"), "num_shared_layers": 2, "audio_vocab_size": 80,
        "config_overrides": {"sosp_token_id": SOSP, "modality_pad_token_id": MODALITY_PAD, "pad_token_id": 280,
                             "eosp_token_id": EOSP, "audio_pad_token_id": AUDIO_PAD},
        "stage": "stage1", "datasets": [mixed_data], "max_length": 32, "learning_rate": "1e-3",  # YAML string
        "max_steps": 5, "progress_bar": False, "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    overrides = {**recipe["config_overrides"], "pad_token_id": 281}  # a mapping flag replaces the recipe's mapping
    result = pretrain.main(["--config", str(tmp_path / "recipe.yaml"), "--max_steps=2", "--log_every", "1",
                            "--config_overrides", json.dumps(overrides)])
    assert result["step"] == 2
    trained = MossSpeechForCausalLM.from_pretrained(tmp_path / "out")
    assert (trained.config.num_shared_layers, trained.config.pad_token_id) == (2, 281)
    torch.testing.assert_close(trained.text_lm_head.weight, qwen.lm_head.weight, atol=0, rtol=0)  # frozen in stage1
    saved = yaml.safe_load((tmp_path / "out" / "pretrain_recipe.yaml").read_text())
    assert saved["learning_rate"] == 1e-3 and saved["max_steps"] == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"stage": "stage3"}, "recipe key 'stage' must be one of"),
        ({"datasets": ["/no/such/dataset"]}, r"datasets\[0\]: dataset path '/no/such/dataset' does not exist"),
        ({"max_length": 1}, "'max_length' must be >= 2"),
        ({"text_mix_ratio": 1.5}, "'text_mix_ratio' must be in \\[0, 1\\]"),
        ({"mixed_precision": "fp8"}, "'mixed_precision' must be one of"),
        ({"init_from_text_model": "qwen"}, "exactly one of 'model'"),
        ({"datasets": []}, "'datasets' must list at least one"),
    ],
)
def test_bad_recipe_values(tmp_path, mixed_data, overrides, message):
    with pytest.raises(ValueError, match=message):
        pretrain.make_parser().parse_args_and_config(argv(str(tmp_path), mixed_data, tmp_path / "out", **overrides))


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"learning_rate": "fast"}, "key 'learning_rate' of .* must be a number, got 'fast'"),
        ({"max_steps": 2.5}, "key 'max_steps' of .* must be an integer, got 2.5"),
        ({"pack": "maybe"}, "key 'pack' of .* must be true or false"),
        ({"max_stepz": 3}, "unknown keys \\['max_stepz'\\]"),
    ],
)
def test_bad_recipe_file(tmp_path, mixed_data, recipe, message):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=message):
        pretrain.make_parser().parse_args_and_config(["--config", str(tmp_path / "recipe.yaml"),
                                                       *argv(str(tmp_path), mixed_data, tmp_path / "out")])


def test_bad_flags_exit_with_usage(tmp_path, mixed_data, capsys):
    with pytest.raises(SystemExit):
        pretrain.make_parser().parse_args_and_config(argv(str(tmp_path), mixed_data, tmp_path / "out",
                                                          learning_rate="fast"))
    assert "invalid float value: 'fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--max_stepz"):
        pretrain.make_parser().parse_args_and_config(argv(str(tmp_path), mixed_data, tmp_path / "out", max_stepz=3))


def test_text_mix_needs_text_only_data(tmp_path):
    speech = save_grids(tmp_path / "speech", [speech_only(i, 4) for i in range(3)])
    source = pretrain.GridSource([{"path": speech, "kind": "auto"}], MODALITY_PAD)
    with pytest.raises(ValueError, match="text_mix_ratio=0.5 needs text-only sequences"):
        pretrain.plan_epoch(source, 0, 0, 32, pack=True, text_mix_ratio=0.5)


def test_shipped_configs_load(tmp_path, mixed_data):
    from accelerate.commands.config.config_args import load_config_from_file

    configs = REPO / "training" / "configs"
    for name in ("cpu", "ddp", "fsdp2", "deepspeed_zero3"):
        load_config_from_file(str(configs / f"{name}.yaml"))
    fsdp = yaml.safe_load((configs / "fsdp2.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Qwen3DecoderLayer"
    for name in ("stage1", "stage2", "nano"):  # every key known and well typed (data paths replaced)
        (cfg,) = pretrain.make_parser().parse_args_and_config(["--config", str(configs / f"{name}.yaml"),
                                                               "--datasets", mixed_data, "--eval_datasets", mixed_data])
        assert cfg.stage in ("stage1", "stage2")
    sft = yaml.safe_load((configs / "sft.yaml").read_text())
    assert {"model_name_or_path", "dataset_name", "learning_rate", "per_device_train_batch_size", "max_steps",
            "stage", "use_peft", "lora_preset"} <= set(sft)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, mixed_data):
    """2 gloo processes through ddp.yaml; then a resume from step 2 reproduces steps 3-4 exactly.

    `--cpu` is not passed: accelerate 1.15's `--cpu` uses the simple launcher, which starts a single process (several
    only through mpirun). ACCELERATE_USE_CPU=true keeps the torchrun launcher and puts each process on CPU/gloo.
    """
    model = save_model(tmp_path / "init")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), ACCELERATE_USE_CPU="true",
               CUDA_VISIBLE_DEVICES="")

    def launch(out: Path, **overrides) -> list[dict]:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "training" / "configs" / "ddp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_port", "29517", str(REPO / "training" / "pretrain.py"),
               *argv(model, mixed_data, out, stage="stage1", max_steps=4, save_every=2, eval_datasets=[mixed_data],
                     eval_every=2, text_mix_ratio=0.0, **overrides)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "accelerate: 2 process(es), DistributedType.MULTI_CPU (backend gloo)" in proc.stdout
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    full = launch(tmp_path / "out")
    assert [m["step"] for m in full if "loss" in m] == [1, 2, 3, 4]
    out = tmp_path / "out"
    assert {p.name for p in (out / "checkpoint-4").iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl"}
    assert (out / "model.safetensors").is_file()
    before = MossSpeechForCausalLM.from_pretrained(model).state_dict()
    after = MossSpeechForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(TEXT_BACKBONE))

    resumed = launch(tmp_path / "resumed", resume_from=str(out / "checkpoint-2"))
    assert [m["loss"] for m in resumed if "loss" in m] == [m["loss"] for m in full if "loss" in m][2:]


def align_pairs(path: Path, n: int = 6) -> str:
    """S->T / T->T grid pairs with a shared 5-row suffix, as processing/prepare_nano.py's `pretrain/align`."""
    rows = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        suffix = text_rows(torch.randint(0, 250, (5,), generator=g).tolist())
        question = torch.randint(0, 250, (3 + i % 3,), generator=g).tolist()
        rows.append({"speech_ids": speech_only(200 + i, 4 + i) + suffix, "text_ids": text_rows(question) + suffix,
                     "suffix": 5, "utt_id": f"fact-{i // 2}/question/voice-{i % 2}"})
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("temperature", [0.0, 0.1])
def test_alignment_loss_trains_speech_states_toward_text(tmp_path, temperature):
    torch.manual_seed(0)
    config = tiny_config()
    model = MossSpeechForCausalLM(config)
    source = pretrain_data.AlignPairs(align_pairs(tmp_path / "align"), batch_size=4, seed=0)
    pairs = source.sample()
    layers = config.num_shared_layers + config.num_modality_layers
    same = dict(pairs, speech_ids=pairs["text_ids"], speech_lengths=pairs["text_lengths"])
    if not temperature:  # identical grids have identical states
        assert pretrain.alignment_loss(model, same, layers).item() == pytest.approx(0.0, abs=1e-5)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = pretrain.alignment_loss(model, pairs, layers, temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_pretrain_with_alignment_loss_logs_it(tmp_path, mixed_data):
    model = save_model(tmp_path / "init")
    pairs = align_pairs(tmp_path / "align")
    result = pretrain.main(argv(model, mixed_data, tmp_path / "out", align_dataset=pairs, align_weight=0.5,
                                align_batch_size=2, align_temperature=0.1))
    assert all(entry["align_loss"] > 0 for entry in result["history"])
    plain = pretrain.main(argv(model, mixed_data, tmp_path / "plain"))
    assert "align_loss" not in plain["history"][0]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"align_weight": 1.0}, "needs 'align_dataset'"),
    ({"align_weight": -1.0, "align_dataset": "."}, "must be >= 0"),
])
def test_bad_alignment_settings(tmp_path, mixed_data, overrides, message):
    with pytest.raises(ValueError, match=message):
        pretrain.main(argv(save_model(tmp_path / "init"), mixed_data, tmp_path / "out", **overrides))


def frame_pairs(path: Path, n: int = 4) -> str:
    """Row-for-row pairs with per-row weights, as processing/prepare_nano.py's `pretrain/frames`: a speech grid and a
    text grid of the same length (the speech segment's rows replaced by text rows), weights 0 on the first rows."""
    rows = []
    for i in range(n):
        g = torch.Generator().manual_seed(300 + i)
        tail = text_rows(torch.randint(0, 250, (4,), generator=g).tolist())
        speech = speech_only(400 + i, 5 + i)
        words = text_rows(torch.randint(0, 250, (len(speech),), generator=g).tolist())
        weights = [0.0, 0.0] + [1.0] * (len(speech) + len(tail) - 2)
        weights[-2] = 10.0
        rows.append({"speech_ids": speech + tail, "text_ids": words + tail, "weights": weights,
                     "utt_id": f"fact-{i}/question/voice-0"})
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def test_frame_alignment_compares_row_by_row_with_a_frozen_teacher(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    layers = config.num_shared_layers + config.num_modality_layers
    model, teacher = MossSpeechForCausalLM(config), MossSpeechForCausalLM(config).eval()
    teacher.requires_grad_(False)
    source = pretrain_data.AlignPairs(frame_pairs(tmp_path / "frames"), batch_size=3, seed=0)
    pairs = source.sample()
    assert pairs["weights"].shape == pairs["speech_ids"].shape[:2] and "suffix" not in pairs
    # right padding weighs nothing
    for w, n in zip(pairs["weights"], pairs["speech_lengths"]):
        assert (w[n:] == 0).all() and (w[:n] > 0).sum() == n - 2
    same = dict(pairs, speech_ids=pairs["text_ids"])
    assert pretrain.alignment_loss(model, same, layers).item() == pytest.approx(0.0, abs=1e-5)
    assert pretrain.alignment_loss(model, same, layers, teacher=teacher).item() > 0.01
    # rows of weight 0 at the end do not count (causal: nothing before them changes)
    late = dict(pairs, weights=pairs["weights"].clone())
    late["weights"][:, 6:] = 0
    changed = dict(late, speech_ids=pairs["speech_ids"].clone())
    changed["speech_ids"][:, 6:, 0] = 7
    assert pretrain.alignment_loss(model, late, layers, teacher=teacher).item() == pytest.approx(
        pretrain.alignment_loss(model, changed, layers, teacher=teacher).item(), abs=1e-6)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = pretrain.alignment_loss(model, pairs, layers, teacher=teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())


def test_frame_pairs_of_unequal_length_are_refused(tmp_path):
    path = tmp_path / "bad"
    row = {"speech_ids": speech_only(1, 4), "text_ids": text_rows([5, 6]), "weights": [1.0] * 6, "utt_id": "f/q/v"}
    datasets.Dataset.from_list([row]).save_to_disk(str(path))
    with pytest.raises(ValueError, match="pair 0: .* equal length, got 6, 2, 6"):
        pretrain_data.AlignPairs(str(path), batch_size=1, seed=0)


def test_pretrain_with_an_alignment_teacher(tmp_path, mixed_data):
    model = save_model(tmp_path / "init")
    teacher = save_model(tmp_path / "teacher", seed=1)
    result = pretrain.main(argv(model, mixed_data, tmp_path / "out", align_dataset=frame_pairs(tmp_path / "frames"),
                                align_weight=2.0, align_batch_size=2, align_teacher=teacher))
    assert all(entry["align_loss"] > 0 for entry in result["history"])
    frames = str(tmp_path / "frames")
    with pytest.raises(ValueError, match="align_teacher"):
        pretrain.main(argv(model, mixed_data, tmp_path / "bad", align_dataset=frames, align_weight=1.0,
                           align_teacher=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="'align_teacher' needs 'align_weight' > 0"):
        pretrain.main(argv(model, mixed_data, tmp_path / "bad", align_dataset=frames, align_teacher=teacher))
    with pytest.raises(ValueError, match="align_temperature must be 0"):
        pretrain.main(argv(model, mixed_data, tmp_path / "bad", align_dataset=frames, align_weight=1.0,
                           align_batch_size=2, align_temperature=0.1))
