"""Big-model inference: sharded checkpoints split over "cpu" and "disk", device_map errors, static cache,
compiled decode, and a float32 codec next to a bf16 LM."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import EOSP, IM_END, PAD, SOSP, Force, left_pad, make_prompt, tiny_codec_config

from modeling_moss_speech import MossSpeechCodecModel, MossSpeechForCausalLM, MossSpeechVoicePrompt
from modeling_moss_speech.modeling_moss_speech import runtime_cache_config

# Every runtime module on a device; layers of the trunk and both tails split between the CPU and the disk.
SPLIT = {
    "model.embed_tokens": "cpu",
    "model.audio_embed": "disk",
    "model.shared_block.layers.0": "cpu",
    "model.shared_block.layers.1": "disk",
    "model.text_block": "disk",
    "model.audio_block.layers.0": "cpu",
    "model.text_norm": "disk",
    "model.audio_norm": "cpu",
    "model.rotary_emb": "cpu",
    "text_lm_head": "disk",
    "audio_lm_head": "cpu",
}


def switching_generate(model, grid, mask, **kwargs):
    """Greedy generate of a left-padded batch whose rows switch text → speech → text (lazy tails catch up)."""
    return model.generate(
        grid, attention_mask=mask, max_new_tokens=14, do_sample=False, repetition_penalty=1.1,
        return_dict_in_generate=True, output_logits=True,
        text_logits_processor=[Force({(0, 3): SOSP}, suppress=(PAD, IM_END, SOSP))],
        audio_logits_processor=[Force({(0, 8): EOSP, (1, 5): EOSP}, suppress=(EOSP,))], **kwargs,
    )


@pytest.fixture
def batch():
    return left_pad([make_prompt(6, 9), make_prompt(7, 12, ends_in_speech=True)])


@pytest.fixture
def sharded(model, tmp_path):
    path = tmp_path / "lm"
    model.save_pretrained(path, max_shard_size="20KB")
    return path


def assert_same_generation(got, ref, atol=1e-5):
    assert torch.equal(got.sequences, ref.sequences)
    assert got.modality_spans == ref.modality_spans
    for modality in ("text", "audio"):
        for a, b in zip(getattr(got, f"{modality}_logits"), getattr(ref, f"{modality}_logits")):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def test_sharded_checkpoint_split_over_cpu_and_disk_matches_unsplit(model, sharded, tmp_path, batch):
    shards = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) >= 4
    split = MossSpeechForCausalLM.from_pretrained(sharded, device_map=SPLIT, offload_folder=tmp_path / "offload")
    assert set(split.hf_device_map.values()) == {"cpu", "disk"}
    assert split.model.text_block.layers[0].mlp.up_proj.weight.device.type == "meta"  # really on the disk
    grid, mask = batch
    ref, got = model(grid, attention_mask=mask), split(grid, attention_mask=mask)
    torch.testing.assert_close(got.text_logits, ref.text_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.audio_logits, ref.audio_logits, atol=1e-6, rtol=0)
    out = switching_generate(split, grid, mask)
    assert out.modality_spans == [[("text", 0, 3), ("audio", 3, 8), ("text", 8, 14)],
                                  [("audio", 0, 5), ("text", 5, 14)]]
    assert any(x is None for x in out.text_logits)  # lazy tails skipped the text tail on some steps
    assert_same_generation(out, switching_generate(model, grid, mask))


def test_auto_device_map_with_max_memory_offloads_whole_decoder_layers(model, sharded, tmp_path, batch):
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    auto = MossSpeechForCausalLM.from_pretrained(sharded, device_map="auto", max_memory={"cpu": size // 2},
                                                 offload_folder=tmp_path / "offload")
    assert set(auto.hf_device_map.values()) == {"cpu", "disk"}
    # _no_split_modules: a decoder layer is never cut between devices.
    assert all(key.split(".layers.")[-1].isdigit() for key in auto.hf_device_map if ".layers." in key)
    grid, mask = batch
    assert_same_generation(switching_generate(auto, grid, mask), switching_generate(model, grid, mask))


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ({**SPLIT, "model.shared_blok": "cpu"},
         r"'model\.shared_blok' is not a module .*Did you mean 'model\.shared_block'"),
        ({**SPLIT, "model.text_block.layers.7": "disk"}, r"'model\.text_block\.layers\.7' is not a module"),
        ({k: v for k, v in SPLIT.items() if k != "model.text_block"}, r"no device for \['model\.text_block'\]"),
        ({**SPLIT, "audio_lm_head": "gpu"}, r"device_map\['audio_lm_head'\] = 'gpu' is not a device"),
    ],
)
def test_wrong_device_map_entries_name_the_module(sharded, tmp_path, device_map, message):
    with pytest.raises(ValueError, match=message):
        MossSpeechForCausalLM.from_pretrained(sharded, device_map=device_map, offload_folder=tmp_path / "offload")


def test_no_split_modules_name_real_classes(model):
    codec = MossSpeechCodecModel(tiny_codec_config())
    for module in (model, codec):
        classes = {type(m).__name__ for m in module.modules()}
        assert module._no_split_modules and set(module._no_split_modules) <= classes


def test_static_cache_generate_equals_dynamic(model, batch):
    grid, mask = batch
    dynamic = switching_generate(model, grid, mask)
    assert_same_generation(switching_generate(model, grid, mask, cache_implementation="static"), dynamic)
    assert_same_generation(switching_generate(model, grid, mask, cache_implementation="static", lazy_tails=False),
                           switching_generate(model, grid, mask, lazy_tails=False))
    sampled = [model.generate(grid, attention_mask=mask, max_new_tokens=10, generator=torch.Generator().manual_seed(3),
                              **extra) for extra in ({}, {"cache_implementation": "static"})]
    assert torch.equal(*sampled)


def test_new_cache_holds_every_runtime_layer(model, config):
    assert runtime_cache_config(config).num_hidden_layers == config.num_runtime_layers
    grid = make_prompt(30, 10).unsqueeze(0)
    step = torch.tensor([[[5, 10]]])
    reference = model(torch.cat([grid, step], dim=1))
    for cache in (model.new_cache(1, 16), model.new_cache(max_cache_len=16), model.new_cache(static=False)):
        assert len(cache.layers) == config.num_runtime_layers
        model(grid, cache=cache, use_cache=True)
        mask = torch.ones(1, grid.shape[1] + 1, dtype=torch.long)
        out = model(step, cache=cache, use_cache=True, attention_mask=mask)
        torch.testing.assert_close(out.text_logits[:, -1], reference.text_logits[:, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.audio_logits[:, -1], reference.audio_logits[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_cache_len must be an integer"):
        model.new_cache(1)


def test_generate_rejects_unsupported_cache_settings(model, sharded, tmp_path):
    prompt = make_prompt(31, 6).unsqueeze(0)
    with pytest.raises(ValueError, match="cache_implementation='offloaded' is not supported"):
        model.generate(prompt, max_new_tokens=2, cache_implementation="offloaded")
    with pytest.raises(ValueError, match="max_cache_len=4 is smaller"):
        model.generate(prompt, max_new_tokens=2, cache_implementation="static", max_cache_len=4)
    with pytest.raises(ValueError, match="compile=True needs a static cache"):
        model.generate(prompt, max_new_tokens=2, compile=True, cache_implementation="dynamic")
    split = MossSpeechForCausalLM.from_pretrained(sharded, device_map=SPLIT, offload_folder=tmp_path / "offload")
    with pytest.raises(ValueError, match="compile=True cannot be used with a model offloaded"):
        split.generate(prompt, max_new_tokens=2, compile=True)


@pytest.mark.slow
def test_compiled_decode_equals_eager(model, batch):
    """The single-row decode step compiles without graph breaks (fullgraph) and gives eager's tokens."""
    torch._dynamo.reset()
    grid, mask = batch
    eager = switching_generate(model, grid, mask)
    compiled = switching_generate(model, grid, mask, compile=True)
    assert_same_generation(compiled, eager)
    again = switching_generate(model, grid, mask, compile=True)  # cached graphs, a fresh cache
    assert torch.equal(again.sequences, eager.sequences)


