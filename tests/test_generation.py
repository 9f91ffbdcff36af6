"""generate(): cache, batching, lazy tails, modality state machine, per-row stopping, sampling settings."""

from __future__ import annotations

import pytest
import torch
from helpers import AUDIO_PAD, EOSP, IM_END, MODALITY_PAD, PAD, SOSP, Force, left_pad, make_prompt, small_vocab_config
from transformers.generation.streamers import BaseStreamer

from modeling_moss_speech import MossSpeechConfig, MossSpeechForCausalLM, MossSpeechGenerationConfig
from modeling_moss_speech.generation_moss_speech import seen_tokens

GREEDY = {"do_sample": False, "repetition_penalty": 1.1}


def test_greedy_with_cache_equals_without_cache(model):
    prompt = make_prompt(0, 12).unsqueeze(0)
    for end_in_speech in (False, True):
        prompt = make_prompt(1, 12, ends_in_speech=end_in_speech).unsqueeze(0)
        cached = model.generate(prompt, max_new_tokens=16, **GREEDY)
        uncached = model.generate(prompt, max_new_tokens=16, use_cache=False, **GREEDY)
        assert torch.equal(cached, uncached)
    assert cached.shape[-1] == 2 and cached.shape[1] >= 1


def test_greedy_is_deterministic(model):
    prompt = make_prompt(2, 10, ends_in_speech=True).unsqueeze(0)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, **GREEDY),
                       model.generate(prompt, max_new_tokens=12, **GREEDY))


@pytest.mark.parametrize("lazy", [True, False])
def test_left_padded_batch_equals_each_prompt_alone(model, lazy):
    prompts = [make_prompt(3, 7), make_prompt(4, 15, ends_in_speech=True), make_prompt(5, 11)]
    grid, mask = left_pad(prompts)
    batch = model.generate(grid, attention_mask=mask, max_new_tokens=14, lazy_tails=lazy,
                           return_dict_in_generate=True, **GREEDY)
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt.unsqueeze(0), max_new_tokens=14, lazy_tails=lazy,
                               return_dict_in_generate=True, **GREEDY)
        n = int(alone.lengths[0])
        assert int(batch.lengths[i]) == n
        assert torch.equal(batch.sequences[i, :n], alone.sequences[0, :n])
        assert batch.modality_spans[i] == alone.modality_spans[0]


def test_lazy_tails_equal_eager_tails(model):
    """Same tokens and, for the channel being sampled, the same logits, across text→audio→text switches."""
    prompts = [make_prompt(6, 9), make_prompt(7, 12, ends_in_speech=True)]
    grid, mask = left_pad(prompts)
    # Row 0: text, then speech from step 3 to its eosp at step 8, then text. Row 1 starts in speech.
    text_plan = {(0, 3): SOSP}
    audio_plan = {(0, 8): EOSP, (1, 5): EOSP}
    runs = {}
    for lazy in (True, False):
        runs[lazy] = model.generate(
            grid, attention_mask=mask, max_new_tokens=14, lazy_tails=lazy, return_dict_in_generate=True,
            output_logits=True, text_logits_processor=[Force(text_plan, suppress=(PAD, IM_END, SOSP))],
            audio_logits_processor=[Force(audio_plan, suppress=(EOSP,))], **GREEDY,
        )
    lazy, eager = runs[True], runs[False]
    assert torch.equal(lazy.sequences, eager.sequences)
    assert lazy.modality_spans == eager.modality_spans
    assert lazy.modality_spans == [
        [("text", 0, 3), ("audio", 3, 8), ("text", 8, 14)],
        [("audio", 0, 5), ("text", 5, 14)],
    ]
    compared = 0
    for step in range(len(lazy.text_logits)):
        for modality in ("text", "audio"):
            got = getattr(lazy, f"{modality}_logits")[step]
            ref = getattr(eager, f"{modality}_logits")[step]
            assert ref is not None
            if got is not None:
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
                compared += 1
    # The lazy run skipped a tail on some steps and still produced every logit it needed.
    assert compared < 2 * len(lazy.text_logits)
    skipped_text = sum(x is None for x in lazy.text_logits)
    assert skipped_text > 0


