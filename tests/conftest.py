"""Shared fixtures (tiny random MOSS-Speech configs, offline, CPU, float32) and grid builders; the builders they
call live in helpers.py."""

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
from helpers import AUDIO_PAD, EOSP, MODALITY_PAD, PAD, SOSP, tiny_config  # noqa: E402

from modeling_moss_speech import MossSpeechConfig, MossSpeechForCausalLM  # noqa: E402

torch.set_num_threads(1)  # torch may have been imported (and its pool sized) before this file ran

@pytest.fixture
def config() -> MossSpeechConfig:
    return tiny_config()


@pytest.fixture
def model(config) -> MossSpeechForCausalLM:
    torch.manual_seed(0)
    return MossSpeechForCausalLM(config).eval()


def text_rows(ids: list[int]) -> list[list[int]]:
    """Grid rows for a run of text tokens (audio channel = audio pad)."""
    return [[i, AUDIO_PAD] for i in ids]


def audio_rows(codes: list[int]) -> list[list[int]]:
    """Grid rows of a speech segment as the processor builds it: sosp row, codes, eosp row."""
    return [[SOSP, AUDIO_PAD]] + [[MODALITY_PAD, c] for c in codes] + [[MODALITY_PAD, EOSP]]


def make_prompt(seed: int, length: int, ends_in_speech: bool = False) -> torch.Tensor:
    """A (L, 2) prompt mixing text rows and a speech segment; ends with the audio-output prefix if asked."""
    g = torch.Generator().manual_seed(seed)
    n_text = max(1, length // 2)
    text = torch.randint(0, 250, (n_text,), generator=g).tolist()
    codes = torch.randint(0, EOSP, (max(1, length - n_text - 2),), generator=g).tolist()
    rows = text_rows(text) + audio_rows(codes)
    rows += [[SOSP, AUDIO_PAD]] if ends_in_speech else text_rows([7])
    return torch.tensor(rows, dtype=torch.long)


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad (L_i, 2) prompts to a (B, L, 2) grid and (B, L) mask with the release's pad values."""
    length = max(p.shape[0] for p in prompts)
    grid = torch.empty(len(prompts), length, 2, dtype=torch.long)
    grid[..., 0], grid[..., 1] = PAD, AUDIO_PAD
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        grid[i, length - p.shape[0] :] = p
        mask[i, length - p.shape[0] :] = 1
    return grid, mask


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (on a busy machine more threads mostly wait on each other); the
    process's thread count is restored afterwards, so later tests compute exactly as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
