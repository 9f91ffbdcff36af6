"""MossSpeechModel / MossSpeechForCausalLM: release key layout, numerics vs. Qwen3, loading, loss, input checks."""

from __future__ import annotations

import pytest
import torch
from helpers import AUDIO_PAD, EOSP, MODALITY_PAD, SOSP, audio_rows, left_pad, make_prompt, text_rows, tiny_config
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, Qwen3Config, Qwen3ForCausalLM, StaticCache

from modeling_moss_speech import MossSpeechConfig, MossSpeechForCausalLM, MossSpeechModel


def release_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The released checkpoint's 446 tensor names and shapes (its model.safetensors index)."""
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
    c = model.config
    # A Qwen3 config with the release's layer count (trunk + one tail): no slots for the second tail.
    qwen3 = Qwen3Config(num_hidden_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads)
    cache = DynamicCache(config=qwen3)
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


# ----------------------------------------------------------------------------- transformers integration


def test_caches_built_from_the_model_config_hold_every_runtime_layer(model):
    config = model.config
    grid = make_prompt(30, 12).unsqueeze(0)
    full = model(grid)
    caches = {"dynamic": DynamicCache(config=config), "static": StaticCache(config=config, max_cache_len=16)}
    for name, cache in caches.items():
        assert len(cache.layers) == config.num_runtime_layers == 4, name
        first = model(grid[:, :8], cache=cache, use_cache=True)
        logits = [first.text_logits]
        for t in range(8, grid.shape[1]):
            mask = torch.ones(1, t + 1, dtype=torch.long) if name == "static" else None
            logits.append(model(grid[:, t : t + 1], cache=cache, use_cache=True, attention_mask=mask).text_logits)
        torch.testing.assert_close(torch.cat(logits, dim=1), full.text_logits, atol=1e-5, rtol=1e-5)
    # Only the decoder view counts every runtime layer; the config itself (and its config.json) keeps the release's
    # trunk + one tail.
    assert config.get_text_config() is config
    assert config.get_text_config(decoder=True).num_hidden_layers == 4
    assert config.num_hidden_layers == 3 and len(config.layer_types) == 3
    assert config.to_dict()["num_hidden_layers"] == 3 and len(config.to_dict()["layer_types"]) == 3


def test_sliding_window_tails_get_sliding_cache_slots():
    config = tiny_config(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                         layer_types=["sliding_attention", "full_attention", "full_attention"])
    cache = DynamicCache(config=config)
    # trunk: sliding, full; each tail reads layer_types[0]: sliding.
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds[0] == kinds[2] == kinds[3] != kinds[1]