def test_modality_switching_both_directions(model):
    """text → speech on sosp (text channel), speech → text on eosp (audio channel), as the release does."""
    prompt = make_prompt(8, 8).unsqueeze(0)
    out = model.generate(
        prompt, max_new_tokens=10, return_dict_in_generate=True,
        text_logits_processor=[Force({(0, 2): SOSP, (0, 5): IM_END}, suppress=(PAD, IM_END, SOSP))],
        audio_logits_processor=[Force({(0, 4): EOSP}, suppress=(EOSP,))], **GREEDY,
    )
    rows = out.sequences[0].tolist()
    # Steps are 1-based; the text processor runs only on text steps, the audio one only on audio steps.
    assert rows[1][0] == SOSP and rows[1][1] == AUDIO_PAD          # step 2: start of speech (text row)
    speech = rows[2:]
    assert all(r[0] == MODALITY_PAD for r in speech[:4])               # speech rows carry the modality pad
    assert speech[3][1] == EOSP                                        # 4th audio step emits eosp
    assert speech[4][1] == AUDIO_PAD and speech[4][0] != MODALITY_PAD  # back to text
    # text steps 1-2 (sosp row included), audio steps 3-6 (eosp row included), text steps 7-9 (im_end at the
    # text processor's 5th call, which is generation step 9; the text tail does not run on audio steps).
    assert out.modality_spans[0] == [("text", 0, 2), ("audio", 2, 6), ("text", 6, 9)]
    assert out.lengths.tolist() == [9] and rows[8][0] == IM_END
    assert all(0 <= r[1] < EOSP or r[1] in (EOSP, AUDIO_PAD) for r in rows)


def test_each_row_stops_on_its_own(model):
    prompts = [make_prompt(9, 8), make_prompt(10, 8), make_prompt(11, 8)]
    grid, mask = left_pad(prompts)
    plan = {(0, 2): IM_END, (1, 5): PAD}  # row 2 never stops: runs to max_new_tokens
    out = model.generate(grid, attention_mask=mask, max_new_tokens=7, return_dict_in_generate=True,
                         text_logits_processor=[Force(plan, suppress=(PAD, IM_END, SOSP))], **GREEDY)
    assert out.lengths.tolist() == [2, 5, 7]
    assert out.sequences.shape == (3, 7, 2)
    assert out.sequences[0, 1].tolist() == [IM_END, AUDIO_PAD]     # the stop row stays in the output
    assert out.sequences[0, 2:].tolist() == [[PAD, AUDIO_PAD]] * 5  # then padding
    assert out.sequences[1, 4, 0].item() == PAD


def test_all_rows_stopping_ends_generation_early(model):
    prompt = make_prompt(12, 8).unsqueeze(0)
    force = Force({(0, 3): IM_END}, suppress=(PAD, IM_END, SOSP))
    out = model.generate(prompt, max_new_tokens=50, text_logits_processor=[force], **GREEDY)
    assert out.shape == (1, 3, 2)


def test_forbidden_audio_ids_and_min_new_tokens(model):
    prompt = make_prompt(13, 8, ends_in_speech=True).unsqueeze(0)

    def push_forbidden(history, scores):
        scores[:, EOSP:] += 1000.0  # make eosp and the unused ids above it the most likely
        return scores

    out = model.generate(prompt, max_new_tokens=6, min_new_tokens=4, audio_logits_processor=[push_forbidden],
                         **GREEDY)
    audio = out[0, :, 1].tolist()
    assert all(a <= EOSP for a in audio)          # ids above eosp are never sampled
    assert EOSP not in audio[:3]                   # eosp gated before min_new_tokens
    assert audio[4] == EOSP or EOSP in audio[3:]


def test_streamer_receives_every_row(model):
    class Collect(BaseStreamer):
        def __init__(self):
            self.rows, self.ended = [], False

        def put(self, value):
            self.rows.append(value.clone())

        def end(self):
            self.ended = True

    streamer = Collect()
    prompts = [make_prompt(14, 8), make_prompt(15, 10, ends_in_speech=True)]
    grid, mask = left_pad(prompts)
    out = model.generate(grid, attention_mask=mask, max_new_tokens=9, streamer=streamer, **GREEDY)
    assert streamer.ended
    assert all(r.shape == (2, 2) for r in streamer.rows)
    assert torch.equal(torch.stack(streamer.rows, dim=1), out)


