"""Speech tokenizer: feature extractor (waveform → log-mel) and causal Whisper-VQ encoder (log-mel → codes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio
from helpers import modulated_tone, tiny_encoder_config
from transformers import WhisperFeatureExtractor

from modeling_moss_speech.configuration_moss_speech_codec import MossSpeechCodecEncoderConfig
from modeling_moss_speech.feature_extraction_moss_speech import (
    MossSpeechFeatureExtractor,
    prepare_waveforms,
    split_into_chunks,
)
from modeling_moss_speech.modeling_moss_speech_codec_encoder import (
    MAX_BATCH_SECONDS,
    MossSpeechCodecEncoder,
    MossSpeechCodecEncoderOutput,
    encode_waveforms,
)

SPEC = Path(__file__).resolve().parent / "data" / "codec_keys_release.json"  # copy of shared/spec
SR = 16000


@pytest.fixture(scope="module")
def feature_extractor() -> MossSpeechFeatureExtractor:
    return MossSpeechFeatureExtractor()


@pytest.fixture(scope="module")
def encoder(feature_extractor) -> MossSpeechCodecEncoder:
    """Tiny encoder with O(1) random weights and a codebook drawn around real pooled states (varied codes)."""
    torch.manual_seed(0)
    model = MossSpeechCodecEncoder(tiny_encoder_config()).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn_like(param) / math.sqrt(param[0].numel()))
        feats = feature_extractor([modulated_tone(3.0, seed=s) for s in range(3)], sampling_rate=SR)
        states = model(**feats).last_hidden_state.reshape(-1, 32)
        rows = torch.randint(states.shape[0], (64,))
        model.codebook.weight.copy_(states[rows] + 0.3 * states.std() * torch.randn(64, 32))
    return model


# ---------------------------------------------------------------- feature extractor


def test_features_match_transformers_whisper_extractor(feature_extractor):
    """The release featurizes with WhisperFeatureExtractor(feature_size=128), padded to a multiple of 1280."""
    reference = WhisperFeatureExtractor(feature_size=128)
    waves = [modulated_tone(1.0), modulated_tone(2.4, seed=1), modulated_tone(0.77, seed=2)]
    ours = feature_extractor(waves, sampling_rate=SR)
    for row, wave in enumerate(waves):
        ref = reference(wave.numpy(), sampling_rate=SR, return_tensors="pt", padding="longest",
                        pad_to_multiple_of=1280, return_attention_mask=True)
        frames = ref.input_features.shape[-1]
        assert frames == math.ceil(wave.numel() / 1280) * 8
        # each batched row equals the reference's features for that utterance alone (measured max diff ~2e-5)
        torch.testing.assert_close(ours.input_features[row, :, :frames], ref.input_features[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.attention_mask[row, :frames], ref.attention_mask[0].long())


def test_feature_shapes_mask_and_padding(feature_extractor):
    waves = [modulated_tone(1.0), modulated_tone(0.3, seed=1)]
    out = feature_extractor(waves, sampling_rate=SR)
    assert out.input_features.dtype == torch.float32
    assert out.input_features.shape == (2, 128, 104)  # 16000 samples → 16640 (13 × 1280) → 104 frames
    assert out.attention_mask.shape == (2, 104)
    assert out.attention_mask.sum(dim=1).tolist() == [100, 30]  # ceil(samples / 160)
    single = feature_extractor(waves[1], sampling_rate=SR)
    assert single.input_features.shape == (1, 128, 32)  # 4800 → 5120 samples
    as_numpy = feature_extractor(waves[1].numpy().astype(np.float64), sampling_rate=SR, return_tensors="np")
    assert isinstance(as_numpy["input_features"], np.ndarray)
    np.testing.assert_allclose(as_numpy["input_features"], single.input_features.numpy(), atol=1e-6)


def test_feature_extractor_save_load_round_trip(tmp_path):
    extractor = MossSpeechFeatureExtractor(chunk_length=20, pad_to_multiple_of=640)
    extractor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["feature_extractor_type"] == "MossSpeechFeatureExtractor"
    assert saved["chunk_length"] == 20 and saved["pad_to_multiple_of"] == 640 and saved["feature_size"] == 128
    loaded = MossSpeechFeatureExtractor.from_pretrained(tmp_path)
    assert loaded.to_dict() == extractor.to_dict()
    assert loaded.n_samples == 320000
    wave = modulated_tone(0.5)
    torch.testing.assert_close(loaded(wave, sampling_rate=SR).input_features,
                               extractor(wave, sampling_rate=SR).input_features)


def test_resampling_and_downmix(feature_extractor):
    wave_8k, wave_44k = modulated_tone(1.0, 8000), modulated_tone(1.0, 44100, seed=1)
    prepared = feature_extractor.prepare_waveforms([wave_8k, wave_44k], sampling_rate=8000)
    assert prepared[0].shape == (16000,)
    torch.testing.assert_close(prepared[0], torchaudio.functional.resample(wave_8k, 8000, SR))
    (prepared_44k,) = feature_extractor.prepare_waveforms(wave_44k, sampling_rate=44100)
    assert prepared_44k.shape == (16000,)
    left, right = modulated_tone(0.5, seed=2), modulated_tone(0.5, seed=3)
    (stereo,) = feature_extractor.prepare_waveforms(torch.stack([left, right]), sampling_rate=SR)
    torch.testing.assert_close(stereo, (left + right) / 2)
    # the module-level helper keeps the input rate unless a target rate is given
    (kept,) = prepare_waveforms(wave_44k.double().numpy(), 44100)
    assert kept.dtype == torch.float32 and kept.shape == (44100,)
    torch.testing.assert_close(prepare_waveforms([wave_44k], 44100, target_rate=SR)[0], prepared_44k)


@pytest.mark.parametrize(
    ("raw", "kwargs", "error", "match"),
    [
        (torch.zeros(0), {}, ValueError, "empty"),
        (torch.zeros(2, 0), {}, ValueError, "empty"),
        ([], {}, ValueError, "empty list"),
        (torch.tensor([0.1, float("nan"), 0.2]), {}, ValueError, "NaN or infinite"),
        (np.array([0.1, np.inf], dtype=np.float32), {}, ValueError, "NaN or infinite"),
        (np.zeros(1600, dtype=np.int16), {}, TypeError, "float dtype"),
        (torch.zeros(1600, dtype=torch.int32), {}, TypeError, "float dtype"),
        (torch.zeros(1, 2, 1600), {}, ValueError, "1-D .* or 2-D"),
        (torch.tensor(0.5), {}, ValueError, "1-D .* or 2-D"),
        (torch.zeros(1600, 2), {}, ValueError, r"\(channels, samples\)"),
        ([0.1, 0.2], {}, TypeError, r"raw_speech\[0\]"),
        ("audio.wav", {}, TypeError, "raw_speech"),
        (torch.zeros(1600), {"sampling_rate": None}, ValueError, "sampling_rate` is required"),
        (torch.zeros(1600), {"sampling_rate": 0}, ValueError, "positive"),
        (torch.zeros(1600), {"sampling_rate": -16000}, ValueError, "positive"),
        (torch.zeros(1600), {"sampling_rate": 22050.5}, ValueError, "positive integer"),
        (torch.zeros(1600), {"return_tensors": "tf"}, ValueError, "return_tensors"),
    ],
)
def test_feature_extractor_rejects_bad_input(feature_extractor, raw, kwargs, error, match):
    kwargs = {"sampling_rate": SR, **kwargs}
    with pytest.raises(error, match=match):
        feature_extractor(raw, **kwargs)


def test_feature_extractor_rejects_bad_construction():
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        MossSpeechFeatureExtractor(pad_to_multiple_of=1000)
    with pytest.raises(ValueError, match="hop_length"):
        MossSpeechFeatureExtractor(hop_length=0)


def test_split_into_chunks():
    wave = torch.randn(31 * SR)
    chunks = split_into_chunks(wave)
    assert [c.numel() for c in chunks] == [480000, 16000]
    torch.testing.assert_close(torch.cat(chunks), wave)
    with pytest.raises(ValueError, match="1-D"):
        split_into_chunks(wave.reshape(1, -1))
    with pytest.raises(ValueError, match="chunk_samples"):
        split_into_chunks(wave, chunk_samples=0)


# -------------------------------------------------------------------------- encoder


def test_release_size_keys_and_shapes_on_meta():
    expected = json.loads(SPEC.read_text())["encoder"]
    with torch.device("meta"):
        model = MossSpeechCodecEncoder(MossSpeechCodecEncoderConfig())
    ours = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    assert set(ours) == set(expected)
    assert ours == expected


def test_layer_norm_and_all_layers_only_when_not_encoder_only():
    model = MossSpeechCodecEncoder(tiny_encoder_config(encoder_layers=3, quantize_encoder_only=False))
    assert len(model.layers) == 3 and hasattr(model, "layer_norm")
    model = MossSpeechCodecEncoder(tiny_encoder_config(encoder_layers=3))
    assert len(model.layers) == 2 and not hasattr(model, "layer_norm")


def test_forward_shapes_and_valid_code_counts(encoder, feature_extractor):
    waves = [modulated_tone(1.0), modulated_tone(2.4, seed=1), modulated_tone(0.05, seed=2)]
    feats = feature_extractor(waves, sampling_rate=SR)
    with torch.no_grad():
        out = encoder(feats.input_features, feats.attention_mask)
    assert isinstance(out, MossSpeechCodecEncoderOutput)
    assert out.codes.dtype == torch.long and out.codes_mask.dtype == torch.bool
    assert out.codes.shape == out.codes_mask.shape == (3, 30)
    assert out.last_hidden_state.shape == (3, 30, 32)
    valid_frames = feats.attention_mask.sum(dim=1)
    assert out.codes_mask.sum(dim=1).tolist() == [math.ceil(v / 8) for v in valid_frames.tolist()] == [13, 30, 1]
    assert out.codes.min() >= 0 and out.codes.max() < 64
    assert out.codes[out.codes_mask].unique().numel() > 5  # the fixture's codebook yields varied codes


def test_quantize_is_nearest_codebook_row(encoder):
    hidden = torch.randn(3, 7, 32) * 3
    with torch.no_grad():
        codes = encoder.quantize(hidden)
    assert codes.shape == (3, 7)
    brute_force = torch.cdist(hidden.reshape(-1, 32).double(), encoder.codebook.weight.double()).argmin(dim=1)
    assert torch.equal(codes.reshape(-1), brute_force)
    with pytest.raises(ValueError, match="hidden_states"):
        encoder.quantize(torch.randn(2, 5))


def test_encoder_is_causal(encoder, feature_extractor):
    """Codes of a prefix equal the first codes of the whole: no code looks ahead of its 80 ms window."""
    feats = feature_extractor(modulated_tone(2.0), sampling_rate=SR).input_features
    with torch.no_grad():
        full = encoder(feats).codes
        prefix = encoder(feats[..., :64]).codes
    assert torch.equal(prefix, full[:, :8])


def test_odd_frame_count_and_no_mask(encoder, feature_extractor):
    feats = feature_extractor(modulated_tone(1.0), sampling_rate=SR).input_features[..., :99]
    with torch.no_grad():
        out = encoder(feats)
    assert out.codes.shape == (1, 13) and bool(out.codes_mask.all())


@pytest.mark.parametrize(
    ("features", "mask", "error", "match"),
    [
        (torch.zeros(1, 128, 3002), None, ValueError, "more than the encoder takes"),
        (torch.zeros(1, 80, 100), None, ValueError, "num_mel_bins|128"),
        (torch.zeros(128, 100), None, ValueError, "input_features"),
        (torch.zeros(1, 128, 0), None, ValueError, "empty"),
        (torch.zeros(1, 128, 100, dtype=torch.long), None, TypeError, "float tensor"),
        (torch.zeros(1, 128, 100), torch.ones(1, 99), ValueError, "attention_mask"),
        (torch.zeros(1, 128, 100), torch.cat([torch.zeros(1, 10), torch.ones(1, 90)], 1), ValueError, "right-padded"),
    ],
)
def test_encoder_rejects_bad_input(encoder, features, mask, error, match):
    with pytest.raises(error, match=match):
        encoder(features, mask)


def test_encoder_accepts_exactly_30_seconds(encoder):
    with torch.no_grad():
        out = encoder(torch.zeros(1, 128, 3000))
    assert out.codes.shape == (1, 375)


def test_non_causal_attention_is_refused():
    with pytest.raises(ValueError, match="encoder_causal_attention"):
        MossSpeechCodecEncoder(tiny_encoder_config(encoder_causal_attention=False))


def test_local_encoder_codes_do_not_depend_on_where_a_clip_is_said():
    """With `encoder_attention_window` a code depends on its last `receptive_field` feature frames only: a clip
    after any prefix (a multiple of the 8 frames of a code) gives the same codes once past that reach."""
    torch.manual_seed(0)
    model = MossSpeechCodecEncoder(tiny_encoder_config(encoder_attention_window=3)).eval()
    assert model.embed_positions is None and "embed_positions.weight" not in model.state_dict()
    reach = model.receptive_field  # 2 layers, window 3: convs 4 + 2 x (2 x 2 + 3) + 1
    assert reach == 19
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn_like(param) / math.sqrt(param[0].numel()))
        clip = torch.randn(1, 128, 96)
        alone = model(clip).last_hidden_state[0]
        first_free = math.ceil((reach - 8) / 8)  # code k reaches back to frame 8k + 8 - reach of the clip
        for prefix in (torch.randn(1, 128, 40), 3 * torch.randn(1, 128, 400)):
            after = model(torch.cat([prefix, clip], dim=-1)).last_hidden_state[0, prefix.shape[-1] // 8:]
            torch.testing.assert_close(after[first_free:], alone[first_free:], atol=1e-5, rtol=0)
            assert not torch.allclose(after[first_free - 1], alone[first_free - 1], atol=1e-3)
        # the release's encoder: the same clip later in the utterance gives other states everywhere
        release = MossSpeechCodecEncoder(tiny_encoder_config()).eval()
        assert release.receptive_field is None
        moved = release(torch.cat([torch.zeros(1, 128, 400), clip], dim=-1)).last_hidden_state[0, 50:]
        assert not torch.allclose(moved[-1], release(clip).last_hidden_state[0, -1], atol=1e-3)


@pytest.mark.parametrize("window", [0, -2, 2.5, True, "8"])
def test_bad_attention_window_is_refused(window):
    with pytest.raises(ValueError, match="encoder_attention_window"):
        tiny_encoder_config(encoder_attention_window=window)


# ------------------------------------------------------------------ encode_waveforms


def test_token_counts(encoder, feature_extractor):
    waves = [modulated_tone(1.0), modulated_tone(2.4, seed=1), modulated_tone(31.0, seed=2)]
    codes = encode_waveforms(encoder, feature_extractor, waves, SR)
    assert [c.numel() for c in codes] == [13, 30, 388]
    assert all(c.dtype == torch.long and c.dim() == 1 for c in codes)
    # the 31 s utterance is two independent chunks: 30 s (375 codes) then 1 s (13 codes)
    head = encode_waveforms(encoder, feature_extractor, waves[2][: 30 * SR], SR)[0]
    tail = encode_waveforms(encoder, feature_extractor, waves[2][30 * SR:], SR)[0]
    assert torch.equal(codes[2], torch.cat([head, tail]))


def test_batched_codes_equal_codes_alone(encoder, feature_extractor):
    # 2.4 s is an exact multiple of 1280 samples: its last frames see reflection, not the batch's zero padding
    waves = [modulated_tone(seconds, seed=seed) for seed, seconds in enumerate((1.0, 2.4, 0.77, 3.1, 0.2))]
    batched = encode_waveforms(encoder, feature_extractor, waves, SR, batch_size=3)
    for wave, codes in zip(waves, batched):
        alone = encode_waveforms(encoder, feature_extractor, wave, SR)
        assert len(alone) == 1 and torch.equal(codes, alone[0])


def test_long_audio_is_encoded_in_bounded_groups(encoder, feature_extractor):
    """Ten 30 s chunks go through the encoder a few at a time (peak memory bounded), with the same codes."""
    sizes: list[int] = []
    hook = encoder.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    wave = modulated_tone(300.0)
    try:
        reference = encode_waveforms(encoder, feature_extractor, wave, SR, max_batch_seconds=1e9)
        assert sizes == [10]
        for kwargs, groups in (({}, [4, 4, 2]),  # default: 120 s of audio per call
                               ({"max_batch_seconds": 60}, [2] * 5), ({"max_batch_seconds": 1}, [1] * 10),
                               ({"batch_size": 3}, [3, 3, 3, 1])):
            sizes.clear()
            (codes,) = encode_waveforms(encoder, feature_extractor, wave, SR, **kwargs)
            assert sizes == groups and torch.equal(codes, reference[0]), kwargs
        # short utterances share a call up to the budget in padded audio (the longest of the group sets it)
        sizes.clear()
        waves = [modulated_tone(2.0)] + [modulated_tone(1.0, seed=s) for s in range(5)]
        encode_waveforms(encoder, feature_extractor, waves, SR, max_batch_seconds=4)
        assert sizes == [2, 4]
    finally:
        hook.remove()
    assert MAX_BATCH_SECONDS == 120.0


def test_other_sampling_rates_and_stereo(encoder, feature_extractor):
    for rate in (8000, 44100):
        wave = modulated_tone(1.2, rate, seed=rate)
        (codes,) = encode_waveforms(encoder, feature_extractor, wave, rate)
        assert codes.numel() == 15  # ceil(1.2 × 12.5)
        expected = encode_waveforms(encoder, feature_extractor, torchaudio.functional.resample(wave, rate, SR), SR)
        assert torch.equal(codes, expected[0])
    left, right = modulated_tone(1.0, seed=5), modulated_tone(1.0, seed=6)
    (stereo,) = encode_waveforms(encoder, feature_extractor, torch.stack([left, right]).numpy(), SR)
    assert torch.equal(stereo, encode_waveforms(encoder, feature_extractor, (left + right) / 2, SR)[0])
    (dual_mono,) = encode_waveforms(encoder, feature_extractor, torch.stack([left, left]), SR)
    assert torch.equal(dual_mono, encode_waveforms(encoder, feature_extractor, left, SR)[0])


def test_encode_waveforms_rejects_bad_arguments(encoder, feature_extractor):
    with pytest.raises(ValueError, match="batch_size"):
        encode_waveforms(encoder, feature_extractor, modulated_tone(0.5), SR, batch_size=0)
    for budget in (0, -1.0, float("inf"), "60", True):
        with pytest.raises(ValueError, match="`max_batch_seconds` must be a positive number of seconds, got"):
            encode_waveforms(encoder, feature_extractor, modulated_tone(0.5), SR, max_batch_seconds=budget)
    with pytest.raises(ValueError, match="sampling_rate"):
        encode_waveforms(encoder, feature_extractor, modulated_tone(0.5), None)
    with pytest.raises(TypeError, match="float dtype"):
        encode_waveforms(encoder, feature_extractor, np.zeros(8000, dtype=np.int16), SR)
    with pytest.raises(TypeError, match="feature_extractor"):
        encode_waveforms(encoder, WhisperFeatureExtractor(feature_size=128), modulated_tone(0.5), SR)
    with pytest.raises(ValueError, match="chunk_length"):
        encode_waveforms(encoder, MossSpeechFeatureExtractor(chunk_length=31), modulated_tone(0.5), SR)
