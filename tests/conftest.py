"""Shared fixtures: tiny random MOSS-Speech configs and grids (offline, CPU, float32)."""

from __future__ import annotations

import os

# One torch thread per process, for this process and every subprocess a test starts (CLI runs, training scripts):
# on a busy machine more threads than idle cores make the same work many times slower (the
# CLI chat took 6-18 s with 2 threads vs 0.4-0.9 s with 1 on a loaded 2-core machine). Set before torch
# starts its thread pool; tests that need more threads set them explicitly.
os.environ["OMP_NUM_THREADS"] = "1"
# Tests never download: the Hub client reads this once, at import, so it is set before anything imports it (a test
# that sets it later with monkeypatch would not take effect).
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from modeling_moss_speech import MossSpeechConfig, MossSpeechForCausalLM  # noqa: E402
from modeling_moss_speech.grid_moss_speech import GridLayout  # noqa: E402

torch.set_num_threads(1)  # torch may have been imported (and its pool sized) before this file ran

# Tiny special ids, mirroring the release's roles: text pad / im_end stop the turn, sosp opens speech,
# modality_pad marks speech rows; in the audio vocabulary, codes < EOSP, then eosp, then unused ids.
PAD, IM_END, SOSP, MODALITY_PAD = 280, 282, 290, 291
AUDIO_PAD, EOSP, AUDIO_VOCAB = 10, 64, 80
LAYOUT = GridLayout(SOSP, EOSP, MODALITY_PAD, AUDIO_PAD, text_pad_token_id=PAD)


def tiny_config(**overrides) -> MossSpeechConfig:
    """A 2-trunk + 1-tail model with hidden size 32: fast enough for many generate() calls."""
    values = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_shared_layers=2,
        num_modality_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        audio_vocab_size=AUDIO_VOCAB,
        sosp_token_id=SOSP,
        modality_pad_token_id=MODALITY_PAD,
        pad_token_id=PAD,
        eos_token_id=[PAD, IM_END],
        eosp_token_id=EOSP,
        audio_pad_token_id=AUDIO_PAD,
        max_position_embeddings=512,
    )
    values.update(overrides)
    return MossSpeechConfig(**values)


@pytest.fixture
def config() -> MossSpeechConfig:
    return tiny_config()


@pytest.fixture
def model(config) -> MossSpeechForCausalLM:
    torch.manual_seed(0)
    return MossSpeechForCausalLM(config).eval()


def text_rows(ids: list[int]) -> list[list[int]]:
    """Grid rows for a run of text tokens (audio channel = audio pad)."""
    return LAYOUT.text_rows(ids)


def audio_rows(codes: list[int]) -> list[list[int]]:
    """Grid rows of a speech segment as the processor builds it: sosp row, codes, eosp row."""
    return LAYOUT.speech_rows(codes)


def make_prompt(seed: int, length: int, ends_in_speech: bool = False) -> torch.Tensor:
    """A (L, 2) prompt mixing text rows and a speech segment; ends with the audio-output prefix if asked."""
    g = torch.Generator().manual_seed(seed)
    n_text = max(1, length // 2)
    text = torch.randint(0, 250, (n_text,), generator=g).tolist()
    codes = torch.randint(0, EOSP, (max(1, length - n_text - 2),), generator=g).tolist()
    rows = text_rows(text) + audio_rows(codes)
    rows += text_rows([SOSP] if ends_in_speech else [7])
    return torch.tensor(rows, dtype=torch.long)


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad (L_i, 2) prompts to a (B, L, 2) grid and (B, L) mask with the release's pad values."""
    return LAYOUT.left_pad(prompts)


def espeak(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50):
    """Real speech from espeak-ng (installed by .ci/run): (float32 waveform, sampling rate 22050)."""
    import shutil
    import subprocess
    import tempfile

    import soundfile as sf

    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: run the README's test command (it installs espeak-ng and sox)")
    with tempfile.NamedTemporaryFile(suffix=".wav") as handle:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", handle.name, text],
                       check=True, capture_output=True)
        wav, rate = sf.read(handle.name, dtype="float32")
    return torch.from_numpy(wav), rate


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (on a busy machine more threads mostly wait on each other); the
    process's thread count is restored afterwards, so later tests compute exactly as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