def test_per_channel_sampling_settings(model, tmp_path):
    config = MossSpeechGenerationConfig(audio_temperature=1.3, text_top_k=5, max_new_tokens=8,
                                        eos_token_id=[PAD, IM_END], pad_token_id=PAD)
    assert config.channel_settings("audio")["temperature"] == 1.3
    assert config.channel_settings("text")["temperature"] == 0.6  # release default
    assert config.channel_settings("text")["top_k"] == 5 and config.channel_settings("audio")["top_k"] == 20
    config.save_pretrained(tmp_path)
    loaded = MossSpeechGenerationConfig.from_pretrained(tmp_path)
    assert loaded.channel_settings("audio") == config.channel_settings("audio")
    assert loaded.lazy_tails is True

    prompt = make_prompt(16, 10, ends_in_speech=True).unsqueeze(0)
    a = model.generate(prompt, generation_config=config, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, generation_config=config, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_release_sampling_defaults(model):
    gen = MossSpeechForCausalLM(model.config).generation_config
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty) == (True, 0.6, 0.95, 20, 1.1)
    assert gen.max_new_tokens == 500 and gen.eos_token_id == [PAD, IM_END]
    bare = MossSpeechGenerationConfig()  # no model config: no special ids are made up
    assert bare.eos_token_id is None and bare.pad_token_id is None and bare.bos_token_id is None
    release = MossSpeechGenerationConfig.from_model_config(MossSpeechConfig())
    assert release.eos_token_id == [151643, 151645] and release.pad_token_id == 151643


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"max_new_tokens": -3}, "max_new_tokens must be an integer >= 1"),
        ({"max_new_token": 5}, "unknown arguments \\['max_new_token'\\]"),
        ({"audio_temperature": 0.0}, "audio temperature must be > 0"),
        ({"text_top_p": 1.5}, "text top_p must be in"),
        ({"eos_token_id": [5000]}, "eos_token_id 5000 is outside the text vocabulary"),
        ({"attention_mask": torch.ones(1, 3)}, "attention_mask must have shape"),
    ],
)
def test_bad_generate_arguments(model, kwargs, message):
    prompt = make_prompt(17, 8).unsqueeze(0)
    with pytest.raises(ValueError, match=message):
        model.generate(prompt, **kwargs)


def test_bad_grids_rejected_by_generate(model):
    with pytest.raises(ValueError, match="must have shape \\(batch, length, 2\\)"):
        model.generate(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="audio channel\\) holds id 90"):
        model.generate(torch.tensor([[[5, 90]]]))
    grid, mask = left_pad([make_prompt(18, 5)])
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        model.generate(grid, attention_mask=mask)


def test_repetition_history_ignores_padding_but_keeps_real_ids():
    ids = torch.tensor([[0, 0, 5, 0], [7, 3, 3, 9]])
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    seen = seen_tokens(ids, mask, 12)
    assert seen[0].nonzero().flatten().tolist() == [0, 5]  # id 0 is real at position 3, padding at 0-1
    assert seen[1].nonzero().flatten().tolist() == [3, 7, 9]
    mask[0, 3] = False
    assert seen_tokens(ids, mask, 12)[0].nonzero().flatten().tolist() == [5]


# ------------------------------------------------------------------ standard generation fields


