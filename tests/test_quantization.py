"""Quantized LM weights through transformers' public `quantization_config`: torchao int8 weight-only on CPU (the
shipped nano loads, answers the example question like the float model, and its codec stays float32), and
bitsandbytes 8/4-bit where a CUDA GPU and bitsandbytes are present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, BitsAndBytesConfig, TorchAoConfig

from modeling_moss_speech import MossSpeechChat, MossSpeechForCausalLM, pretrained
from modeling_moss_speech.apps.evaluation import greedy_kwargs, normalize_answer

torchao = pytest.importorskip("torchao", reason="quantization needs the [quant] extra: pip install -e '.[dev]'")
from torchao.quantization import Int8WeightOnlyConfig  # noqa: E402 - after the skip

ROOT = Path(__file__).resolve().parents[1]
QUESTION = ROOT / "examples" / "colour_of_banana.wav"


def _is_quantized(weight: torch.Tensor) -> bool:
    inner = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    return type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__")


@pytest.fixture(scope="module")
def models():
    path = pretrained.nano_path()
    reference = MossSpeechForCausalLM.from_pretrained(path).eval()
    quantized = MossSpeechForCausalLM.from_pretrained(
        path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())).eval()
    return reference, quantized, AutoProcessor.from_pretrained(path)


def test_int8_weight_only_quantizes_every_decoder_linear(models):
    _, quantized, processor = models
    linears = {name: module for name, module in quantized.named_modules() if isinstance(module, torch.nn.Linear)}
    layers = {name for name in linears if ".layers." in name}
    assert layers and all(_is_quantized(linears[name].weight) for name in layers)
    # The heads (and the embeddings) stay float: transformers leaves the output embeddings out by default.
    assert not any(_is_quantized(linears[name].weight) for name in set(linears) - layers)
    # The codec is a separate float32 model: nothing in it is quantized.
    codec_params = list(processor.codec.parameters())
    assert codec_params and all(p.dtype == torch.float32 and not _is_quantized(p) for p in codec_params)


def test_quantized_logits_stay_close_over_a_spoken_answer(models):
    reference, quantized, _ = models
    config = reference.config
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(5, config.vocab_size - 8, (1, 32), generator=generator)
    prompt = torch.stack([text, torch.full_like(text, config.audio_pad_token_id)], dim=-1)
    prompt[:, -1, 0] = config.sosp_token_id
    with torch.inference_mode():
        rows = reference.generate(prompt, max_new_tokens=200, do_sample=False, eos_token_id=[])
        sequence = torch.cat([prompt, rows], dim=1)
        ref, quant = reference(sequence), quantized(sequence)
    for channel in ("text_logits", "audio_logits"):
        a, b = ref[channel][0, -200:], quant[channel][0, -200:]
        # Per-row int8 weights: bench/bench_quant.py measured max |diff| 0.05 (text) / 0.11 (audio) against logits
        # spanning ~30, and identical top-1 ids at all 200 positions; the bounds leave room for summation order.
        assert (a - b).abs().max() < 0.5, channel
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.98, channel


def test_quantized_nano_answers_the_spoken_question(models):
    reference, quantized, processor = models
    conversation = [{"role": "user", "content": {"type": "audio", "path": str(QUESTION)}}]
    answers = {}
    for name, model in (("float32", reference), ("int8", quantized)):
        reply = MossSpeechChat(model, processor).reply(conversation, output_modality="audio", **greedy_kwargs(40))
        assert reply.audio is not None and reply.codes.numel() > 0, name
        assert reply.audio.numel() == 1920 * reply.codes.numel()
        answers[name] = normalize_answer(processor.codec.transcribe_codes([reply.codes])[0])
    assert answers["int8"] == answers["float32"] == "yellow"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes quantization needs a CUDA GPU; none here")
@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_on_cuda(bits):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    config = BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4)
    path = pretrained.nano_path()
    reference = MossSpeechForCausalLM.from_pretrained(path).eval().to("cuda")
    quantized = MossSpeechForCausalLM.from_pretrained(path, quantization_config=config, device_map="cuda").eval()
    names = {type(m).__name__ for m in quantized.modules()}
    assert ("Linear8bitLt" if bits == 8 else "Linear4bit") in names
    prompt = torch.tensor([[[reference.config.sosp_token_id, reference.config.audio_pad_token_id]]], device="cuda")
    with torch.inference_mode():
        rows = quantized.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=[])
        sequence = torch.cat([prompt, rows], dim=1)
        agreement = (reference(sequence).audio_logits.argmax(-1) == quantized(sequence).audio_logits.argmax(-1))
    assert rows.shape == (1, 20, 2)
    assert agreement.float().mean() >= 0.8
