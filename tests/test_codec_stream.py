"""Bounded-work streaming: the cached flow equals the re-run streaming flow, the streamed HiFT equals a one-pass
vocoding, and the stream decoder chains both."""

from __future__ import annotations

import pytest
import torch
from helpers import NUM_CODES, scaled_flow, tiny_codec_config, tiny_vocoder_config

from modeling_moss_speech import MossSpeechCodecModel
from modeling_moss_speech.configuration_moss_speech_codec import MossSpeechCodecVocoderConfig
from modeling_moss_speech.modeling_moss_speech_codec_griffin_lim import MossSpeechCodecGriffinLim
from modeling_moss_speech.modeling_moss_speech_codec_stream import (
    MossSpeechFlowStream,
    MossSpeechVocoderStream,
    vocoder_receptive_field,
)
from modeling_moss_speech.modeling_moss_speech_codec_vocoder import MossSpeechCodecVocoder

LOOKAHEAD, RATIO = 3, 4


def rerun_reference(flow, codes, chunk, prompt_token, prompt_feat, embedding) -> list[torch.Tensor]:
    """Today's path: the streaming flow re-run over everything received for each chunk, the end without lookahead."""
    pieces, done = [], 0
    prompt = dict(prompt_token=prompt_token[None], prompt_feat=prompt_feat[None], embedding=embedding[None])
    while done + chunk + LOOKAHEAD <= codes.numel():
        target = done + chunk
        mel, _ = flow.inference(codes[None, : target + LOOKAHEAD], finalize=False, streaming=True, **prompt)
        pieces.append(mel[:, :, done * RATIO : target * RATIO])
        done = target
    mel, _ = flow.inference(codes[None], finalize=True, streaming=True, **prompt)
    pieces.append(mel[:, :, done * RATIO :])
    return pieces


