"""Training loss of the flow-matching decoder (`MossSpeechCodecFlow.compute_loss`, CosyVoice2's recipe)."""

from __future__ import annotations

import pytest
import torch
from helpers import NUM_CODES, tiny_flow_config

from modeling_moss_speech.modeling_moss_speech_codec_flow import MossSpeechCodecFlow

RATIO = 4
NO_DROPOUT = dict(encoder_dropout_rate=0.0, encoder_positional_dropout_rate=0.0, encoder_attention_dropout_rate=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def target_mel(length: int) -> torch.Tensor:
    """A smooth, code-independent 'log-mel' (frames, 80) in the range of real ones."""
    frames = torch.arange(RATIO * length, dtype=torch.float32)[:, None]
    bins = torch.arange(80, dtype=torch.float32)[None]
    return torch.linspace(-6.0, -1.0, 80)[None] + torch.sin(frames / 3.0 + bins / 10.0)


def test_overfits_one_utterance_and_inference_follows():
    """A few hundred steps on one utterance: the loss drops and the ODE decode lands on the target mel, so the
    training objective and the inference path (noise, scheduler, guidance, masks) agree."""
    torch.manual_seed(0)
    flow = MossSpeechCodecFlow(tiny_flow_config(encoder_num_blocks=1, n_timesteps=6, **NO_DROPOUT))
    generator = torch.Generator().manual_seed(0)
    length = 10
    token = torch.randint(0, NUM_CODES, (1, length), generator=generator)
    feat = target_mel(length)[None]

    def decode_error() -> float:
        flow.eval()
        mel, _ = flow.inference(token, torch.tensor([length]))
        flow.train()
        return float((mel[0].T - feat[0]).abs().mean())

    before = decode_error()
    optimizer = torch.optim.AdamW(flow.parameters(), lr=3e-3)
    batch = 4
    losses = []
    for _ in range(150):
        loss = flow.compute_loss(token.expand(batch, -1), torch.full((batch,), length), feat.expand(batch, -1, -1),
                                 generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first / 5
    after = decode_error()
    assert after < before / 2.5 and after < 1.5


def test_loss_is_reproducible_masks_padding_and_uses_the_prompt_prefix():
    torch.manual_seed(0)
    flow = MossSpeechCodecFlow(tiny_flow_config(**NO_DROPOUT)).train()  # dropout draws from the global RNG
    token = torch.randint(0, NUM_CODES, (2, 6))
    token[1, 4:] = -3  # padding: never embedded
    token_len = torch.tensor([6, 4])
    feat = torch.stack([target_mel(6), target_mel(6)])

    def loss(**kwargs) -> torch.Tensor:
        return flow.compute_loss(token, token_len, feat, generator=torch.Generator().manual_seed(5), **kwargs)

    first = loss()
    assert first.ndim == 0 and torch.isfinite(first)
    assert torch.equal(first, loss())
    padded = feat.clone()
    padded[1, 16:] = 100.0  # frames past the row's 4 codes do not count
    assert torch.equal(first, flow.compute_loss(token, token_len, padded, generator=torch.Generator().manual_seed(5)))
    first.backward()
    assert all(p.grad is not None for p in flow.parameters() if p.requires_grad)
    # Fixed modes and extra inputs are accepted; a prompt prefix changes what is conditioned on and counted.
    for streaming in (False, True):
        assert torch.isfinite(loss(streaming=streaming))
    assert not torch.equal(loss(prompt_probability=1.0, prompt_ratio=0.9), loss(prompt_probability=0.0))
    assert torch.isfinite(loss(embedding=torch.randn(2, 192)))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(token=torch.zeros(2, 6)), TypeError, "token must be an integer tensor"),
        (dict(token=torch.full((2, 6), 80)), ValueError, "token must hold speech codes in \\[0, 80\\)"),
        (dict(token_len=torch.tensor([7, 4])), ValueError, "token_len must lie in \\[1, 6\\]"),
        (dict(feat=torch.zeros(2, 20, 80)), ValueError, "feat must be a \\(2, >= 24, 80\\)"),
        (dict(feat_len=torch.tensor([24, 20])), ValueError, "feat_len must be 4 × token_len"),
        (dict(embedding=torch.zeros(2, 80)), ValueError, "embedding must be a \\(2, 192\\)"),
        (dict(prompt_ratio=1.0), ValueError, "prompt_ratio must lie in \\[0, 1\\)"),
    ],
)
def test_bad_training_input(change, error, message):
    flow = MossSpeechCodecFlow(tiny_flow_config())
    inputs = dict(token=torch.zeros(2, 6, dtype=torch.long), token_len=torch.tensor([6, 4]),
                  feat=torch.zeros(2, 24, 80))
    inputs.update(change)
    with pytest.raises(error, match=message):
        flow.compute_loss(**inputs)
