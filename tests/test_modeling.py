"""MossSpeechModel / MossSpeechForCausalLM: release key layout, numerics vs. Qwen3, loading, loss, input checks."""

from __future__ import annotations

import pytest
import torch
from conftest import AUDIO_PAD, EOSP, MODALITY_PAD, SOSP, audio_rows, left_pad, make_prompt, text_rows, tiny_config
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, Qwen3Config, Qwen3ForCausalLM

from modeling_moss_speech import MossSpeechConfig, MossSpeechForCausalLM, MossSpeechModel


def release_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The released checkpoint's 446 tensor names and shapes (spec §2.2)."""
    hidden, inter, text_vocab, audio_vocab = 4096, 12288, 151680, 16512
    shapes = {
        "model.embed_tokens.weight": (text_vocab, hidden),
        "model.audio_embed.weight": (audio_vocab, hidden),
        "model.text_norm.weight": (hidden,),
        "model.audio_norm.weight": (hidden,),
        "text_lm_head.weight": (text_vocab, hidden),
        "audio_lm_head.weight": (audio_vocab, hidden),
    }
    layer = {
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (4096, hidden),
        "self_attn.k_proj.weight": (1024, hidden),
        "self_attn.v_proj.weight": (1024, hidden),
        "self_attn.o_proj.weight": (hidden, 4096),
        "self_attn.q_norm.weight": (128,),
        "self_attn.k_norm.weight": (128,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    for block, count in (("shared_block", 32), ("text_block", 4), ("audio_block", 4)):
        for i in range(count):
            for suffix, shape in layer.items():
                shapes[f"model.{block}.layers.{i}.{suffix}"] = shape
    return shapes


def test_release_8b_state_dict_keys_and_shapes():
    with torch.device("meta"):
        model = MossSpeechForCausalLM(MossSpeechConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = release_state_dict_shapes()
    assert len(expected) == 446
    assert set(ours) == set(expected), (set(ours) ^ set(expected))
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == 9_095_694_336
    # Four large matrices stay independent (the release ties nothing).
    assert model.text_lm_head.weight is not model.model.embed_tokens.weight


def qwen3_twin(model: MossSpeechForCausalLM, modality: str) -> Qwen3ForCausalLM:
    """A plain Qwen3ForCausalLM whose layers are the trunk followed by one tail: what each MOSS path computes."""
    c = model.config
    qcfg = Qwen3Config(
        vocab_size=c.vocab_size if modality == "text" else c.audio_vocab_size,
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters), tie_word_embeddings=False,
        max_position_embeddings=c.max_position_embeddings,
    )
    twin = Qwen3ForCausalLM(qcfg).eval()
    state = {}
    layers = list(model.model.shared_block.layers) + list(model.model.tail(modality)[0].layers)
    for i, layer in enumerate(layers):
        state.update({f"model.layers.{i}.{k}": v for k, v in layer.state_dict().items()})
    table = model.model.embed_tokens if modality == "text" else model.model.audio_embed
    state["model.embed_tokens.weight"] = table.weight
    state["model.norm.weight"] = model.model.tail(modality)[1].weight
    state["lm_head.weight"] = model.head(modality).weight
    twin.load_state_dict(state)
    return twin


def test_each_path_equals_a_qwen3_model(model):
    grid = make_prompt(0, 12).unsqueeze(0)
    out = model(grid)
    embeds = model.model.embed_grid(grid)
    for modality in ("text", "audio"):
        twin = qwen3_twin(model, modality)
        expected = twin(inputs_embeds=embeds).logits
        torch.testing.assert_close(getattr(out, f"{modality}_logits"), expected, atol=1e-5, rtol=1e-5)


def test_embedding_rule_picks_audio_table_only_on_modality_pad(model):
    grid = torch.tensor([[[5, 3], [SOSP, AUDIO_PAD], [MODALITY_PAD, 3], [MODALITY_PAD, EOSP], [5, 40]]])
    emb = model.model.embed_grid(grid)[0]
    text_table, audio_table = model.model.embed_tokens.weight, model.model.audio_embed.weight
    torch.testing.assert_close(emb[0], text_table[5])
    torch.testing.assert_close(emb[1], text_table[SOSP])  # the sosp row is a text row
    torch.testing.assert_close(emb[2], audio_table[3])
    torch.testing.assert_close(emb[3], audio_table[EOSP])
    torch.testing.assert_close(emb[4], emb[0])  # audio value on a text row is ignored


def test_save_and_auto_load_give_identical_logits(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is MossSpeechForCausalLM
    again = MossSpeechForCausalLM.from_pretrained(tmp_path)
    grid = make_prompt(1, 10).unsqueeze(0)
    ref = model(grid)
    for other in (loaded.eval(), again.eval()):
        out = other(grid)
        # float32 tolerance: loaded weights may be unaligned, which changes the SIMD summation order
        torch.testing.assert_close(out.text_logits, ref.text_logits)
        torch.testing.assert_close(out.audio_logits, ref.audio_logits)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is MossSpeechModel
    torch.testing.assert_close(base(grid).text_last_hidden_state, model.model(grid).text_last_hidden_state)


def test_left_padding_does_not_change_logits(model):
    prompts = [make_prompt(2, 6), make_prompt(3, 13), make_prompt(4, 9)]
    grid, mask = left_pad(prompts)
    out = model(grid, attention_mask=mask)
    for i, prompt in enumerate(prompts):
        alone = model(prompt.unsqueeze(0))
        n = prompt.shape[0]
        torch.testing.assert_close(out.text_logits[i, -n:], alone.text_logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.audio_logits[i, -n:], alone.audio_logits[0], atol=1e-5, rtol=1e-5)


def test_incremental_decoding_with_cache_equals_full_forward(model):
    grid = make_prompt(5, 14).unsqueeze(0)
    full = model(grid)
    cache = DynamicCache()
    first = model(grid[:, :9], cache=cache, use_cache=True)
    assert first.cache is cache and cache.get_seq_length() == 9
    assert len(cache.layers) == model.config.num_runtime_layers
    logits = [first.text_logits]
    for t in range(9, grid.shape[1]):
        logits.append(model(grid[:, t : t + 1], cache=cache, use_cache=True).text_logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full.text_logits, atol=1e-5, rtol=1e-5)


def test_losses_per_channel_and_total(model):
    grid = make_prompt(6, 12).unsqueeze(0)
    labels = grid.clone()
    labels[..., 1][grid[..., 0] != MODALITY_PAD] = -100  # audio targets only on speech rows
    out = model(grid, labels=labels)
    ce = torch.nn.functional.cross_entropy
    text = ce(out.text_logits[0, :-1], labels[0, 1:, 0])
    audio = ce(out.audio_logits[0, :-1], labels[0, 1:, 1], ignore_index=-100)
    torch.testing.assert_close(out.text_loss, text)
    torch.testing.assert_close(out.audio_loss, audio)
    torch.testing.assert_close(out.loss, text + audio)
    out.loss.backward()
    assert model.model.audio_embed.weight.grad is not None

    labels[..., 1] = -100  # a channel without targets adds nothing instead of NaN
    out = model(grid, labels=labels)
    assert out.audio_loss.item() == 0.0
    torch.testing.assert_close(out.loss, out.text_loss)


def test_only_requested_tails_run(model):
    grid = make_prompt(7, 8).unsqueeze(0)
    out = model(grid, modalities=("audio",))
    assert out.text_logits is None and out.audio_logits is not None
    torch.testing.assert_close(out.audio_logits, model(grid).audio_logits)
    assert model(grid, logits_to_keep=1).text_logits.shape == (1, 1, model.config.vocab_size)


def test_gradient_checkpointing_trains():
    model = MossSpeechForCausalLM(tiny_config()).train()
    model.activation_checkpointing_enable()
    grid = make_prompt(8, 10).unsqueeze(0)
    out = model(grid, labels=grid)
    out.loss.backward()
    assert all(p.grad is not None for p in model.model.shared_block.parameters())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"input_ids": torch.zeros(1, 5, dtype=torch.long)}, ValueError, "must have shape \\(batch, length, 2\\)"),
        ({"input_ids": torch.zeros(1, 5, 3, dtype=torch.long)}, ValueError, "must have shape \\(batch, length, 2\\)"),
        ({"input_ids": torch.zeros(1, 5, 2)}, TypeError, "integer token ids"),
        ({"input_ids": torch.tensor([[[300, 0]]])}, ValueError, "text channel\\) holds id 300"),
        ({"input_ids": torch.tensor([[[5, 80]]])}, ValueError, "audio channel\\) holds id 80"),
        ({"input_ids": torch.tensor([[[-1, 0]]])}, ValueError, "holds id -1"),
        ({"input_ids": torch.tensor([[[5, 0], [6, 0]]]), "attention_mask": torch.ones(1, 3)}, ValueError,
         "attention_mask must have shape"),
        ({"input_ids": torch.tensor([[[5, 0]]]), "modalities": ("video",)}, ValueError, "modalities must be"),
        ({"input_ids": torch.tensor([[[5, 0]]]), "labels": torch.tensor([[5]])}, ValueError, "labels must have shape"),
        ({}, ValueError, "exactly one of input_ids"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        model(**kwargs)


def test_text_rows_helper_shapes_match_release_layout():
    # sanity of the fixtures used across the suite: an audio segment of n codes is n + 2 rows
    rows = audio_rows([1, 2, 3])
    assert len(rows) == 5 and rows[0] == [SOSP, AUDIO_PAD] and rows[-1] == [MODALITY_PAD, EOSP]
    assert text_rows([4]) == [[4, AUDIO_PAD]]


def test_one_cache_for_all_layers_reorders_like_any_cache(model):
    grids = torch.stack([make_prompt(20, 9), make_prompt(21, 9)])
    step = torch.tensor([[[5, AUDIO_PAD]], [[MODALITY_PAD, 7]]])
    cache = DynamicCache()
    model(grids, cache=cache, use_cache=True)
    cache.reorder_cache(torch.tensor([1, 0]))  # what beam search does
    reordered = model(step.flip(0), cache=cache, use_cache=True)
    reference = model(torch.cat([grids, step], dim=1))
    torch.testing.assert_close(reordered.text_logits[:, -1], reference.text_logits.flip(0)[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(reordered.audio_logits[:, -1], reference.audio_logits.flip(0)[:, -1], atol=1e-5,
                               rtol=0)


def test_cache_sized_for_fewer_layers_is_rejected(model):
    cache = DynamicCache(config=model.config)  # sized from num_hidden_layers: no slots for the second tail
    with pytest.raises(ValueError, match="layer slots but MOSS-Speech needs 4"):
        model(make_prompt(22, 5).unsqueeze(0), cache=cache, use_cache=True)


def test_casting_to_bf16_keeps_rotary_frequencies_float32(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = MossSpeechForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    cast = MossSpeechForCausalLM.from_pretrained(tmp_path).eval().to(torch.bfloat16)
    assert cast.model.rotary_emb.inv_freq.dtype == torch.float32
    assert cast.model.embed_tokens.weight.dtype == torch.bfloat16
    grid = make_prompt(23, 40).unsqueeze(0)
    # bf16 outputs of two loads: bf16 tolerance (the summation order may differ with the weights' alignment)
    torch.testing.assert_close(cast(grid).text_logits, loaded(grid).text_logits)
