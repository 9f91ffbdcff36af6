"""from_text_model parity, training-stage freezing, grid labels."""

from __future__ import annotations

import pytest
import torch
from helpers import AUDIO_PAD, EOSP, MODALITY_PAD, SOSP, make_prompt, tiny_config
from transformers import Qwen3Config, Qwen3ForCausalLM

from modeling_moss_speech import MossSpeechForCausalLM
from modeling_moss_speech.modeling_moss_speech import from_text_model
from modeling_moss_speech.trainer.sft import grid_labels
from modeling_moss_speech.trainer.stages import apply_training_stage, check_fsdp_active

SPECIAL = dict(sosp_token_id=SOSP, modality_pad_token_id=MODALITY_PAD, pad_token_id=280, eosp_token_id=EOSP,
               audio_pad_token_id=AUDIO_PAD)


def qwen3(layers: int = 4) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so copying them is checked
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def test_from_text_model_keeps_text_logits(tmp_path):
    text = qwen3()
    model = MossSpeechForCausalLM.from_text_model(text, num_shared_layers=3, audio_vocab_size=80, **SPECIAL).eval()
    assert (model.config.num_shared_layers, model.config.num_modality_layers) == (3, 1)
    ids = torch.randint(0, 250, (2, 11))
    grid = torch.stack([ids, torch.full_like(ids, AUDIO_PAD)], dim=-1)
    torch.testing.assert_close(model(grid).text_logits, text(ids).logits, atol=1e-5, rtol=0)
    # both tails start from the same text layers, the audio side is new
    for a, t in zip(model.model.audio_block.parameters(), model.model.text_block.parameters()):
        assert torch.equal(a, t) and a.data_ptr() != t.data_ptr()
    assert model.model.audio_embed.weight.shape == (80, 32)
    text.save_pretrained(tmp_path)
    again = from_text_model(str(tmp_path), 3, audio_vocab_size=80, **SPECIAL).eval()
    torch.testing.assert_close(again(grid).text_logits, text(ids).logits, atol=1e-5, rtol=0)


def test_from_text_model_bad_split():
    with pytest.raises(ValueError, match="num_shared_layers must be in \\[0, 4\\)"):
        from_text_model(qwen3(), 4, audio_vocab_size=80, **SPECIAL)
    with pytest.raises(ValueError, match="num_tail_layers must be the remaining 2"):
        from_text_model(qwen3(), 2, num_tail_layers=1, audio_vocab_size=80, **SPECIAL)


def test_stage1_step_changes_only_the_speech_side():
    torch.manual_seed(0)
    model = MossSpeechForCausalLM(tiny_config()).train()
    count = apply_training_stage(model, "stage1", verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(n.startswith(("model.audio_", "audio_lm_head")) for n in trainable)
    assert any(n.startswith("model.audio_block") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    grid = make_prompt(0, 16).unsqueeze(0)
    model(grid, labels=grid_labels(grid, model.config)).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
    assert apply_training_stage(model, "stage2", verbose=False) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="unknown training stage 'stage3'"):
        apply_training_stage(model, "stage3")


def test_speech_front_trains_the_speech_side_and_the_first_trunk_layer_only():
    model = MossSpeechForCausalLM(tiny_config())
    stage1 = apply_training_stage(model, "stage1", verbose=False)
    count = apply_training_stage(model, "speech_front", verbose=False)
    first = model.model.shared_block.layers[0]
    assert count == stage1 + sum(p.numel() for p in first.parameters())
    assert all(p.requires_grad for p in first.parameters())
    # the layers above it and everything of the text side stay frozen
    frozen = [model.model.embed_tokens, model.model.text_norm, model.text_lm_head, *model.model.shared_block.layers[1:],
              model.model.text_block]
    assert not any(p.requires_grad for module in frozen for p in module.parameters())


def test_grid_labels_target_what_generation_samples(config):
    grid = torch.tensor([[5, AUDIO_PAD], [SOSP, AUDIO_PAD], [MODALITY_PAD, 3], [MODALITY_PAD, EOSP], [6, AUDIO_PAD]])
    labels = grid_labels(grid, config)
    assert labels[:, 0].tolist() == [5, SOSP, -100, -100, 6]
    assert labels[:, 1].tolist() == [-100, -100, 3, EOSP, -100]
    masked = grid_labels(grid[None], config, attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))
    assert masked[0, 0].tolist() == [-100, -100]


def test_check_fsdp_active_refuses_a_silent_fallback(monkeypatch):
    from accelerate.utils import DistributedType

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_fsdp_active(kind)  # no FSDP asked for: anything goes
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    check_fsdp_active(DistributedType.FSDP)
    for kind in (DistributedType.MULTI_CPU, DistributedType.NO):
        with pytest.raises(ValueError, match=f"asks for FSDP .* accelerate runs {kind}: .* only on accelerator"):
            check_fsdp_active(kind)
