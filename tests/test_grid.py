"""GridLayout (grid_moss_speech.py), the one owner of the (B, L, 2) grid's layout: segment, turn and conversation rows,
the assistant mask, left padding, the modality read off rows, and rows split back into segments."""

from __future__ import annotations

import pytest
import torch
from helpers import AUDIO_PAD, EOSP, IM_END, IM_START, LAYOUT, MODALITY_PAD, PAD, SOSP, tiny_config, tiny_tokenizer

from modeling_moss_speech.grid_moss_speech import GridLayout, GridSegment
from modeling_moss_speech.processing_moss_speech import MossSpeechProcessor

NEWLINE = 1


def tokenize(text: str) -> list[int]:
    return tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


def header(role: str) -> list[int]:
    return [IM_START, *tokenize(role), NEWLINE]


TURN_END = [IM_END, NEWLINE]


def text(ids: list[int]) -> list[list[int]]:
    return [[i, AUDIO_PAD] for i in ids]


def test_segment_rows():
    assert LAYOUT.text_rows([5, 6]) == [[5, AUDIO_PAD], [6, AUDIO_PAD]]
    assert LAYOUT.speech_rows(torch.tensor([3, 4])) == [[SOSP, AUDIO_PAD], [MODALITY_PAD, 3], [MODALITY_PAD, 4],
                                                        [MODALITY_PAD, EOSP]]
    assert LAYOUT.speech_rows([]) == [[SOSP, AUDIO_PAD], [MODALITY_PAD, EOSP]]
    assert LAYOUT.pad_row() == [PAD, AUDIO_PAD]
    with pytest.raises(TypeError, match="codes must be a sequence of integer ids, got str"):
        LAYOUT.speech_rows("12")


def test_turn_rows_and_mask():
    rows, mask = LAYOUT.turn_rows("assistant", [7, 8], tokenize, trained=True, im_end_token_id=IM_END)
    assert rows == text(header("assistant")) + LAYOUT.speech_rows([7, 8]) + text(TURN_END)
    # Content (with the speech segment's start and end rows) and the stop token are trained; header and newline not.
    assert mask == [False] * 3 + [True] * 4 + [True, False]
    rows, mask = LAYOUT.turn_rows("user", "yes", tokenize, trained=False, im_end_token_id=IM_END)
    assert rows == text(header("user") + tokenize("yes") + TURN_END) and not any(mask)
    # Without the stop token's id, the whole closing is trained.
    assert LAYOUT.turn_rows("assistant", "yes", tokenize, trained=True)[1][-2:] == [True, True]


def test_conversation_rows_place_the_default_system_turn_after_the_conversation():
    turns = [("user", [1, 2]), ("assistant", "yes"), ("user", "what")]
    rows = LAYOUT.conversation_rows(turns, tokenize, "be brief", output_modality="audio",
                                    sosp_token="<|object_ref_start|>")
    expected = (text(header("user")) + LAYOUT.speech_rows([1, 2]) + text(TURN_END)
                + text(header("assistant") + tokenize("yes") + TURN_END + header("user") + tokenize("what") + TURN_END)
                + text(header("system") + tokenize("be brief") + TURN_END) + text(header("assistant") + [SOSP]))
    assert rows == expected
    assert rows[-1] == [SOSP, AUDIO_PAD]  # an audio-output prompt ends with the start of speech
    # A conversation that opens with a system turn gets no default one; no generation prompt when not asked.
    turns = [("system", "be brief"), ("user", "what")]
    assert LAYOUT.conversation_rows(turns, tokenize, "ignored", add_generation_prompt=False) == text(
        header("system") + tokenize("be brief") + TURN_END + header("user") + tokenize("what") + TURN_END)


def test_conversation_rows_refuse_a_prefix_that_does_not_end_with_sosp():
    with pytest.raises(ValueError, match="sosp_token is required"):
        LAYOUT.conversation_rows([("user", "what")], tokenize, "x", output_modality="audio")
    with pytest.raises(ValueError, match=f"does not end with sosp_token_id {SOSP}"):
        LAYOUT.conversation_rows([("user", "what")], tokenize, "x", output_modality="audio", sosp_token="yes")
    with pytest.raises(ValueError, match="output_modality must be one of"):
        LAYOUT.conversation_rows([("user", "what")], tokenize, "x", output_modality="video")
    with pytest.raises(ValueError, match="turns is empty"):
        LAYOUT.conversation_rows([], tokenize, "x")


def test_training_rows_continue_the_inference_prompt():
    history = [("user", "what"), ("assistant", [4, 5]), ("user", [6])]
    rows, mask = LAYOUT.training_rows([*history, ("assistant", "yes")], tokenize, "be brief", IM_END)
    prompt = LAYOUT.conversation_rows(history, tokenize, "be brief")
    answer = tokenize("yes")
    assert rows == prompt + text(answer + TURN_END)  # the rows trained on are the rows prompted with, then the answer
    # Every assistant turn is trained (the one in the history too); nothing else.
    first = len(text(header("user") + tokenize("what") + TURN_END + header("assistant")))
    trained = [i for i, m in enumerate(mask) if m]
    assert trained == [*range(first, first + 4 + 1), *range(len(prompt), len(rows) - 1)]
    with pytest.raises(ValueError, match="no assistant turn"):
        LAYOUT.training_rows([("user", "what")], tokenize, "x")