def test_codec_stays_float32_next_to_a_bf16_lm(sharded, tmp_path):
    torch.manual_seed(0)
    codec_path = tmp_path / "codec"
    MossSpeechCodecModel(tiny_codec_config()).eval().to(torch.bfloat16).save_pretrained(codec_path)
    assert json.loads((codec_path / "config.json").read_text())["dtype"] == "bfloat16"
    lm = MossSpeechForCausalLM.from_pretrained(sharded, dtype=torch.bfloat16)
    codec = MossSpeechCodecModel.from_pretrained(codec_path)
    assert lm.dtype == torch.bfloat16 and codec.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in codec.parameters())
    assert MossSpeechCodecModel.from_pretrained(codec_path, dtype=torch.bfloat16).dtype == torch.bfloat16  # if asked

    rows = lm.generate(make_prompt(32, 8, ends_in_speech=True).unsqueeze(0), max_new_tokens=6, do_sample=False,
                       audio_logits_processor=[Force({}, suppress=(EOSP,))])
    codes = rows[0, :, 1]
    voice = MossSpeechVoicePrompt(tokens=codes[:2].clone(), mel=torch.randn(8, 80, dtype=torch.bfloat16),
                                  speaker_embedding=torch.randn(192, dtype=torch.bfloat16))
    speech = codec.decode(codes, voice_prompt=voice, generator=torch.Generator().manual_seed(0))
    assert speech.waveforms.dtype == torch.float32 and torch.isfinite(speech.waveforms).all()
    assert all(p.dtype == torch.float32 for p in codec.parameters())  # nothing was cast on the way


def test_codec_device_map_keeps_components_whole(tmp_path):
    codec_path = tmp_path / "codec"
    MossSpeechCodecModel(tiny_codec_config()).save_pretrained(codec_path)
    with pytest.raises(ValueError, match=r"'flow\.decoder' is not a codec component"):
        MossSpeechCodecModel.from_pretrained(codec_path, device_map={"flow.decoder": "cpu", "": "cpu"})
    with pytest.raises(ValueError, match="codec cannot be offloaded"):
        MossSpeechCodecModel.from_pretrained(codec_path, device_map={"": "cpu", "flow": "disk"},
                                             offload_folder=tmp_path / "offload")
    placed = MossSpeechCodecModel.from_pretrained(codec_path, device_map={"encoder": "cpu", "flow": "cpu",
                                                                          "hift": "cpu", "speaker_encoder": "cpu"})
    assert placed.dtype == torch.float32