def test_hidden_states_are_recorded_per_layer_in_execution_order(model):
    c = model.config
    grid = make_prompt(31, 10).unsqueeze(0)
    out = model(grid, output_hidden_states=True)
    states = out.hidden_states
    assert len(states) == 1 + c.num_runtime_layers
    assert all(s.shape == (1, grid.shape[1], c.hidden_size) for s in states)
    torch.testing.assert_close(states[0], model.model.embed_grid(grid))
    # Each path (trunk, then one tail) records what a plain Qwen3 model of those layers records.
    for modality, tail in (("text", states[1 + c.num_shared_layers : 1 + c.num_hidden_layers]),
                           ("audio", states[1 + c.num_hidden_layers :])):
        twin = qwen3_twin(model, modality)
        expected = twin(inputs_embeds=states[0], output_hidden_states=True).hidden_states
        path = states[: 1 + c.num_shared_layers] + tail
        for got, want in zip(path[:-1], expected[:-1]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # Qwen3 reports its final norm's output last; here the norm's output is the tail's last_hidden_state.
        norm = model.model.tail(modality)[1]
        torch.testing.assert_close(norm(path[-1]), expected[-1], atol=1e-5, rtol=1e-5)
    # Nothing recorded unless asked for.
    plain = model(grid)
    assert plain.hidden_states is None and plain.attentions is None


def test_hidden_states_of_a_lazy_tail_and_of_a_cached_step(model):
    c = model.config
    grid = make_prompt(32, 9).unsqueeze(0)
    both = model(grid, output_hidden_states=True).hidden_states
    audio_only = model(grid, modalities=("audio",), output_hidden_states=True).hidden_states
    # One tail ran: trunk + that tail, no placeholder for the skipped one.
    assert len(audio_only) == 1 + c.num_shared_layers + c.num_modality_layers
    for got, want in zip(audio_only, both[: 1 + c.num_shared_layers] + both[1 + c.num_hidden_layers :]):
        torch.testing.assert_close(got, want)
    # A cached decode step records the new row only.
    cache = DynamicCache(config=c)
    model(grid[:, :-1], cache=cache, use_cache=True)
    step = model(grid[:, -1:], cache=cache, use_cache=True, output_hidden_states=True).hidden_states
    assert len(step) == 1 + c.num_runtime_layers and all(s.shape == (1, 1, c.hidden_size) for s in step)
    for got, want in zip(step, both):
        torch.testing.assert_close(got, want[:, -1:], atol=1e-5, rtol=1e-5)
    # Selecting by index (negative indices count over both tails).
    picked = model(grid, output_hidden_states=[0, -1]).hidden_states
    assert [i for i, s in enumerate(picked) if s is not None] == [0, c.num_runtime_layers]


def test_generate_is_unchanged_once_recording_hooks_are_installed(model):
    prompt = make_prompt(33, 8).unsqueeze(0)
    gen = {"max_new_tokens": 6, "do_sample": False}
    before = model.generate(prompt, **gen)
    model(prompt, output_hidden_states=True, output_attentions=True)  # installs the recording hooks
    # generate runs its tails lazily through run_block/run_tail, outside a recording forward: nothing is collected
    # and decoding is the same.
    after = model.generate(prompt, **gen)
    assert torch.equal(before, after)


def test_attentions_are_recorded_with_eager_attention(model):
    model.set_attn_implementation("eager")
    grid = make_prompt(34, 7).unsqueeze(0)
    length = grid.shape[1]
    out = model(grid, output_attentions=True)
    c = model.config
    assert len(out.attentions) == c.num_runtime_layers
    assert all(a.shape == (1, c.num_attention_heads, length, length) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(1, c.num_attention_heads, length))
    assert torch.all(out.attentions[0].triu(1) == 0)  # causal
    model.config.output_attentions = True  # the config flag works as well
    assert len(model(grid).attentions) == c.num_runtime_layers


def test_return_dict_false_returns_tuples(model):
    grid = make_prompt(35, 6).unsqueeze(0)
    labels = grid.clone()
    out = model(grid, labels=labels)
    as_tuple = model(grid, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(out.to_tuple())
    for got, want in zip(as_tuple, out.to_tuple()):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want)
    base = model.model(grid, return_dict=False, output_hidden_states=True)
    assert isinstance(base, tuple) and isinstance(base[-1], tuple)  # the hidden states, last
    model.config.return_dict = False
    assert isinstance(model(grid), tuple) and isinstance(model.model(grid), tuple)


def test_unknown_keyword_arguments_raise_type_error(model):
    grid = make_prompt(36, 5).unsqueeze(0)
    with pytest.raises(TypeError, match="MossSpeechForCausalLM.forward\\(\\) got unexpected keyword argument\\(s\\) "
                                        "'decoder_input_ids', 'tempreature'"):
        model(grid, tempreature=0.7, decoder_input_ids=grid)
    with pytest.raises(TypeError, match="MossSpeechModel.forward\\(\\) got unexpected .* 'shift_labels'"):
        model.model(grid, shift_labels=grid)  # the loss kwargs belong to the LM head
    # What transformers passes through to attention stays accepted.
    model(grid, output_attentions=False, output_hidden_states=False, cu_seq_lens_q=None, max_length_q=None)


def test_past_key_values_is_the_deprecated_name_of_cache(model):
    grid = make_prompt(37, 6).unsqueeze(0)
    cache = DynamicCache(config=model.config)
    with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
        out = model(grid, past_key_values=cache, use_cache=True)
    assert out.cache is cache and cache.get_seq_length() == grid.shape[1]


def test_loss_goes_through_the_causal_lm_loss_contract(model):
    grid = make_prompt(38, 12).unsqueeze(0)
    labels = grid.clone()
    labels[..., 1][grid[..., 0] != MODALITY_PAD] = -100
    out = model(grid, labels=labels)
    # shift_labels: targets already aligned with the logits replace labels entirely.
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 0, 0, 1), value=-100)
    same = model(grid, labels=torch.zeros_like(labels), shift_labels=shift)
    torch.testing.assert_close(same.loss, out.loss)
    torch.testing.assert_close(same.text_loss, out.text_loss)
    other = model(grid, shift_labels=shift.roll(1, dims=1))
    assert not torch.allclose(other.loss, out.loss)
    # num_items_in_batch: summed over both channels, divided by the given count (gradient accumulation).
    ce = torch.nn.functional.cross_entropy
    text_sum = ce(out.text_logits[0, :-1], labels[0, 1:, 0], reduction="sum")
    audio_sum = ce(out.audio_logits[0, :-1], labels[0, 1:, 1], reduction="sum", ignore_index=-100)
    summed = model(grid, labels=labels, num_items_in_batch=torch.tensor(7))
    torch.testing.assert_close(summed.loss, (text_sum + audio_sum) / 7)
    # ignore_index: another ignore id behaves like -100.
    relabelled = labels.masked_fill(labels == -100, -1)
    torch.testing.assert_close(model(grid, labels=relabelled, ignore_index=-1).loss, out.loss)
    # The loss is the model's loss_function (swappable, as for any transformers model).
    calls = []
    default = model.loss_function

    def spy(**kwargs):
        calls.append(kwargs["vocab_size"])
        return default(**kwargs)

    model.loss_function = spy
    model(grid, labels=labels)
    assert calls == [model.config.vocab_size, model.config.audio_vocab_size]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"input_ids": torch.zeros(0, 4, 2, dtype=torch.long)}, ValueError, "input_ids is empty"),
        ({"inputs_embeds": torch.zeros(0, 4, 32)}, ValueError, "inputs_embeds is empty"),
        ({"input_ids": torch.tensor([[[5, 0], [6, 0]]]), "labels": torch.tensor([[[5, 0], [300, 0]]])}, ValueError,
         "labels\\[0, 1, 0\\] = 300 is outside the text vocabulary \\[0, 300\\)"),
        ({"input_ids": torch.tensor([[[5, 0], [6, 0]]]), "labels": torch.tensor([[[5, 0], [6, 80]]])}, ValueError,
         "labels\\[0, 1, 1\\] = 80 is outside the audio vocabulary"),
        ({"input_ids": torch.tensor([[[5, 0], [6, 0]]]), "labels": torch.tensor([[[5, -5], [6, 0]]])}, ValueError,
         "labels\\[0, 0, 1\\] = -5 .* not the ignore index -100"),
        ({"input_ids": torch.tensor([[[5, 0], [6, 0]]]), "labels": torch.tensor([[[5, 0]]])}, ValueError,
         "labels shape \\(1, 1, 2\\) does not match"),
        ({"input_ids": torch.tensor([[[5, 0], [6, 0]]]), "labels": torch.zeros(1, 2, 2)}, TypeError,
         "labels must hold integer"),
        ({"input_ids": torch.tensor([[[5, 0], [6, 0]]]), "shift_labels": torch.tensor([[[5, 0], [999, 0]]])},
         ValueError, "shift_labels\\[0, 1, 0\\] = 999"),
        ({"input_ids": torch.tensor([[[5, 0], [6, 0]]]), "labels": torch.tensor([[[5, 0], [6, 0]]]),
          "logits_to_keep": 1}, ValueError, "use logits_to_keep=0"),
        ({"input_ids": torch.tensor([[[5, 0], [6, 0]]]), "position_ids": torch.arange(3)[None]}, ValueError,
         "position_ids must have shape \\(batch, length\\) = \\(1, 2\\)"),
        ({"input_ids": torch.tensor([[[5, 0], [6, 0]]]), "position_ids": torch.arange(2)}, ValueError,
         "position_ids must have shape"),
        ({"input_ids": torch.zeros(2, 2, 2, dtype=torch.long), "position_ids": torch.zeros(3, 2, dtype=torch.long)},
         ValueError, "position_ids must have shape"),
    ],
)
def test_forward_level_bad_inputs_name_the_argument(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        model(**kwargs)


def test_meta_device_construction_then_to_empty_and_init_weights(model):
    from transformers import initialization as init

    config = model.config
    with torch.device("meta"):
        meta = MossSpeechForCausalLM(config)
    meta.to_empty(device="cpu")
    # Poison every tensor: whatever init_weights does not write stays NaN.
    with torch.no_grad():
        for tensor in [*meta.parameters(), *meta.buffers()]:
            tensor.fill_(float("nan"))
    meta.init_weights()
    assert not any(t.isnan().any() for t in [*meta.parameters(), *meta.buffers()])
    with init.no_init_weights():
        fresh = MossSpeechForCausalLM(config)
    for (name, got), (_, want) in zip(meta.named_buffers(), fresh.named_buffers()):
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    meta.load_state_dict(model.state_dict())
    grid = make_prompt(39, 8).unsqueeze(0)
    assert torch.equal(meta.eval()(grid).text_logits, model(grid).text_logits)


def test_forward_exports_and_compiles_as_one_graph(model):
    grid = make_prompt(40, 8).unsqueeze(0)
    labels = grid.clone()
    reference = model(grid, labels=labels, use_cache=False)
    exported = torch.export.export(model, (), {"input_ids": grid, "labels": labels, "use_cache": False})
    out = exported.module()(input_ids=grid, labels=labels, use_cache=False)
    torch.testing.assert_close(out.text_logits, reference.text_logits)
    torch.testing.assert_close(out.loss, reference.loss)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: any graph break is an error
    out = compiled(input_ids=grid, labels=labels, use_cache=False)
    torch.testing.assert_close(out.audio_logits, reference.audio_logits)
    torch.testing.assert_close(out.loss, reference.loss)
    assert MossSpeechForCausalLM._can_compile_fullgraph


def test_inputs_embeds_of_the_grid(model):
    grid = make_prompt(41, 9).unsqueeze(0)
    embeds = model.model.embed_grid(grid)
    from_ids, from_embeds = model(grid), model(inputs_embeds=embeds)
    torch.testing.assert_close(from_embeds.text_logits, from_ids.text_logits)
    torch.testing.assert_close(from_embeds.audio_logits, from_ids.audio_logits)


@pytest.mark.parametrize("scaling", ["linear", "dynamic", "yarn"])
def test_rope_scaling_from_config(scaling):
    grids = {"short": make_prompt(42, 9).unsqueeze(0), "long": make_prompt(43, 1200).unsqueeze(0)}
    outputs = {}
    for name, rope in (("plain", {"rope_type": "default", "rope_theta": 10_000.0}),
                       ("scaled", {"rope_type": scaling, "factor": 10.0, "rope_theta": 10_000.0})):
        torch.manual_seed(0)
        model = MossSpeechForCausalLM(tiny_config(max_position_embeddings=1024, rope_parameters=rope)).eval()
        with torch.no_grad():
            outputs[name] = {k: model.model(g).audio_last_hidden_state for k, g in grids.items()}
    plain, scaled = outputs["plain"], outputs["scaled"]
    if scaling == "dynamic":  # unchanged until the input outgrows max_position_embeddings
        torch.testing.assert_close(plain["short"], scaled["short"])
    else:
        assert not torch.allclose(plain["short"], scaled["short"], atol=1e-5)
    assert not torch.allclose(plain["long"], scaled["long"], atol=1e-5)
