"""MossSpeechConfig: release values, loading the release's config.json, round trip, validation."""

from __future__ import annotations

import json

import pytest
from helpers import small_vocab_config, tiny_config
from transformers import AutoConfig

from modeling_moss_speech import MossSpeechConfig

# The released checkpoint's config.json fields and values, as written by transformers 4.57.
RELEASE_CONFIG_JSON = {
    "architectures": ["MossSpeechForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "audio_vocab_size": 16512,
    "channels": 2,
    "eosp_token_id": 16384,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "layer_types": ["full_attention"] * 36,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "modality_pad_token_id": 151667,
    "model_type": "moss_speech",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "num_modality_layers": 4,
    "num_shared_layers": 32,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "sosp_token_id": 151646,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.0.dev0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151680,
}

COMPARED_FIELDS = [k for k in RELEASE_CONFIG_JSON if k not in ("torch_dtype", "transformers_version",
                                                                "rope_scaling", "rope_theta", "max_window_layers")]


def test_defaults_are_the_release_values():
    config = MossSpeechConfig()
    for key in COMPARED_FIELDS:
        if key in ("architectures", "model_type"):
            continue
        assert getattr(config, key) == RELEASE_CONFIG_JSON[key], key
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert config.audio_pad_token_id == 512
    assert config.num_runtime_layers == 40


def test_release_config_json_loads_equal(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASE_CONFIG_JSON))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is MossSpeechConfig
    default = MossSpeechConfig()
    for key in COMPARED_FIELDS:
        if key == "architectures":
            continue
        assert getattr(loaded, key) == getattr(default, key), key
    assert loaded.rope_parameters == default.rope_parameters
    assert str(loaded.dtype) == "torch.bfloat16"


def test_round_trip(tmp_path):
    config = tiny_config(rms_norm_eps=1e-5)
    config.save_pretrained(tmp_path)
    def fields(c):
        return {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}

    assert fields(MossSpeechConfig.from_pretrained(tmp_path)) == fields(config)
    assert fields(AutoConfig.from_pretrained(tmp_path)) == fields(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_shared_layers": 3}, "num_shared_layers \\+ num_modality_layers"),
        ({"num_modality_layers": 0, "num_shared_layers": 3}, "num_modality_layers must be an integer >= 1"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"head_dim": 7}, "head_dim must be even"),
        ({"sosp_token_id": 300}, "sosp_token_id=300 is outside the text vocabulary"),
        ({"modality_pad_token_id": -1}, "modality_pad_token_id=-1 is outside the text vocabulary"),
        ({"eosp_token_id": 80}, "eosp_token_id=80 is outside the audio vocabulary"),
        ({"audio_pad_token_id": 500}, "audio_pad_token_id=500 is outside the audio vocabulary"),
        ({"pad_token_id": 1000}, "pad_token_id=1000 is outside the text vocabulary"),
        ({"sosp_token_id": 291}, "must differ"),
        ({"channels": 3}, "channels must be 2"),
    ],
)
def test_inconsistent_values_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_tail_offsets(config):
    assert config.tail_layer_offset("text") == 2
    assert config.tail_layer_offset("audio") == 3
    with pytest.raises(ValueError, match="modality must be one of"):
        config.tail_layer_offset("video")


# ------------------------------------------------------------------------ special-id defaults

RELEASE_IDS = {151643, 151645, 151646, 151667}


def test_small_vocabulary_without_special_ids_is_valid():
    config = MossSpeechConfig(vocab_size=99)  # raised "pad_token_id=151643 is outside the text vocabulary" before
    assert config.pad_token_id is None and config.eos_token_id is None
    assert (config.modality_pad_token_id, config.sosp_token_id) == (98, 97)
    assert (config.eosp_token_id, config.audio_pad_token_id) == (16384, 512)  # the audio vocabulary is the release's
    small = small_vocab_config()
    assert (small.audio_pad_token_id, small.eosp_token_id) == (39, 38)
    assert small.num_audio_codes == 38  # the ids below end-of-speech, as in the release's layout
    ids = {small.pad_token_id, small.sosp_token_id, small.modality_pad_token_id, small.eosp_token_id,
           small.audio_pad_token_id}
    assert not ids & RELEASE_IDS


def test_derived_ids_skip_the_ids_given():
    config = small_vocab_config(modality_pad_token_id=98, pad_token_id=97, eos_token_id=[96], audio_pad_token_id=39)
    assert config.sosp_token_id == 95 and config.eosp_token_id == 38
    assert small_vocab_config(sosp_token_id=98).modality_pad_token_id == 97
    with pytest.raises(ValueError, match="vocab_size=1 is too small to derive sosp_token_id: pass modality_pad"):
        small_vocab_config(vocab_size=1)
    with pytest.raises(ValueError, match="audio_vocab_size=1 is too small to derive eosp_token_id"):
        small_vocab_config(audio_vocab_size=1)


def test_derived_ids_round_trip(tmp_path):
    config = small_vocab_config()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    for name in ("pad_token_id", "eos_token_id", "sosp_token_id", "modality_pad_token_id", "eosp_token_id",
                 "audio_pad_token_id"):
        assert getattr(loaded, name) == getattr(config, name), name


def test_release_and_qwen3_sized_vocabularies_get_the_release_ids(tmp_path):
    """The release's config.json omits pad / eos / audio pad: it still loads with the release's values, and so does a
    split of Qwen3 (vocabulary 151936) whose saved config omitted ids equal to the old class defaults."""
    (tmp_path / "config.json").write_text(json.dumps(RELEASE_CONFIG_JSON))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.sosp_token_id, loaded.modality_pad_token_id,
            loaded.eosp_token_id, loaded.audio_pad_token_id) == (151643, [151643, 151645], 151646, 151667, 16384, 512)
    qwen = MossSpeechConfig(vocab_size=151936)
    assert (qwen.sosp_token_id, qwen.modality_pad_token_id, qwen.pad_token_id) == (151646, 151667, 151643)


def test_generation_config_takes_only_the_model_configs_ids():
    from modeling_moss_speech import MossSpeechGenerationConfig

    small = MossSpeechGenerationConfig.from_model_config(small_vocab_config())
    assert small.eos_token_id is None and small.pad_token_id is None
    given = MossSpeechGenerationConfig.from_model_config(small_vocab_config(pad_token_id=3, eos_token_id=[3, 4]))
    assert given.eos_token_id == [3, 4] and given.pad_token_id == 3
    assert given.temperature == 0.6  # the release's sampling defaults stay
