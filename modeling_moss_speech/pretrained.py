"""Checkpoints that ship inside the package: MOSS-Speech-Nano and its voice prompts.

The nano checkpoint is package data (`modeling_moss_speech/pretrained/moss-speech-nano/`): a MOSS-Speech LLM
directory (config, safetensors, generation config, tokenizer, processor config) with its codec in `codec/` and
voice prompts in `voices/<name>.safetensors`. It is found offline, next to this module, in an editable install
(the checkout's copy) and in a wheel install (the installed copy) alike.

```python
from transformers import AutoModelForCausalLM, AutoProcessor
from modeling_moss_speech.pretrained import nano_path, shipped_voices

model = AutoModelForCausalLM.from_pretrained(nano_path())
processor = AutoProcessor.from_pretrained(nano_path())       # its codec comes from nano_path() / "codec"
voices = shipped_voices()                                     # name -> path for MossSpeechVoicePrompt.load
```
"""

from __future__ import annotations

import os
from pathlib import Path

PRETRAINED_ROOT = Path(__file__).resolve().parent / "pretrained"
NANO_NAME = "moss-speech-nano"
VOICES_SUBFOLDER = "voices"
VOICE_SUFFIX = ".safetensors"
# What a user talking to the shipped checkpoint should expect (its corpus: processing/synthesize_espeak.py).
NANO_DESCRIPTION = ("MOSS-Speech-Nano, the 2.5M-parameter demonstration model shipped with the package: it knows "
                    "only a closed world of 255 facts (small-number arithmetic, capitals, colours, opposites, the "
                    "day, number and month after), asked in English by synthetic espeak-ng voices, e.g. \"what "
                    "colour is a banana\"; anything else gets a fluent but meaningless answer.")


def nano_path() -> Path:
    """Directory of the shipped MOSS-Speech-Nano checkpoint (LLM + processor, codec in `codec/`).

    Raises:
        FileNotFoundError: The checkpoint is not installed (no `config.json` in the package-data directory), e.g.
            in a checkout where the nano recipe has not been run and nothing has been shipped yet.
    """
    path = PRETRAINED_ROOT / NANO_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the shipped MOSS-Speech-Nano checkpoint is not installed: {str(path)!r} has no config.json. It is "
            "package data of modeling_moss_speech: reinstall the package from a checkout that contains it "
            "(pip install -e . or a wheel), or train it with training/recipes/nano.sh and copy the result there; "
            "otherwise pass a checkpoint directory explicitly (--model DIR).")
    return path


def shipped_voices(checkpoint: str | os.PathLike | None = None) -> dict[str, Path]:
    """Voice prompts of a checkpoint (default: the shipped nano one), name → `voices/<name>.safetensors` path.

    Names are file stems, sorted; a checkpoint without a `voices/` folder has none (an empty dict). Load one with
    `MossSpeechVoicePrompt.load(str(path))`.

    Raises:
        FileNotFoundError: `checkpoint` is `None` and the nano checkpoint is not installed, or `checkpoint` is not
            a directory.
    """
    directory = nano_path() if checkpoint is None else Path(checkpoint)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist.")
    folder = directory / VOICES_SUBFOLDER
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in sorted(folder.iterdir())
            if path.is_file() and path.suffix == VOICE_SUFFIX}


__all__ = ["NANO_DESCRIPTION", "NANO_NAME", "PRETRAINED_ROOT", "nano_path", "shipped_voices"]