def stream_pieces(stream: MossSpeechFlowStream, codes: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """The cached stream's mel pieces, `chunk` codes at a time (as `rerun_reference` cuts them)."""
    pieces, done = [], 0
    while done + chunk + LOOKAHEAD <= codes.numel():
        pieces.append(stream.step(codes[: done + chunk + LOOKAHEAD], done + chunk))
        done += chunk
    pieces.append(stream.step(codes, codes.numel(), finalize=True))
    return pieces


@pytest.mark.parametrize("chunks", [{}, {"encoder_static_chunk_size": 3, "estimator_static_chunk_size": 8},
                                    {"inference_noise_scale": 0.0},  # the nano codec's zero starting noise
                                    # a bounded estimator context: 0, 1 and 3 chunks before a query's own
                                    {"estimator_static_chunk_size": 8, "estimator_left_chunks": 0},
                                    {"estimator_static_chunk_size": 8, "estimator_left_chunks": 1},
                                    {"estimator_left_chunks": 3}])
def test_cached_flow_equals_rerun_streaming_flow(chunks):
    flow = scaled_flow(**chunks)
    generator = torch.Generator().manual_seed(2)
    # long enough for a bounded context to drop (and the cache to trim) keys several times
    codes = torch.randint(0, NUM_CODES, (60 if "estimator_left_chunks" in chunks else 22,), generator=generator)
    for prompt_len in (0, 7):
        prompt_token = torch.randint(0, NUM_CODES, (prompt_len,), generator=generator)
        prompt_feat = torch.randn(RATIO * prompt_len, 80, generator=generator)
        embedding = torch.randn(192, generator=generator)
        for chunk in (1, 4, 7):
            reference = rerun_reference(flow, codes, chunk, prompt_token, prompt_feat, embedding)
            stream = MossSpeechFlowStream(flow, prompt_token, prompt_feat, embedding, num_codes=NUM_CODES)
            pieces, done = [], 0
            while done + chunk + LOOKAHEAD <= codes.numel():
                pieces.append(stream.step(codes[: done + chunk + LOOKAHEAD], done + chunk))
                done += chunk
                # Bounded work: everything before the last complete chunk is committed (never computed again).
                chunk_codes = flow.config.encoder_static_chunk_size
                assert stream.code_done > prompt_len + done - chunk_codes
            pieces.append(stream.step(codes, codes.numel(), finalize=True))
            assert [p.shape for p in pieces] == [r.shape for r in reference]
            torch.testing.assert_close(torch.cat(pieces, 2), torch.cat(reference, 2), atol=1e-4, rtol=0)


def test_bounded_estimator_context_keeps_the_prompt_and_bounds_the_cache():
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, NUM_CODES, (120,), generator=generator)
    prompt_token = torch.randint(0, NUM_CODES, (6,), generator=generator)
    prompt_feat, embedding = torch.randn(RATIO * 6, 80, generator=generator), torch.randn(192, generator=generator)
    full, bounded = scaled_flow(estimator_static_chunk_size=8), scaled_flow(estimator_static_chunk_size=8,
                                                                               estimator_left_chunks=2)
    with torch.no_grad():
        exact = torch.cat(stream_pieces(MossSpeechFlowStream(full, prompt_token, prompt_feat, embedding,
                                                             num_codes=NUM_CODES), codes, 5), 2)
        cut = MossSpeechFlowStream(bounded, prompt_token, prompt_feat, embedding, num_codes=NUM_CODES)
        sizes = []
        for done in range(0, codes.numel() - 5 - LOOKAHEAD + 1, 5):
            cut.step(codes[: done + 5 + LOOKAHEAD], done + 5)
            sizes.append(sum(c.nbytes() for d in cut.step_caches for c in d.values()))
        # Frames within the context of every query are unchanged; later ones differ (the bound is applied).
        near = torch.cat(stream_pieces(MossSpeechFlowStream(bounded, prompt_token, prompt_feat, embedding,
                                                            num_codes=NUM_CODES), codes, 5), 2)
    torch.testing.assert_close(near[:, :, :16], exact[:, :, :16], atol=1e-4, rtol=0)
    assert (near[:, :, 200:] - exact[:, :, 200:]).abs().max() > 1e-2
    # The estimator caches stop growing once the context is full (the conformer's keep growing, much smaller).
    assert max(sizes[len(sizes) // 2 :]) == max(sizes[len(sizes) // 4 :])
    # The prompt's frames stay visible: another prompt of the same length changes the end of the stream.
    other = torch.cat(stream_pieces(MossSpeechFlowStream(bounded, prompt_token, prompt_feat.flip(0), embedding,
                                                         num_codes=NUM_CODES), codes, 5), 2)
    assert (other[:, :, -40:] - near[:, :, -40:]).abs().max() > 1e-3


def test_flow_stream_rejects_misuse():
    flow = scaled_flow()
    stream = MossSpeechFlowStream(flow, num_codes=NUM_CODES)
    with pytest.raises(ValueError, match="at least 8 codes"):
        stream.step(torch.arange(7), 5)
    with pytest.raises(ValueError, match="speech codes in \\[0, 64\\)"):
        stream.step(torch.tensor([1, 2, 3, 64, 5]), 2)
    with pytest.raises(TypeError, match="integer"):
        stream.step(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="prompt_feat"):
        MossSpeechFlowStream(flow, torch.arange(3), torch.zeros(5, 80))
    assert stream.step(torch.arange(8), 5).shape == (1, 80, 20)
    with pytest.raises(ValueError, match="num_out must be an integer >= 5"):
        stream.step(torch.arange(8), 4)
    assert stream.step(torch.arange(6), 6, finalize=True).shape == (1, 80, 4)
    with pytest.raises(ValueError, match="finalized"):
        stream.step(torch.arange(6), 6, finalize=True)


def silent_noise(vocoder):
    """Switch the excitation's random part off (sines only) for exact comparisons."""
    source = vocoder.m_source
    source.draw_noise = lambda lengths, total, generator, device: torch.zeros(
        len(lengths), source.num_harmonics, total, device=device)


def stream_vocode(vocoder, mel, chunk, generator=None):
    stream = MossSpeechVocoderStream(vocoder, generator)
    stream.source_log = []
    pieces = [stream.push(mel[:, :, i : i + chunk]) for i in range(0, mel.shape[-1], chunk)]
    pieces.append(stream.flush())
    return torch.cat(pieces), torch.cat(stream.source_log, dim=2)


def snr_db(reference, estimate):
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - estimate).pow(2).sum()))


