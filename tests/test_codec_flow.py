"""Flow-matching decoder of the codec (codes → mel): shapes, batching, determinism, voice prompt, validation,
streaming consistency and the release's parameter names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import NUM_CODES, TINY_FLOW, scaled_flow, tiny_flow_config

from modeling_moss_speech.configuration_moss_speech_codec import MossSpeechCodecFlowConfig
from modeling_moss_speech.modeling_moss_speech_codec_flow import MossSpeechCodecFlow

SPEC = Path(__file__).resolve().parent / "data" / "codec_keys_release.json"  # copy of shared/spec
VOCAB, MELS, RATIO, LOOKAHEAD = TINY_FLOW["vocab_size"], 80, 4, 3


@pytest.fixture(scope="module")
def flow() -> MossSpeechCodecFlow:
    return scaled_flow()


def voice_prompt(prompt_lens: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random prompt codes, prompt mel (4 frames per code) and x-vectors; rows padded with garbage past their length."""
    generator = torch.Generator().manual_seed(seed)
    batch, longest = len(prompt_lens), max(prompt_lens)
    prompt_len = torch.tensor(prompt_lens)
    prompt_token = torch.randint(0, NUM_CODES, (batch, longest), generator=generator)
    prompt_token[torch.arange(longest) >= prompt_len.unsqueeze(1)] = VOCAB + 5
    prompt_feat = torch.randn(batch, RATIO * longest, MELS, generator=generator) - 4.0
    return dict(prompt_token=prompt_token, prompt_token_len=prompt_len, prompt_feat=prompt_feat,
                prompt_feat_len=RATIO * prompt_len, embedding=torch.randn(batch, 192, generator=generator))