def test_split_rows_round_trip():
    segments = [GridSegment("text", [5, 6]), GridSegment("audio", [1, 2, 3]), GridSegment("text", [7]),
                GridSegment("audio", []), GridSegment("audio", [9])]
    rows = LAYOUT.segment_rows(segments)
    assert LAYOUT.split_rows(rows) == segments
    assert LAYOUT.split_rows(torch.tensor(rows)) == segments
    assert LAYOUT.segment_rows(LAYOUT.split_rows(rows)) == rows


def test_split_rows_reads_generated_rows():
    # Speech opened by the prompt (rows start inside a segment), a segment closed by a text row instead of
    # end-of-speech, start-of-speech right before text (an empty segment), then text padding.
    rows = [[MODALITY_PAD, 1], [MODALITY_PAD, EOSP], [5, AUDIO_PAD], [SOSP, AUDIO_PAD], [MODALITY_PAD, 2],
            [6, AUDIO_PAD], [SOSP, AUDIO_PAD], [7, AUDIO_PAD], [PAD, AUDIO_PAD]]
    assert LAYOUT.split_rows(rows) == [GridSegment("audio", [1]), GridSegment("text", [5]), GridSegment("audio", [2]),
                                       GridSegment("text", [6]), GridSegment("audio", []), GridSegment("text", [7])]
    # Without a text pad id, padding rows are text.
    layout = GridLayout(SOSP, EOSP, MODALITY_PAD, AUDIO_PAD)
    assert layout.split_rows([[PAD, AUDIO_PAD]]) == [GridSegment("text", [PAD])]


def test_split_rows_names_the_bad_row():
    with pytest.raises(ValueError, match=rf"seq: row 1 holds audio id {AUDIO_PAD + 70} inside a speech segment, "
                                         rf"outside the codebook \[0, {EOSP}\)"):
        LAYOUT.split_rows([[SOSP, AUDIO_PAD], [MODALITY_PAD, AUDIO_PAD + 70]], where="seq")
    with pytest.raises(ValueError, match=r"rows: row 0 holds text id 300, outside the tokenizer's vocabulary"):
        LAYOUT.split_rows([[300, AUDIO_PAD]], text_vocab_size=300)
    assert LAYOUT.split_rows([[300, AUDIO_PAD]]) == [GridSegment("text", [300])]  # no vocabulary: not checked


def test_left_pad():
    grid, mask = LAYOUT.left_pad([text([5]), torch.tensor(LAYOUT.speech_rows([1]))])
    assert grid.dtype == torch.long and grid.shape == (2, 3, 2)
    assert grid[0].tolist() == [[PAD, AUDIO_PAD], [PAD, AUDIO_PAD], [5, AUDIO_PAD]]
    assert mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="no text_pad_token_id"):
        GridLayout(SOSP, EOSP, MODALITY_PAD, AUDIO_PAD).left_pad([text([5])])


def test_audio_mode_read_off_rows():
    last = torch.tensor([[5, AUDIO_PAD], [SOSP, AUDIO_PAD], [MODALITY_PAD, 3], [MODALITY_PAD, EOSP]])
    assert LAYOUT.initial_audio_mode(last).tolist() == [False, True, True, False]
    mode = torch.tensor([False, False, True, True])
    rows = torch.tensor([[5, AUDIO_PAD], [SOSP, AUDIO_PAD], [MODALITY_PAD, 3], [MODALITY_PAD, EOSP]])
    assert LAYOUT.update_audio_mode(mode, rows).tolist() == [False, True, True, False]
    assert LAYOUT.is_speech_row(rows).tolist() == [False, False, True, True]


def test_layout_of_a_config_and_of_a_processor_agree():
    config = tiny_config()
    layout = GridLayout.from_config(config)
    assert layout == LAYOUT and layout.num_codes == EOSP
    assert MossSpeechProcessor.from_model_config(config, tiny_tokenizer()).grid_layout == layout


@pytest.mark.parametrize("kwargs, error, match", [
    ({"sosp_token_id": -1}, ValueError, "sosp_token_id must be an integer >= 0, got -1"),
    ({"audio_pad_token_id": 1.5}, ValueError, "audio_pad_token_id must be an integer >= 0, got 1.5"),
    ({"text_pad_token_id": True}, ValueError, "text_pad_token_id must be an integer >= 0, got True"),
])
def test_bad_ids(kwargs, error, match):
    values = dict(sosp_token_id=SOSP, eosp_token_id=EOSP, modality_pad_token_id=MODALITY_PAD,
                  audio_pad_token_id=AUDIO_PAD)
    with pytest.raises(error, match=match):
        GridLayout(**{**values, **kwargs})
    with pytest.raises(TypeError, match=r"missing \['sosp_token_id'"):
        GridLayout.from_config(object())