def test_streamed_hift_is_seamless():
    torch.manual_seed(0)
    vocoder = MossSpeechCodecVocoder(tiny_vocoder_config()).eval()
    mel = torch.randn(1, 80, 90, generator=torch.Generator().manual_seed(3)) - 4
    left, right = vocoder_receptive_field(vocoder)
    assert 1 <= left < 30 and 1 <= right < 30
    # Noise on: the stream equals one pass over its mel with its own excitation, for any chunking.
    for chunk in (5, 23, 90):
        wav, source = stream_vocode(vocoder, mel, chunk, torch.Generator().manual_seed(0))
        assert wav.numel() == 90 * vocoder.hop_length
        with torch.no_grad():
            one_pass = vocoder._decode(mel, source, None)[0]
        torch.testing.assert_close(wav, one_pass, atol=1e-5, rtol=0)
    # Only the noise draw differs from the offline vocoder: the stream is as close to an offline decode as another
    # offline decode with a different seed is (the noise floor), not worse.
    with torch.no_grad():
        offline = vocoder(mel, generator=torch.Generator().manual_seed(0))[0][0]
        other_seed = vocoder(mel, generator=torch.Generator().manual_seed(1))[0][0]
    assert snr_db(offline, wav) > snr_db(offline, other_seed) - 1.0
    # Noise off: the stream is the offline waveform (phase carried across chunks, F0 from the whole mel).
    silent_noise(vocoder)
    with torch.no_grad():
        offline = vocoder(mel)[0][0]
    for chunk in (5, 23):
        torch.testing.assert_close(stream_vocode(vocoder, mel, chunk)[0], offline, atol=1e-5, rtol=0)
    # Too little context leaves seams: the receptive field is what makes the stream exact.
    short = MossSpeechVocoderStream(vocoder, context_frames=1)
    seamed = torch.cat([short.push(mel[:, :, i : i + 5]) for i in range(0, 90, 5)] + [short.flush()])
    assert (seamed - offline).abs().max() > 1e-3


def test_vocoder_stream_rejects_misuse():
    griffin_lim = MossSpeechCodecGriffinLim(MossSpeechCodecVocoderConfig())
    with pytest.raises(TypeError, match="HiFT"):
        MossSpeechVocoderStream(griffin_lim)
    vocoder = MossSpeechCodecVocoder(tiny_vocoder_config())
    with pytest.raises(ValueError, match="context_frames"):
        MossSpeechVocoderStream(vocoder, context_frames=-1)
    stream = MossSpeechVocoderStream(vocoder.eval())
    with pytest.raises(ValueError, match="mel must be"):
        stream.push(torch.zeros(1, 79, 4))
    stream.flush()
    with pytest.raises(ValueError, match="flushed"):
        stream.push(torch.zeros(1, 80, 4))


def test_stream_decoder_chains_cached_flow_and_seamless_vocoder():
    """Noise off: streamed speech = the offline HiFT over the re-run streaming flow's mel, with a voice prompt."""
    torch.manual_seed(0)
    codec = MossSpeechCodecModel(tiny_codec_config()).eval()
    silent_noise(codec.hift)
    prompt = codec.voice_prompt(torch.randn(16000) * 0.1, sampling_rate=16000)
    codes = torch.randint(0, 64, (29,), generator=torch.Generator().manual_seed(4))
    chunks = list(codec.stream_decode(codes.split(3), voice_prompt=prompt, chunk_size=6))
    assert len(chunks) >= 3
    reference = torch.cat(rerun_reference(codec.flow, codes, 6, prompt.tokens, prompt.mel,
                                          prompt.speaker_embedding), dim=2)
    with torch.no_grad():
        expected = codec.hift(reference)[0][0]
    streamed = torch.cat(chunks)
    assert streamed.numel() == 29 * 1920
    torch.testing.assert_close(streamed, expected, atol=1e-4, rtol=0)