def codes(token_lens: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    token_len = torch.tensor(token_lens)
    token = torch.randint(0, NUM_CODES, (len(token_lens), max(token_lens)), generator=generator)
    token[torch.arange(token.size(1)) >= token_len.unsqueeze(1)] = -7  # padding values must be ignored
    return token, token_len


def row(inputs: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """One row of a padded batch, cut to its own lengths (as a caller decoding it alone would pass it)."""
    n = int(inputs["prompt_token_len"][index])
    return dict(prompt_token=inputs["prompt_token"][index : index + 1, :n],
                prompt_token_len=inputs["prompt_token_len"][index : index + 1],
                prompt_feat=inputs["prompt_feat"][index : index + 1, : RATIO * n],
                prompt_feat_len=inputs["prompt_feat_len"][index : index + 1],
                embedding=inputs["embedding"][index : index + 1])


def test_output_has_four_frames_per_new_code(flow):
    token, token_len = codes([7, 3])
    mel, mel_len = flow.inference(token, token_len, **voice_prompt([2, 5]))
    assert mel.dtype == torch.float32
    assert mel.shape == (2, MELS, RATIO * 7)
    assert mel_len.tolist() == [RATIO * 7, RATIO * 3]
    assert torch.isfinite(mel).all()
    assert mel[1, :, RATIO * 3 :].abs().max() == 0  # padding past the row's frames
    # Without a voice prompt (the release's defaults: no prompt codes/mel, zero x-vector).
    mel, mel_len = flow.inference(token[:1], token_len[:1])
    assert mel.shape == (1, MELS, RATIO * 7) and mel_len.tolist() == [RATIO * 7]


@pytest.mark.parametrize("finalize,streaming", [(True, False), (True, True), (False, True)])
def test_batch_matches_each_row_alone(flow, finalize, streaming):
    prompt_lens, token_lens = [3, 0, 6], [6, 9, 4]
    inputs = voice_prompt(prompt_lens)
    inputs["embedding"][1] = 0.0  # a row without voice prompt at all
    token, token_len = codes(token_lens)
    mel, mel_len = flow.inference(token, token_len, finalize=finalize, streaming=streaming, **inputs)
    expected_len = [RATIO * (n - (0 if finalize else LOOKAHEAD)) for n in token_lens]
    assert mel_len.tolist() == expected_len
    for i, n in enumerate(token_lens):
        alone, alone_len = flow.inference(token[i : i + 1, :n], token_len[i : i + 1], finalize=finalize,
                                          streaming=streaming, **row(inputs, i))
        assert alone_len.tolist() == [expected_len[i]]
        torch.testing.assert_close(mel[i : i + 1, :, : expected_len[i]], alone, atol=1e-4, rtol=0)


def test_deterministic_and_leaves_global_rng_alone(flow):
    token, token_len = codes([8, 5])
    inputs = voice_prompt([4, 2])
    state = torch.get_rng_state()
    first, _ = flow.inference(token, token_len, **inputs)
    second, _ = flow.inference(token, token_len, **inputs)
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)


def test_fixed_noise_is_the_release_draw_and_not_in_state_dict():
    config = tiny_flow_config(vocab_size=16, estimator_num_mid_blocks=0, encoder_num_blocks=1)
    torch.manual_seed(123)
    a = MossSpeechCodecFlow(config)
    torch.manual_seed(456)
    b = MossSpeechCodecFlow(config)
    # The release draws it right after seeding the global RNG with 0 (in its flow decoder's inference code).
    torch.manual_seed(config.noise_seed)
    release = torch.randn(1, MELS, config.noise_max_frames)
    assert torch.equal(a.decoder.rand_noise, release) and torch.equal(b.decoder.rand_noise, release)
    assert not any("rand_noise" in key for key in a.state_dict())
    a.decoder.rand_noise.zero_()
    state = torch.get_rng_state()
    a.reset_noise()
    assert torch.equal(a.decoder.rand_noise, release)
    assert torch.equal(torch.get_rng_state(), state)


def test_voice_prompt_changes_the_output(flow):
    token, token_len = codes([6])
    plain, _ = flow.inference(token, token_len)
    inputs = voice_prompt([5])
    prompted, _ = flow.inference(token, token_len, **inputs)
    assert prompted.shape == plain.shape
    assert (prompted - plain).abs().max() > 1e-2
    speaker_only, _ = flow.inference(token, token_len, embedding=inputs["embedding"])
    assert (speaker_only - plain).abs().max() > 1e-2
    other_codes, _ = flow.inference(torch.roll(token, 1, dims=1), token_len)
    assert (other_codes - plain).abs().max() > 1e-2


def test_streaming_prefix_is_stable_at_chunk_boundaries(flow):
    """With chunk masks, decoding committed codes + lookahead gives the same mel as the final decode for whole chunks:
    what a streaming decoder relies on to emit mel early."""
    chunk = flow.config.encoder_static_chunk_size
    inputs = voice_prompt([chunk])
    token, token_len = codes([2 * chunk + LOOKAHEAD + 2])
    final, _ = flow.inference(token, token_len, streaming=True, **inputs)
    partial_len = torch.tensor([chunk + LOOKAHEAD])
    partial, partial_mel_len = flow.inference(token[:, : chunk + LOOKAHEAD], partial_len, streaming=True,
                                              finalize=False, **inputs)
    assert partial_mel_len.tolist() == [RATIO * chunk]
    torch.testing.assert_close(partial, final[:, :, : RATIO * chunk], atol=1e-5, rtol=0)


def test_invalid_inputs_raise(flow):
    token, token_len = codes([5])
    with pytest.raises(ValueError, match="token must hold speech codes in \\[0, 64\\)"):
        flow.inference(token.clamp(min=0).index_fill(1, torch.tensor([2]), NUM_CODES), token_len, num_codes=NUM_CODES)
    with pytest.raises(ValueError, match="token must hold speech codes"):
        flow.inference(token.clamp(min=0).index_fill(1, torch.tensor([0]), VOCAB), token_len)
    with pytest.raises(ValueError, match="token must hold speech codes"):
        flow.inference(token.index_fill(1, torch.tensor([1]), -1), token_len)
    bad_prompt = voice_prompt([3])
    bad_prompt["prompt_token"][0, 1] = NUM_CODES + 1
    with pytest.raises(ValueError, match="prompt_token must hold speech codes"):
        flow.inference(token, token_len, num_codes=NUM_CODES, **bad_prompt)
    with pytest.raises(ValueError, match="token must be a \\(batch, length\\) tensor"):
        flow.inference(token[0], token_len)
    with pytest.raises(TypeError, match="token must be an integer tensor"):
        flow.inference(token.float(), token_len)
    with pytest.raises(ValueError, match="embedding must be a \\(1, 192\\)"):
        flow.inference(token, token_len, embedding=torch.zeros(1, 80))
    with pytest.raises(ValueError, match="prompt_feat must be a \\(1, frames, 80\\)"):
        flow.inference(token, token_len, **{**voice_prompt([2]), "prompt_feat": torch.zeros(1, 8, 40)})
    with pytest.raises(ValueError, match="prompt_feat_len must be 4 × prompt_token_len"):
        flow.inference(token, token_len, **{**voice_prompt([2]), "prompt_feat_len": torch.tensor([7])})
    with pytest.raises(ValueError, match="token_len must lie in \\[4, 5\\]"):
        flow.inference(token, torch.tensor([3]), finalize=False)
    with pytest.raises(ValueError, match="token_len must be a 1-D tensor of 1 lengths"):
        flow.inference(token, torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="num_codes must be an integer"):
        flow.inference(token, token_len, num_codes=VOCAB + 1)
    with pytest.raises(ValueError, match="noise_max_frames"):
        flow.inference(torch.zeros(1, 501, dtype=torch.long), torch.tensor([501]))
    # Values past a row's length are padding: never validated, never decoded.
    flow.inference(token, token_len, num_codes=NUM_CODES)


def test_save_and_load_roundtrip(flow, tmp_path):
    flow.config.save_pretrained(tmp_path)
    torch.save(flow.state_dict(), tmp_path / "flow.pt")
    config = MossSpeechCodecFlowConfig.from_pretrained(tmp_path)
    restored = MossSpeechCodecFlow(config).eval()
    restored.load_state_dict(torch.load(tmp_path / "flow.pt", weights_only=True))
    token, token_len = codes([6])
    inputs = voice_prompt([3])
    torch.testing.assert_close(restored.inference(token, token_len, **inputs)[0],
                               flow.inference(token, token_len, **inputs)[0], atol=0, rtol=0)


def test_release_size_parameter_names_and_shapes():
    release = json.loads(SPEC.read_text())
    with torch.device("meta"):
        model = MossSpeechCodecFlow(MossSpeechCodecFlowConfig())
    shapes = {name: list(p.shape) for name, p in model.state_dict().items()}
    assert sorted(shapes) == sorted(release["flow"])
    assert shapes == release["flow"]
    assert sum(p.numel() for p in model.parameters()) == release["numel"]["flow"]


def test_inference_noise_scale_sets_the_odes_starting_noise(flow):
    """Scale 0 integrates from zeros (the nano codec's setting): the fixed noise no longer matters; the default 1.0
    is the release's unit noise."""
    token, token_len = codes([8, 5])
    inputs = voice_prompt([4, 2])
    assert MossSpeechCodecFlowConfig().inference_noise_scale == 1.0
    results = {}
    for scale in (1.0, 0.0):
        flow.config.inference_noise_scale = scale
        try:
            per_seed = []
            for seed in (0, 1):
                flow.config.noise_seed = seed
                flow.reset_noise()
                per_seed.append(flow.inference(token, token_len, **inputs)[0])
        finally:
            flow.config.inference_noise_scale, flow.config.noise_seed = 1.0, 0
            flow.reset_noise()
        results[scale] = per_seed
    assert not torch.allclose(*results[1.0])  # unit noise: the draw shapes the mel
    assert torch.equal(*results[0.0])  # no noise: one deterministic path whatever the draw
    with pytest.raises(ValueError, match="inference_noise_scale"):
        tiny_flow_config(inference_noise_scale=-0.5)
