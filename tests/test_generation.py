"""generate(): cache, batching, lazy tails, modality state machine, per-row stopping, sampling settings."""

from __future__ import annotations

import pytest
import torch
from conftest import AUDIO_PAD, EOSP, IM_END, MODALITY_PAD, PAD, SOSP, left_pad, make_prompt
from transformers.generation.streamers import BaseStreamer

from modeling_moss_speech import MossSpeechForCausalLM, MossSpeechGenerationConfig
from modeling_moss_speech.generation_moss_speech import seen_tokens

GREEDY = {"do_sample": False, "repetition_penalty": 1.1}


class Force:
    """A per-channel logits processor that forces `token` for batch row `row` at generation step `step`."""

    def __init__(self, plan: dict[tuple[int, int], int], suppress: tuple[int, ...] = ()):
        self.plan, self.suppress, self.step = plan, list(suppress), 0

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.step += 1
        scores[:, self.suppress] = float("-inf")
        for (row, step), token in self.plan.items():
            if step == self.step:
                scores[row] = float("-inf")
                scores[row, token] = 0.0
        return scores


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
    release = MossSpeechGenerationConfig()
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