class Push:
    """A per-channel processor that makes `token` the most likely id at every step (processors run after the
    built-in n-gram / bad-word bans, and -inf + 1000 stays -inf, so a ban still wins)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.token] += 1000.0
        return scores


def _channel_ids(out, modality: str) -> list[int]:
    """The generated ids of one channel on the rows sampled in that modality (element 0)."""
    rows = out.sequences[0].tolist()
    return [rows[i][int(modality == "audio")] for m, start, end in out.modality_spans[0] if m == modality
            for i in range(start, end)]


def test_num_return_sequences_equals_repeated_prompts(model):
    prompts = [make_prompt(20, 8), make_prompt(21, 10, ends_in_speech=True)]
    grid, mask = left_pad(prompts)
    settings = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=0, top_p=1.0)
    out = model.generate(grid, attention_mask=mask, num_return_sequences=3, return_dict_in_generate=True,
                         generator=torch.Generator().manual_seed(5), **settings)
    assert out.sequences.shape[0] == 6 and out.lengths.shape == (6,)
    # Element i * n + j continues prompt i: the same as passing each prompt n times in a row.
    repeated = model.generate(grid.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0),
                              return_dict_in_generate=True, generator=torch.Generator().manual_seed(5), **settings)
    assert torch.equal(out.sequences, repeated.sequences)
    assert out.modality_spans[3][0][0] == "audio" and out.modality_spans[0][0][0] == "text"
    assert len({tuple(map(tuple, s.tolist())) for s in out.sequences[3:]}) > 1  # sampled, so they differ


def test_num_return_sequences_needs_sampling(model):
    prompt = make_prompt(22, 8).unsqueeze(0)
    with pytest.raises(ValueError, match="num_return_sequences=2 with greedy decoding"):
        model.generate(prompt, num_return_sequences=2, **GREEDY)
    with pytest.raises(ValueError, match="num_return_sequences must be an integer >= 1"):
        model.generate(prompt, num_return_sequences=0)
    # One sampling channel is enough for different sequences.
    out = model.generate(prompt, num_return_sequences=2, max_new_tokens=3, do_sample=False, audio_do_sample=True)
    assert out.shape[0] == 2 and out.shape[2] == 2


def test_output_scores_are_what_each_channel_chose_from(model):
    prompts = [make_prompt(23, 9), make_prompt(24, 12, ends_in_speech=True)]
    grid, mask = left_pad(prompts)
    out = model.generate(grid, attention_mask=mask, max_new_tokens=10, return_dict_in_generate=True,
                         output_scores=True, output_logits=True,
                         text_logits_processor=[Force({(0, 3): SOSP}, suppress=(PAD, IM_END, SOSP))],
                         audio_logits_processor=[Force({(0, 4): EOSP, (1, 5): EOSP}, suppress=(EOSP,))], **GREEDY)
    assert len(out.text_scores) == len(out.audio_scores) == out.sequences.shape[1]
    checked = {"text": 0, "audio": 0}
    for element, spans in enumerate(out.modality_spans):
        for modality, start, end in spans:
            channel = int(modality == "audio")
            for step in range(start, end):
                scores = getattr(out, f"{modality}_scores")[step]
                assert scores.shape[-1] == (300 if modality == "text" else 80)
                # Greedy: the chosen id is the arg-max of the processed scores, which differ from the raw logits.
                assert int(scores[element].argmax()) == int(out.sequences[element, step, channel])
                checked[modality] += 1
    assert checked["text"] > 3 and checked["audio"] > 3
    audio = next(s for s in out.audio_scores if s is not None)
    assert torch.isinf(audio[:, EOSP + 1 :]).all()
    assert any(s is None for s in out.text_scores)  # a step where every element spoke: no text was sampled
    with pytest.raises(ValueError, match="output_scores=True needs return_dict_in_generate=True"):
        model.generate(grid, attention_mask=mask, output_scores=True)


def test_bad_words_ids_per_channel(model):
    text_prompt = make_prompt(25, 8).unsqueeze(0)
    pushed = dict(max_new_tokens=8, return_dict_in_generate=True, text_logits_processor=[Push(5)], **GREEDY)
    assert set(_channel_ids(model.generate(text_prompt, **pushed), "text")) == {5}
    banned = model.generate(text_prompt, bad_words_ids=[[5]], **pushed)
    assert 5 not in _channel_ids(banned, "text")
    # A two-token bad word bans only its completion: 5 still comes, never twice in a row.
    pair = _channel_ids(model.generate(text_prompt, bad_words_ids=[[5, 5]], **pushed), "text")
    assert 5 in pair and all(not (a == b == 5) for a, b in zip(pair, pair[1:]))

    speech_prompt = make_prompt(26, 10, ends_in_speech=True).unsqueeze(0)
    spoken = dict(max_new_tokens=6, return_dict_in_generate=True, audio_logits_processor=[Push(7)], **GREEDY)
    # The shared bad_words_ids are tokenizer ids: they leave the audio channel alone.
    assert set(_channel_ids(model.generate(speech_prompt, bad_words_ids=[[7]], **spoken), "audio")) == {7}
    codes = _channel_ids(model.generate(speech_prompt, audio_bad_words_ids=[[7]], **spoken), "audio")
    assert codes and 7 not in codes


def test_no_repeat_ngram_size_per_channel(model):
    text_prompt = make_prompt(27, 8).unsqueeze(0)
    pushed = dict(max_new_tokens=8, return_dict_in_generate=True, text_logits_processor=[Push(5)], **GREEDY)
    text = _channel_ids(model.generate(text_prompt, no_repeat_ngram_size=2, **pushed), "text")
    pairs = list(zip(text, text[1:]))
    assert text.count(5) > 1 and len(pairs) == len(set(pairs))  # no bigram twice, though 5 is pushed every step

    speech_prompt = make_prompt(28, 10, ends_in_speech=True).unsqueeze(0)
    spoken = dict(max_new_tokens=6, return_dict_in_generate=True, audio_logits_processor=[Push(7)], **GREEDY)
    assert set(_channel_ids(model.generate(speech_prompt, no_repeat_ngram_size=2, **spoken), "audio")) == {7}
    codes = _channel_ids(model.generate(speech_prompt, audio_no_repeat_ngram_size=2, **spoken), "audio")
    assert len(list(zip(codes, codes[1:]))) == len(set(zip(codes, codes[1:])))
    with pytest.raises(ValueError, match="audio no_repeat_ngram_size must be an integer >= 0"):
        model.generate(speech_prompt, audio_no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match=r"audio bad_words_ids holds ids \[99\] outside the audio vocabulary"):
        model.generate(speech_prompt, audio_bad_words_ids=[[99]])
    with pytest.raises(ValueError, match="text bad_words_ids: `bad_words_ids` has to be a list of lists"):
        model.generate(speech_prompt, bad_words_ids=[5])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_beams": 2}, "num_beams=2: beam search is not supported"),
        ({"max_length": 30}, "max_length=30: use max_new_tokens"),
        ({"output_hidden_states": True}, "output_hidden_states=True: generate\\(\\) does not return hidden states"),
        ({"output_attentions": True}, "output_attentions=True: generate\\(\\) does not return attentions"),
        ({"force_words_ids": [[5]]}, "force_words_ids=\\[\\[5\\]\\]: constrained beam search"),
        ({"constraints": ["x"]}, "constraints=\\['x'\\]: constrained beam search"),
        ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens=3: assisted decoding"),
        ({"assistant_early_exit": 2}, "assistant_early_exit=2: assisted decoding"),
        ({"penalty_alpha": 0.6}, "penalty_alpha=0.6: contrastive search"),
        ({"typical_p": 0.5}, "typical_p=0.5: not supported by MOSS-Speech"),
        ({"stop_strings": ["bye"]}, "stop_strings=\\['bye'\\]: pass stopping_criteria"),
        ({"suppress_tokens": [3]}, "suppress_tokens=\\[3\\]: not supported"),
        ({"assistant_model": object()}, "does not take assistant_model \\(assisted decoding"),
        ({"logits_processor": []}, "does not take logits_processor \\(pass per-channel text_logits_processor"),
        ({"inputs_embeds": torch.zeros(1, 2, 32)}, "does not take inputs_embeds"),
    ],
)
def test_standard_fields_that_do_not_apply_are_refused(model, kwargs, message):
    prompt = make_prompt(29, 8).unsqueeze(0)
    with pytest.raises(ValueError, match=message):
        model.generate(prompt, max_new_tokens=2, **kwargs)


def test_refusal_also_reads_a_generation_config_and_accepts_no_op_values(model):
    prompt = make_prompt(30, 8).unsqueeze(0)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        model.generate(prompt, generation_config=MossSpeechGenerationConfig(output_hidden_states=True))
    no_ops = dict(num_beams=1, output_attentions=False, output_hidden_states=False, typical_p=1.0, min_length=0,
                  length_penalty=1.0, num_return_sequences=1, suppress_tokens=[])
    assert model.generate(prompt, max_new_tokens=2, **no_ops, **GREEDY).shape == (1, 2, 2)


def test_every_standard_field_is_read_or_refused():
    """A field transformers adds later is refused too, until generate() learns it (no silent ignoring)."""
    from transformers import GenerationConfig

    from modeling_moss_speech.generation_moss_speech import SUPPORTED_FIELDS, unsupported_generation_fields

    config = MossSpeechGenerationConfig()
    public = [f for f in vars(GenerationConfig()) if not f.startswith("_")]
    for field in public:
        setattr(config, field, "surely-not-a-neutral-value")
    refused = set(unsupported_generation_fields(config))
    assert refused == set(public) - SUPPORTED_FIELDS
    assert {"num_beams", "output_hidden_states", "constraints", "max_length"} <= refused


def test_small_vocabulary_model_generates_without_made_up_ids():
    """A config with a small vocabulary and no special ids: valid, and generate() invents no eos / pad."""
    config = small_vocab_config()
    torch.manual_seed(0)
    model = MossSpeechForCausalLM(config).eval()
    gen = model.generation_config
    assert gen.eos_token_id is None and gen.pad_token_id is None
    prompt = torch.tensor([[[5, config.audio_pad_token_id], [6, config.audio_pad_token_id]]])
    out = model.generate(prompt, max_new_tokens=4, **GREEDY)
    assert out.shape == (1, 4, 2)
    with pytest.raises(ValueError, match="pad_token_id is unset"):
        model.generate(prompt, max_new_tokens=4, stopping_criteria=[lambda ids, scores: torch.ones(1).bool()])
