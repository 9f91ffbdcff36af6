"""Shared fixtures (tiny random MOSS-Speech configs, offline, CPU, float32); the builders they call live in
helpers.py."""

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
from helpers import tiny_config  # noqa: E402

from modeling_moss_speech import MossSpeechConfig, MossSpeechForCausalLM  # noqa: E402

torch.set_num_threads(1)  # torch may have been imported (and its pool sized) before this file ran

@pytest.fixture
def config() -> MossSpeechConfig:
    return tiny_config()


@pytest.fixture
def model(config) -> MossSpeechForCausalLM:
    torch.manual_seed(0)
    return MossSpeechForCausalLM(config).eval()


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (on a busy machine more threads mostly wait on each other); the
    process's thread count is restored afterwards, so later tests compute exactly as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
