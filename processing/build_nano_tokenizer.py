"""Build the MOSS-Speech-Nano text tokenizer: a small byte-level BPE trained on every text of the nano world.

    python processing/build_nano_tokenizer.py --corpus data/nano/corpus --output outputs/nano/tokenizer

Training texts: the questions and answers of every fact (the corpus' `facts` split, train AND held-out facts: all
facts are learned as text), the processor's default system prompts, the role names, and every distinct word on its
own (the processor tokenizes each chat segment separately, so an answer starts without a leading space: both the
word-initial and the space-prefixed form of each word must be tokens).

The special tokens have the release's strings and roles, so the processor's code path is the real one; they take
the first ids (`SPECIAL_TOKENS` order):

    id  token                  role
    0   <|endoftext|>          text pad (left padding), stop token
    1   <|im_start|>           turn opener
    2   <|im_end|>             turn closer, eos (stop token)
    3   <|object_ref_start|>   start of speech (sosp)
    4   <|object_ref_end|>     modality pad (text channel of speech rows)

The result is a `PreTrainedTokenizerFast` saved with `save_pretrained` (loadable with `AutoTokenizer`), with
`pad_token="<|endoftext|>"` and `eos_token="<|im_end|>"`. `special_ids(tokenizer)` gives the ids the MOSS-Speech
config and processor need (audio ids included: codes 0..511, end of speech 512, audio pad 513).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SOSP_TOKEN = "<|object_ref_start|>"
MODALITY_PAD_TOKEN = "<|object_ref_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, SOSP_TOKEN, MODALITY_PAD_TOKEN)
ROLES = ("system", "user", "assistant")

# The nano codec's audio vocabulary (codes 0..511, then end of speech and the audio pad; 520 rows in the model).
NUM_CODES = 512
EOSP_TOKEN_ID = 512
AUDIO_PAD_TOKEN_ID = 513
AUDIO_VOCAB_SIZE = 520

DEFAULT_VOCAB_SIZE = 1000


def _ensure_package() -> None:
    """Make `modeling_moss_speech` importable (imported lazily: tokenizer training needs little of it)."""
    try:
        import modeling_moss_speech  # noqa: F401
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _default_system_prompts() -> list[str]:
    _ensure_package()
    from modeling_moss_speech.processing_moss_speech import DEFAULT_SYSTEM_PROMPTS

    return list(DEFAULT_SYSTEM_PROMPTS.values())


def world_texts(questions: Iterable[str], answers: Iterable[str], extra: Sequence[str] = ()) -> list[str]:
    """The tokenizer's training texts: questions, answers, system prompts, role names, chat markers, single words.

    Args:
        questions: Every question of the world (as text).
        answers: Every answer of the world.
        extra: More texts (e.g. other system prompts).
    """
    sentences = [str(t) for t in list(questions) + list(answers) + list(extra)]
    for index, text in enumerate(sentences):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"world_texts: text {index} must be a non-empty string, got {text!r}.")
    texts = sentences + _default_system_prompts() + list(ROLES) + [f"{IM_START}{r}\n" for r in ROLES] + [f"{IM_END}\n"]
    # Each word alone: a chat segment (an answer, a word) starts without a leading space.
    words = sorted({word for text in sentences + _default_system_prompts() for word in text.split()})
    return texts + words


def train_tokenizer(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` with the nano special tokens at ids 0..4 (see the module docstring).

    Training stops early when every pre-token of the texts is a single token, so the vocabulary may end smaller than
    `vocab_size`. Every byte stays encodable (the 256 byte symbols are in the alphabet).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int >= {256 + len(SPECIAL_TOKENS)} (bytes + specials), "
                         f"got {vocab_size!r}.")
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings.")
    backend = Tokenizer(models.BPE())
    # No prefix space: a segment's first word is tokenized as written (the processor tokenizes per segment).
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=IM_END,
        additional_special_tokens=[IM_START, SOSP_TOKEN, MODALITY_PAD_TOKEN],
    )
    tokenizer.model_max_length = 4096
    for index, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != index:
            raise RuntimeError(f"special token {token} got id {tokenizer.convert_tokens_to_ids(token)}, not {index}.")
    return tokenizer


def special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The MOSS-Speech special ids for this tokenizer (text ids) and the nano codec (audio ids)."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("pad_token_id", PAD_TOKEN), ("im_start_token_id", IM_START), ("im_end_token_id", IM_END),
        ("sosp_token_id", SOSP_TOKEN), ("modality_pad_token_id", MODALITY_PAD_TOKEN))}
    unk = tokenizer.unk_token_id
    missing = [name for name, value in ids.items() if value is None or (unk is not None and value == unk)]
    if missing:
        raise ValueError(f"the tokenizer lacks the nano special tokens for {missing}; build it with "
                         "processing/build_nano_tokenizer.py.")
    return {**ids, "eosp_token_id": EOSP_TOKEN_ID, "audio_pad_token_id": AUDIO_PAD_TOKEN_ID, "num_codes": NUM_CODES,
            "audio_vocab_size": AUDIO_VOCAB_SIZE}


def nano_processor(tokenizer: PreTrainedTokenizerFast, codec=None, **kwargs):
    """A `MossSpeechProcessor` over the nano tokenizer with the nano special ids (`kwargs` as its `__init__`)."""
    from modeling_moss_speech import MossSpeechProcessor

    ids = special_ids(tokenizer)
    return MossSpeechProcessor(
        tokenizer=tokenizer, codec=codec, sosp_token_id=ids["sosp_token_id"], eosp_token_id=ids["eosp_token_id"],
        modality_pad_token_id=ids["modality_pad_token_id"], audio_pad_token_id=ids["audio_pad_token_id"],
        text_pad_token_id=ids["pad_token_id"], num_codes=ids["num_codes"], **kwargs,
    )


def read_facts(corpus: str | os.PathLike) -> list[dict]:
    """The `facts` split of a nano corpus (`save_to_disk` DatasetDict) as a list of dicts."""
    import datasets

    if not os.path.isdir(corpus):
        raise ValueError(f"--corpus {str(corpus)!r} is not a directory (expected the DatasetDict written by "
                         "processing/synthesize_espeak.py).")
    data = datasets.load_from_disk(str(corpus))
    if not isinstance(data, datasets.DatasetDict) or "facts" not in data:
        raise ValueError(f"--corpus {str(corpus)!r} must be a DatasetDict with a 'facts' split, got "
                         f"{list(data) if isinstance(data, datasets.DatasetDict) else type(data).__name__}.")
    facts = data["facts"]
    needed = {"fact_id", "question", "answer"}
    if not needed <= set(facts.column_names):
        raise ValueError(f"the corpus' facts split needs columns {sorted(needed)}, has {facts.column_names}.")
    return facts.to_list()


def build(corpus: str | os.PathLike, output: str | os.PathLike,
          vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the tokenizer on a corpus' facts and save it with the nano processor's files to `output`; returns it."""
    facts = read_facts(corpus)
    tokenizer = train_tokenizer(world_texts([f["question"] for f in facts], [f["answer"] for f in facts]),
                                vocab_size=vocab_size)
    os.makedirs(output, exist_ok=True)
    # The processor's files (tokenizer, feature extractor, special ids) in one directory: AutoTokenizer and
    # MossSpeechProcessor.from_pretrained both load it (sft.py's --processor_name_or_path).
    nano_processor(tokenizer).save_pretrained(str(output))
    with open(os.path.join(output, "nano_special_ids.json"), "w", encoding="utf-8") as handle:
        json.dump(special_ids(tokenizer), handle, indent=2)
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `--corpus`, `--output`, `--vocab-size`, `--threads`."""
    _ensure_package()
    from modeling_moss_speech.threads import add_threads_argument, set_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="data/nano/corpus", help="Nano corpus (DatasetDict with a facts split).")
    parser.add_argument("--output", default="outputs/nano/tokenizer", help="Directory for the tokenizer.")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="Largest vocabulary size.")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    tokenizer = build(args.corpus, args.output, args.vocab_size)
    print(json.dumps({"output": args.output, "vocab_size": len(tokenizer), **special_ids(tokenizer)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
