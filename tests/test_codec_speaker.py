"""CAM++ speaker encoder: release-size layout, padding-exact batching, fbank front end, input checks, ONNX import."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchaudio
from helpers import randomize_batchnorm, tiny_speaker_config

from modeling_moss_speech.configuration_moss_speech_codec import MossSpeechCodecSpeakerConfig
from modeling_moss_speech.modeling_moss_speech_codec_speaker import MossSpeechCodecSpeakerEncoder

# Measured on 3D-Speaker's public CAMPPlus(feat_dim=80, embedding_size=192), whose state dict loads into ours.
RELEASE_NUM_PARAMETERS = 6_848_544
RELEASE_NUM_STATE_TENSORS = 937


@pytest.fixture(scope="module")
def encoder() -> MossSpeechCodecSpeakerEncoder:
    torch.manual_seed(0)
    model = MossSpeechCodecSpeakerEncoder(tiny_speaker_config()).eval()
    randomize_batchnorm(model)
    return model


def waveforms(*num_samples: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(n, generator=generator) for n in num_samples]


def test_release_size_layout_on_meta():
    with torch.device("meta"):
        model = MossSpeechCodecSpeakerEncoder(MossSpeechCodecSpeakerConfig())
    state = model.state_dict()
    assert len(state) == RELEASE_NUM_STATE_TENSORS
    assert sum(p.numel() for p in model.parameters()) == RELEASE_NUM_PARAMETERS
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    # FCM: 32 channels × 80/8 bins = 320 TDNN inputs; dense blocks of 12/24/16 layers, growth 32, bottleneck 128.
    assert shapes["head.conv1.weight"] == (32, 1, 3, 3)
    assert shapes["head.layer2.0.shortcut.0.weight"] == (32, 32, 1, 1)
    assert shapes["xvector.tdnn.linear.weight"] == (128, 320, 5)
    assert shapes["xvector.block1.tdnnd12.linear1.weight"] == (128, 128 + 11 * 32, 1)
    assert shapes["xvector.block2.tdnnd24.cam_layer.linear_local.weight"] == (32, 128, 3)
    assert shapes["xvector.block3.tdnnd16.cam_layer.linear1.weight"] == (64, 128, 1)
    assert shapes["xvector.block3.tdnnd16.cam_layer.linear2.bias"] == (32,)
    assert shapes["xvector.transit1.linear.weight"] == (256, 512, 1)
    assert shapes["xvector.transit2.linear.weight"] == (512, 1024, 1)
    assert shapes["xvector.transit3.linear.weight"] == (512, 1024, 1)
    assert shapes["xvector.out_nonlinear.batchnorm.running_var"] == (512,)
    assert shapes["xvector.dense.linear.weight"] == (192, 1024, 1)
    assert "xvector.dense.nonlinear.batchnorm.weight" not in shapes  # non-affine
    assert not any(".block1.tdnnd13." in k or ".block2.tdnnd25." in k or ".block3.tdnnd17." in k for k in shapes)
    assert any("head.layer1.1.conv2" in k for k in shapes) and not any("head.layer1.2." in k for k in shapes)


def test_embed_shape_and_determinism(encoder):
    wavs = waveforms(16000, 9000)
    first = encoder.embed(wavs)
    assert first.shape == (2, 192) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, encoder.embed(wavs))
    assert not torch.allclose(first[0], first[1])


def test_batch_equals_alone(encoder):
    # 3.5 s gives 348 fbank frames → 174 after the TDNN: a partial second 100-frame CAM segment.
    wavs = waveforms(56000, 720, 16000, 3000, seed=1)
    feats, lengths = encoder.compute_fbank(wavs)
    # Padded frames must not matter, whatever they hold.
    mask = torch.arange(feats.shape[1]) < lengths[:, None]
    feats = torch.where(mask[..., None], feats, torch.full_like(feats, 7.0))
    batched = encoder(feats, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = encoder(feats[i : i + 1, :n])
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder.embed(wavs), batched, atol=1e-5, rtol=1e-5)


def test_batchnorm_uses_running_statistics_in_train_mode(encoder):
    feats, lengths = encoder.compute_fbank(waveforms(8000, 12000))
    expected = encoder(feats, lengths)
    encoder.train()
    try:
        torch.testing.assert_close(encoder(feats, lengths), expected, atol=0, rtol=0)
    finally:
        encoder.eval()


def test_fbank_shape_and_mean_normalisation(encoder):
    wavs = waveforms(400, 16000, 5000)
    feats, lengths = encoder.compute_fbank(wavs)
    expected_lengths = [1 + (n - 400) // 160 for n in (400, 16000, 5000)]  # 25 ms windows, 10 ms hop
    assert lengths.tolist() == expected_lengths
    assert feats.shape == (3, max(expected_lengths), 80)
    for i, wav in enumerate(wavs):
        n = expected_lengths[i]
        reference = torchaudio.compliance.kaldi.fbank(wav[None], num_mel_bins=80, dither=0.0, sample_frequency=16000)
        torch.testing.assert_close(feats[i, :n], reference - reference.mean(0, keepdim=True))
        torch.testing.assert_close(feats[i, :n].mean(0), torch.zeros(80), atol=1e-4, rtol=0)
        assert torch.all(feats[i, n:] == 0)
    # (1, N) mono input is accepted like (N,).
    torch.testing.assert_close(encoder.compute_fbank([wavs[1][None]])[0][0], feats[1])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda e: e(torch.randn(50, 80)), ValueError, "feats must have shape"),
        (lambda e: e(torch.randn(1, 50, 64)), ValueError, "feats must have shape"),
        (lambda e: e(torch.randint(0, 3, (1, 50, 80))), TypeError, "float"),
        (lambda e: e(torch.randn(1, 2, 80)), ValueError, "at least 3"),
        (lambda e: e(torch.randn(2, 50, 80), torch.tensor([50, 51])), ValueError, "lengths must lie in"),
        (lambda e: e(torch.randn(2, 50, 80), torch.tensor([50, 2])), ValueError, "lengths must lie in"),
        (lambda e: e(torch.randn(2, 50, 80), torch.tensor([50])), ValueError, "lengths must be a 1-D"),
        (lambda e: e(torch.randn(2, 50, 80), torch.tensor([50.0, 40.0])), TypeError, "integer"),
        (lambda e: e.compute_fbank(torch.randn(16000)), TypeError, "list of 1-D tensors"),
        (lambda e: e.compute_fbank([]), ValueError, "at least one waveform"),
        (lambda e: e.compute_fbank([torch.randn(2, 16000)]), ValueError, "must be mono"),
        (lambda e: e.compute_fbank([torch.randn(399)]), ValueError, "at least 400"),
        (lambda e: e.compute_fbank([torch.zeros(0)]), ValueError, "at least 400"),
        (lambda e: e.compute_fbank([torch.randint(-5, 5, (16000,))]), TypeError, "float waveform"),
        (lambda e: e.embed([torch.randn(16000), torch.randn(719)]), ValueError, r"waveforms_16k\[1\].*720"),
    ],
)
def test_bad_inputs_raise(encoder, call, error, match):
    with pytest.raises(error, match=match):
        call(encoder)


def test_bad_config_raises():
    with pytest.raises(TypeError, match="MossSpeechCodecSpeakerConfig"):
        MossSpeechCodecSpeakerEncoder({"feat_dim": 80})
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        MossSpeechCodecSpeakerEncoder(tiny_speaker_config(block_kernel_sizes=[3, 4, 3]))


def _export(model: torch.nn.Module, path, exporter: str) -> None:
    example = (torch.randn(1, 120, model.config.feat_dim),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":  # torch's default exporter: its optimiser folds Conv→BN yet keeps the conv's name
            torch.onnx.export(model, example, str(path), dynamo=True)
        else:  # TorchScript exporter; constant folding fuses Conv→BN under opaque `onnx::Conv_*` names
            torch.onnx.export(model, example, str(path), dynamo=False, input_names=["input"], output_names=["output"],
                              do_constant_folding=exporter == "torchscript")


@pytest.fixture(scope="module")
def folded_onnx(encoder, tmp_path_factory):
    """The tiny encoder exported like an older campplus.onnx: BN folded into convs, opaque initializer names."""
    pytest.importorskip("onnx")
    path = tmp_path_factory.mktemp("onnx") / "campplus.onnx"
    _export(encoder, path, "torchscript")
    return path


@pytest.mark.parametrize("exporter", ["torchscript", "torchscript_unfolded", "dynamo"])
def test_onnx_round_trip(encoder, tmp_path, exporter, request):
    pytest.importorskip("onnx")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    from modeling_moss_speech.hub.convert_campplus_onnx import campplus_state_dict_from_onnx

    if exporter == "torchscript":
        path = request.getfixturevalue("folded_onnx")
    else:
        path = tmp_path / "campplus.onnx"
        _export(encoder, path, exporter)
    state = campplus_state_dict_from_onnx(path, encoder.config)
    assert set(state) == set(encoder.state_dict())
    if exporter == "torchscript_unfolded":  # every Conv and BatchNorm kept: a one-to-one copy
        assert all(torch.equal(state[k], v) for k, v in encoder.state_dict().items())
    reloaded = MossSpeechCodecSpeakerEncoder(encoder.config).eval()
    reloaded.load_state_dict(state, strict=True)
    feats, lengths = encoder.compute_fbank(waveforms(30000, 9000, seed=2))
    # Folding BN into convs re-associates float32 products: agreement to float32 rounding, not bit-exact.
    torch.testing.assert_close(reloaded(feats, lengths), encoder(feats, lengths), atol=1e-5, rtol=1e-5)


def test_onnx_conversion_is_strict_and_cli_writes_safetensors(encoder, folded_onnx, tmp_path):
    from safetensors.torch import load_file

    from modeling_moss_speech.hub.convert_campplus_onnx import campplus_state_dict_from_onnx, main

    path = folded_onnx
    # A config with one more dense layer in block 3 cannot be filled from this graph.
    with pytest.raises(ValueError, match=r"missing target tensors \[.*block3\.tdnnd3"):
        campplus_state_dict_from_onnx(path, tiny_speaker_config(block_layers=[2, 2, 3]))
    # One layer fewer leaves ONNX nodes unused.
    with pytest.raises(ValueError, match=r"unused ONNX ops \[.*Conv"):
        campplus_state_dict_from_onnx(path, tiny_speaker_config(block_layers=[2, 2, 1]))
    with pytest.raises(ValueError, match="existing .onnx file"):
        campplus_state_dict_from_onnx(tmp_path / "absent.onnx", encoder.config)

    config_path = tmp_path / "speaker_config.json"
    encoder.config.to_json_file(str(config_path))
    output = tmp_path / "campplus.safetensors"
    main([str(path), str(output), "--config", str(config_path), "--prefix", "speaker_encoder."])
    saved = load_file(str(output))
    assert set(saved) == {f"speaker_encoder.{k}" for k in encoder.state_dict()}
    reloaded = MossSpeechCodecSpeakerEncoder(encoder.config).eval()
    reloaded.load_state_dict({k.removeprefix("speaker_encoder."): v for k, v in saved.items()}, strict=True)
    feats, lengths = encoder.compute_fbank(waveforms(20000, seed=3))
    torch.testing.assert_close(reloaded(feats, lengths), encoder(feats, lengths), atol=1e-5, rtol=1e-5)
