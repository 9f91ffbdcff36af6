"""Build the MOSS-Speech-Nano text tokenizer: a small byte-level BPE trained on every text of the nano world.

    python processing/build_nano_tokenizer.py --corpus data/nano/corpus --output outputs/nano/tokenizer [--vocab_size N]

Training texts: the questions and answers of every fact (the corpus' `facts` split, train AND held-out facts: all
facts are learned as text), the processor's default system prompts, the role names, and every distinct word on its
own (the processor tokenizes each chat segment separately, so an answer starts without a leading space: both the
word-initial and the space-prefixed form of each word must be tokens).

The special tokens have the release's strings and roles, so the processor's code path is the real one; they take
the first ids (`NANO_SPECIAL_TOKENS` order, `modeling_moss_speech.apps.script_utils`):

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

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modeling_moss_speech.apps.script_utils import (
    NANO_IM_END,
    NANO_IM_START,
    NANO_MODALITY_PAD_TOKEN,
    NANO_PAD_TOKEN,
    NANO_SOSP_TOKEN,
    NANO_SPECIAL_TOKENS,
    ScriptArgumentParser,
    nano_processor,
    threads_field,
)
from modeling_moss_speech.apps.script_utils import nano_special_ids as special_ids
from modeling_moss_speech.apps.script_utils import read_nano_facts as read_facts
from modeling_moss_speech.processing_moss_speech import DEFAULT_SYSTEM_PROMPTS
from modeling_moss_speech.threads import set_threads

ROLES = ("system", "user", "assistant")
DEFAULT_VOCAB_SIZE = 1000


@dataclass
class BuildNanoTokenizerArguments:
    """Flags of `processing/build_nano_tokenizer.py`."""

    corpus: str = field(default="data/nano/corpus", metadata={"help": "Nano corpus (DatasetDict with a facts split)."})
    output: str = field(default="outputs/nano/tokenizer", metadata={"help": "Directory for the tokenizer."})
    vocab_size: int = field(default=DEFAULT_VOCAB_SIZE, metadata={"help": "Largest vocabulary size."})
    threads: int | None = threads_field()


def _default_system_prompts() -> list[str]:
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
    texts = (sentences + _default_system_prompts() + list(ROLES) + [f"{NANO_IM_START}{r}\n" for r in ROLES]
             + [f"{NANO_IM_END}\n"])
    # Each word alone: a chat segment (an answer, a word) starts without a leading space.
    words = sorted({word for text in sentences + _default_system_prompts() for word in text.split()})
    return texts + words


def train_tokenizer(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` with the nano special tokens at ids 0..4 (see the module docstring).

    Training stops early when every pre-token of the texts is a single token, so the vocabulary may end smaller than
    `vocab_size`. Every byte stays encodable (the 256 byte symbols are in the alphabet).
    """
    smallest = 256 + len(NANO_SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(f"vocab_size must be an int >= {smallest} (bytes + specials), "
                         f"got {vocab_size!r}.")
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings.")
    backend = Tokenizer(models.BPE())
    # No prefix space: a segment's first word is tokenized as written (the processor tokenizes per segment).
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in NANO_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=NANO_PAD_TOKEN, eos_token=NANO_IM_END,
        additional_special_tokens=[NANO_IM_START, NANO_SOSP_TOKEN, NANO_MODALITY_PAD_TOKEN],
    )
    tokenizer.model_max_length = 4096
    for index, token in enumerate(NANO_SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != index:
            raise RuntimeError(f"special token {token} got id {tokenizer.convert_tokens_to_ids(token)}, not {index}.")
    return tokenizer


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


def make_parser() -> ScriptArgumentParser:
    """The command-line parser (`--config file.yaml` and the flags of `BuildNanoTokenizerArguments`)."""
    return ScriptArgumentParser(BuildNanoTokenizerArguments, description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the tokenizer from `--corpus` into `--output`; prints its size and special ids."""
    (args,) = make_parser().parse_args_and_config(argv)
    set_threads(args.threads)
    tokenizer = build(args.corpus, args.output, args.vocab_size)
    print(json.dumps({"output": args.output, "vocab_size": len(tokenizer), **special_ids(tokenizer)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
