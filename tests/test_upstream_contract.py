"""What the package relies on from transformers, TRL, datasets and torch beyond their documented API.

Each test pins one touch point of `modeling_moss_speech/_compat.py` (or an upstream hook the package overrides), so
an upgrade that changes it fails here, by name.
"""

from __future__ import annotations

import inspect
from unittest import mock

import datasets
import pytest
import torch
from helpers import tiny_config, tiny_encoder_config
from transformers import GenerationMixin, PretrainedConfig
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation.configuration_utils import CompileConfig

from modeling_moss_speech import MossSpeechForCausalLM, _compat
from modeling_moss_speech.modeling_moss_speech import MossSpeechRotaryEmbedding
from modeling_moss_speech.modeling_moss_speech_codec_encoder import MossSpeechCodecEncoder


def test_compile_config_all_devices_flag():
    """`CompileConfig._compile_all_devices` exists, is off by default, and transformers' generate still reads it."""
    assert "_compile_all_devices" in vars(CompileConfig) and CompileConfig._compile_all_devices is None
    assert "_compile_all_devices" in inspect.getsource(GenerationMixin._valid_auto_compile_criteria)
    config = CompileConfig()
    assert not _compat.compile_on_any_device(config) and not _compat.compile_on_any_device(None)
    config._compile_all_devices = True
    assert _compat.compile_on_any_device(config)


def test_static_cache_layer_allocation():
    """A static layer's `lazy_initialization(keys, values)` allocates (B, H, max_cache_len, D) from empty tensors."""
    config = MossSpeechForCausalLM(tiny_config()).runtime_cache_config()
    cache = StaticCache(config=config, max_cache_len=8)
    layer = cache.layers[0]
    assert not layer.is_initialized
    _compat.allocate_cache_layer(layer, 3, config.num_key_value_heads, config.head_dim, torch.float16,
                                 torch.device("cpu"))
    assert layer.is_initialized
    assert layer.keys.shape == layer.values.shape == (3, config.num_key_value_heads, 8, config.head_dim)
    assert layer.keys.dtype == torch.float16 and not layer.keys.any()


def test_config_less_dynamic_cache_adds_layers():
    """`DynamicCache()` records the layer class it replicates; caches built from a config have a fixed slot list."""
    config = MossSpeechForCausalLM(tiny_config()).runtime_cache_config()
    grows = DynamicCache()
    assert _compat.cache_adds_layers(grows) and len(grows.layers) == 0
    key = torch.zeros(1, 1, 2, 4)
    grows.update(key, key, layer_idx=2)
    assert len(grows.layers) == 3  # slots appear on demand
    assert not _compat.cache_adds_layers(DynamicCache(config=config))
    assert not _compat.cache_adds_layers(StaticCache(config=config, max_cache_len=4))


def test_register_for_auto_class_is_undone():
    """`register_for_auto_class` records the auto class on the class itself; restoring the old value undoes it."""

    class Throwaway(PretrainedConfig):
        model_type = "moss-speech-contract-throwaway"

    before = _compat.registered_auto_class(Throwaway)
    Throwaway.register_for_auto_class("AutoConfig")
    assert _compat.registered_auto_class(Throwaway) == "AutoConfig"
    assert Throwaway._auto_class == "AutoConfig"  # what save_pretrained reads to write auto_map
    _compat.restore_auto_class(Throwaway, before)
    assert _compat.registered_auto_class(Throwaway) is before and "_auto_class" not in vars(Throwaway)
    Throwaway.register_for_auto_class("AutoConfig")
    _compat.restore_auto_class(Throwaway, "AutoFeatureExtractor")
    assert Throwaway._auto_class == "AutoFeatureExtractor"


def test_dataset_fingerprint_tracks_transforms():
    """`datasets` keeps a str fingerprint per `Dataset` that a transform changes and a re-read keeps."""
    data = datasets.Dataset.from_dict({"a": [1, 2, 3]})
    fingerprint = _compat.dataset_fingerprint(data)
    assert isinstance(fingerprint, str) and fingerprint == _compat.dataset_fingerprint(data)
    assert _compat.dataset_fingerprint(data.map(lambda row: {"a": row["a"] + 1})) != fingerprint
    assert _compat.dataset_fingerprint(data.select([0, 1])) != fingerprint
    assert _compat.dataset_fingerprint(object()) is None


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.bfloat16()])
def test_module_casts_go_through_apply(cast):
    """torch's `.to(dtype)` / `.half()` / `.bfloat16()` route through `nn.Module._apply`, which the rotary overrides."""
    rotary = MossSpeechRotaryEmbedding(config=tiny_config())
    names = dict(rotary.named_buffers())
    frequencies = rotary.inv_freq.clone()
    persistent = set(rotary.state_dict())
    cast(rotary)
    assert set(dict(rotary.named_buffers())) == set(names) and set(rotary.state_dict()) == persistent
    assert rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rotary.inv_freq, frequencies)


def test_whisper_layers_built_with_sdpa_call_it():
    """`WhisperConfig(attn_implementation="sdpa")` makes the codec encoder's Whisper layers call torch's SDPA."""
    encoder = MossSpeechCodecEncoder(tiny_encoder_config())
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", side_effect=sdpa) as spy:
        encoder.layers[0](torch.randn(1, 5, 32), attention_mask=None)
    assert spy.call_count == 1


def test_sft_trainer_surface():
    """The public `SFTTrainer` / `Trainer` methods `MossSpeechSFTTrainer` overrides or calls keep their signatures."""
    trl = pytest.importorskip("trl")
    trainer = trl.SFTTrainer
    signatures = {
        "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
        "prediction_step": ["self", "model", "inputs", "prediction_loss_only", "ignore_keys"],
        "get_batch_samples": ["self", "epoch_iterator", "num_batches", "device"],
        "log": ["self", "logs", "start_time"],
        "get_tp_size": ["self"],
        "compute_loss_context_manager": ["self"],
    }
    for name, parameters in signatures.items():
        assert list(inspect.signature(getattr(trainer, name)).parameters) == parameters, name
