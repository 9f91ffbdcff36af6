"""Publishing MOSS-Speech checkpoints: model cards and upload to the Hugging Face Hub.

`publish(model_dir, repo_id, ...)` stages the directory (weights linked, not copied; JSON files
rewritten), adds the remote code, a 4.x-compatible tokenizer_config.json and a README.md model card rendered from
`model_cards/` (Hub metadata: library_name, pipeline_tag, tags, base_model, license, datasets), then uploads
everything in one commit (`HfApi.create_repo` + `HfApi.upload_folder`). A codec given with `codec_dir` is uploaded
as the `codec/` subfolder of the same repository, and the processor points at it; `codec_repo_id` instead makes the
processor load a codec published on its own (`publish(codec_dir, repo, card="codec")`).
"""

from __future__ import annotations

import os
import re
import string
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, ModelCardData

from ..loading import read_json_file
from ..processing_moss_speech import CODEC_SUBFOLDER
from .checkpoint_info import describe_checkpoint
from .convert_moss_speech_original_to_hf import set_processor_codec_reference, write_portable_tokenizer_config
from .remote_code import PACKAGE_DIR, _write_text, export_remote_code

CARD_TEMPLATES = {"moss-speech": "moss_speech.md", "codec": "moss_speech_codec.md", "nano": "moss_speech_nano.md"}
CARD_TEMPLATES_ENV = "MOSS_SPEECH_MODEL_CARDS"
PAPER_URL = "https://arxiv.org/abs/2510.00499"
BIBTEX = """@misc{mossspeech2025,
  title         = {{MOSS-Speech}: Towards True Speech-to-Speech Models Without Text Guidance},
  author        = {{SII OpenMOSS Team}},
  year          = {2025},
  eprint        = {2510.00499},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2510.00499}
}"""
# Files staged as real copies (they may be rewritten); everything else (weights) is linked.
_COPIED_SUFFIXES = (".json", ".jinja", ".md", ".txt", ".py", ".yaml", ".yml")
_SKIPPED_NAMES = {".git", ".cache", "__pycache__", ".gitattributes", ".DS_Store"}


# ------------------------------------------------------------------------------------------------- model cards


def _templates_dir(templates_dir: str | os.PathLike | None) -> Path:
    candidates = [Path(templates_dir)] if templates_dir is not None else []
    if os.environ.get(CARD_TEMPLATES_ENV):
        candidates.append(Path(os.environ[CARD_TEMPLATES_ENV]))
    candidates.append(PACKAGE_DIR.parent / "model_cards")
    for candidate in candidates:
        if (candidate / CARD_TEMPLATES["moss-speech"]).is_file():
            return candidate
    raise FileNotFoundError(f"model card templates not found (looked in {[str(c) for c in candidates]}); run from a "
                            f"checkout of moss-speech, set {CARD_TEMPLATES_ENV}, or pass templates_dir=.")


def _human(count: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return str(count)


def _parameter_table(rows: Sequence[tuple[str, str, int]], total: int) -> str:
    lines = ["| branch | what | parameters | share |", "|---|---|---:|---:|"]
    for name, what, count in rows:
        lines.append(f"| {name} | {what} | {count:,} ({_human(count)}) | {100 * count / total:.1f} % |")
    lines.append(f"| **total** | | **{total:,} ({_human(total)})** | 100 % |")
    return "\n".join(lines)


def _lm_values(info: dict[str, Any]) -> dict[str, str]:
    lm = info["model"]
    counts, ids = lm["parameters"], lm["special_ids"]
    shared, tail = lm["num_shared_layers"], lm["num_modality_layers"]
    rows = [
        ("text embedding", f"`model.embed_tokens`, {lm['vocab_size']:,} × {lm['hidden_size']}",
         counts["text_embedding"]),
        ("audio embedding", f"`model.audio_embed`, {lm['audio_vocab_size']:,} × {lm['hidden_size']}",
         counts["audio_embedding"]),
        ("shared trunk", f"`model.shared_block`, {shared} decoder layers (both modalities)", counts["trunk"]),
        ("text tail", f"`model.text_block` + `text_norm`, {tail} decoder layers", counts["text_tail"]),
        ("audio tail", f"`model.audio_block` + `audio_norm`, {tail} decoder layers", counts["audio_tail"]),
        ("text head", f"`text_lm_head`, {lm['hidden_size']} → {lm['vocab_size']:,}", counts["text_head"]),
        ("audio head", f"`audio_lm_head`, {lm['hidden_size']} → {lm['audio_vocab_size']:,}", counts["audio_head"]),
    ]
    config_rows = [
        ("hidden size", f"{lm['hidden_size']} (MLP {lm['intermediate_size']})"),
        ("attention", f"{lm['num_attention_heads']} query heads, {lm['num_key_value_heads']} key/value heads, "
                      f"head dim {lm['head_dim']}, q/k RMS norms (Qwen3 layers)"),
        ("layers", f"{shared} shared + {tail} per tail = {lm['num_hidden_layers']} on any path, "
                   f"{shared + 2 * tail} at run time"),
        ("vocabularies", f"text {lm['vocab_size']:,}, audio {lm['audio_vocab_size']:,} "
                         f"(codes 0–{ids['eosp_token_id'] - 1}, end-of-speech {ids['eosp_token_id']})"),
        ("special ids", f"start-of-speech {ids['sosp_token_id']}, speech placeholder {ids['modality_pad_token_id']}, "
                        f"text pad {ids['pad_token_id']}, audio pad {ids['audio_pad_token_id']}"),
        ("context", f"{lm['max_position_embeddings']:,} positions"),
        ("weights dtype", str(lm["dtype"])),
    ]
    generation = lm.get("generation") or {}
    return {
        "architecture_table": _parameter_table(rows, counts["total"]),
        "config_table": "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in config_rows]),
        "total_parameters": _human(counts["total"]),
        "num_shared_layers": str(shared), "num_modality_layers": str(tail),
        "weights_size": f"{lm['weights']['bytes'] / 2**30:.2f} GiB" if lm["weights"]["bytes"] >= 2**30
        else f"{lm['weights']['bytes'] / 2**20:.2f} MiB",
        "generation_defaults": ", ".join(f"`{k}={v}`" for k, v in generation.items()) or "transformers' defaults",
    }


def _codec_values(info: dict[str, Any]) -> dict[str, str]:
    codec = info["codec"]
    counts = codec["parameters"]
    rows = [("speech tokenizer", "`encoder`: causal Whisper-VQ encoder, one codebook", counts["encoder"]),
            ("flow decoder", "`flow`: codes → 80-bin mel (conformer + flow-matching U-Net)", counts["flow"]),
            ("vocoder", "`hift`: HiFT (neural source-filter + iSTFT), mel → waveform", counts["hift"]),
            ("speaker encoder", "`speaker_encoder`: CAM++ x-vector of the voice prompt", counts["speaker_encoder"])]
    return {
        "codec_table": _parameter_table(rows, counts["total"]),
        "codec_parameters": _human(counts["total"]),
        "num_codes": f"{codec['num_codes']:,}",
        "codes_per_second": f"{codec['codes_per_second']:g}",
        "input_sampling_rate": str(codec["input_sampling_rate"]),
        "output_sampling_rate": str(codec["output_sampling_rate"]),
        "samples_per_code": str(codec["samples_per_code"]),
    }


def _card_metadata(card: str, base_model: str | Sequence[str] | None, datasets: Sequence[str] | None,
                   tags: Sequence[str] | None) -> dict[str, Any]:
    common = ["moss-speech", "speech", "audio", "custom_code"]
    if card == "codec":
        metadata = {"pipeline_tag": "feature-extraction",
                    "tags": common + ["speech-tokenizer", "audio-codec", "vocoder", "text-to-speech"]}
    else:
        metadata = {"pipeline_tag": "any-to-any",
                    "tags": common + ["speech-to-speech", "spoken-dialogue", "speech-language-model", "qwen3"],
                    "language": ["en", "zh"] if card == "moss-speech" else ["en"]}
    if base_model is None and card == "moss-speech":
        base_model = "Qwen/Qwen3-8B"
    metadata.update(library_name="transformers", license="apache-2.0")
    if base_model:
        metadata["base_model"] = base_model
    if datasets:
        metadata["datasets"] = list(datasets)
    metadata["tags"] = list(dict.fromkeys(metadata["tags"] + list(tags or [])))
    return metadata


def render_model_card(
    model_dir: str | os.PathLike,
    card: str,
    repo_id: str,
    codec_location: str | None = None,
    base_model: str | Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    values: Mapping[str, str] | None = None,
    templates_dir: str | os.PathLike | None = None,
) -> str:
    """README.md text for `model_dir`: YAML metadata plus the `card` template filled with its facts.

    Args:
        model_dir: The directory being published (parameter counts come from it, on the meta device).
        card: "moss-speech", "codec" or "nano" (a template of `model_cards/`).
        repo_id: The repository the card is for (used in the loading examples).
        codec_location: Where the processor finds the codec: "codec" (a subfolder), a repo id, or None.
        base_model, datasets, tags: Hub metadata (`base_model` defaults to Qwen/Qwen3-8B for "moss-speech").
        values: Overrides of any template placeholder (e.g. `provenance`, `evaluation`).
        templates_dir: Where the templates are (default: `model_cards/` of the checkout, or $MOSS_SPEECH_MODEL_CARDS).
    """
    if card not in CARD_TEMPLATES:
        raise ValueError(f"card must be one of {sorted(CARD_TEMPLATES)}, got {card!r}.")
    info = describe_checkpoint(model_dir)
    is_codec = "codec" in info and "model" not in info
    if is_codec != (card == "codec"):
        held, fits = ("a codec", "card='codec'") if is_codec else ("a language model", "card='moss-speech' or 'nano'")
        raise ValueError(f"card={card!r} does not fit {str(model_dir)!r}, which holds {held}; use {fits}.")
    template = (_templates_dir(templates_dir) / CARD_TEMPLATES[card]).read_text()
    filled: dict[str, str] = {"repo_id": repo_id, "paper_url": PAPER_URL, "bibtex": BIBTEX,
                              "model_name": repo_id.rsplit("/", 1)[-1]}
    if is_codec:
        filled.update(_codec_values(info))
    else:
        filled.update(_lm_values(info))
        if codec_location == CODEC_SUBFOLDER:
            filled["codec_note"] = (f"The speech codec is included in the `{CODEC_SUBFOLDER}/` folder of this "
                                    "repository; the processor loads it from there when speech is first encoded or "
                                    "decoded.")
            filled["codec_argument"] = ""
        elif codec_location:
            filled["codec_note"] = (f"The speech codec lives in its own repository, "
                                    f"[{codec_location}](https://huggingface.co/{codec_location}); the processor "
                                    "loads it from there when speech is first encoded or decoded.")
            filled["codec_argument"] = ""
        else:
            filled["codec_note"] = ("No speech codec is bundled: pass `codec_path=` (a MOSS-Speech codec directory "
                                    "or repository) to `from_pretrained` of the processor to encode or speak audio.")
            filled["codec_argument"] = ', codec_path="path/or/repo/of/MOSS-Speech-Codec"'
    filled.update({"provenance": "", "evaluation": "Not reported for this checkpoint."})
    filled.update(_DEFAULT_VALUES.get(card, {}))
    filled.update(values or {})
    try:
        body = string.Template(template).substitute(filled)
    except KeyError as error:
        raise ValueError(f"model card template {CARD_TEMPLATES[card]} needs a value for {error}; pass it in "
                         "values=.") from error
    metadata = ModelCardData(**_card_metadata(card, base_model, datasets, tags)).to_yaml()
    return f"---\n{metadata}\n---\n\n{body.strip()}\n"


_DEFAULT_VALUES = {
    "moss-speech": {"provenance": "The weights are those of the original MOSS-Speech release, converted with "
                                  "`moss-speech convert`: parameter names and values are unchanged (the release's "
                                  "bfloat16 tensors, re-sharded); configuration, tokenizer configuration, processor "
                                  "and generation defaults are rewritten for current transformers."},
    "nano": {"training_data": "Synthetic and closed: a world of short facts (small-number arithmetic, capitals, "
                              "colours of things, opposites, the day after a day, ...), each a question with a short "
                              "answer, spoken by espeak-ng voices. The text model first learns every fact as text; "
                              "speech pre-training with the text backbone frozen, a second stage and supervised "
                              "fine-tuning then use speech for only a subset of the facts. Held-out spoken questions "
                              "about facts seen only as text, in a voice never heard in training, measure the "
                              "transfer from text knowledge to speech; the same recipe without the frozen stage is "
                              "the ablation. Data are generated by the package's `processing/` scripts, not "
                              "downloaded."},
    "codec": {"provenance": "The weights are those of the original MOSS-Speech codec release, converted with "
                            "`moss-speech convert --codec`: the encoder from the release's `model.safetensors`, the "
                            "flow decoder and HiFT vocoder from its `flow/flow.pt` and `flow/hift.pt` (read as plain "
                            "tensors), the CAM++ speaker encoder from its `flow/campplus.onnx`; values unchanged."},
}


# ------------------------------------------------------------------------------------------------- publishing


def _stage_tree(source: Path, target: Path, skip: Sequence[str] = ()) -> None:
    """Mirror `source` into `target`: small text files copied, everything else symlinked (weights are not copied)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.name in _SKIPPED_NAMES or path.name in skip or path.name.endswith(".pyc"):
            continue
        if path.is_dir():
            _stage_tree(path, target / path.name)
        elif path.suffix in _COPIED_SUFFIXES:
            (target / path.name).write_bytes(path.read_bytes())
        else:
            (target / path.name).symlink_to(path.resolve())


def _portable_tokenizer(directory: Path) -> None:
    """Make tokenizer_config.json loadable by transformers 4.57 when it was written by 5.x only."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    tokenizer_class = read_json_file(path).get("tokenizer_class")
    if tokenizer_class in ("Qwen2TokenizerFast", "Qwen2Tokenizer", "PreTrainedTokenizerFast"):
        return
    from transformers import AutoTokenizer

    write_portable_tokenizer_config(directory, AutoTokenizer.from_pretrained(str(directory)))


def stage_upload(
    model_dir: str | os.PathLike,
    stage_dir: str | os.PathLike,
    repo_id: str,
    card: str = "moss-speech",
    codec_dir: str | os.PathLike | None = None,
    codec_repo_id: str | None = None,
    remote_code: bool = True,
    base_model: str | Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    card_values: Mapping[str, str] | None = None,
    templates_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Lay out in `stage_dir` exactly what `publish` uploads; returns the repository's file list (sorted).

    Weights are symlinked to `model_dir` (and `codec_dir`), JSON files are copies rewritten for the Hub: the
    processor's codec reference, a 4.x-compatible tokenizer_config.json, `auto_map`. A README.md card replaces any
    README.md of `model_dir`. See `publish` for the arguments.
    """
    source, stage = Path(model_dir), Path(stage_dir)
    if not (source / "config.json").is_file():
        raise ValueError(f"model_dir must be a saved MOSS-Speech model or codec directory (with config.json), got "
                         f"{str(source)!r}.")
    if codec_dir is not None and codec_repo_id is not None:
        raise ValueError("pass codec_dir (upload the codec as codec/) or codec_repo_id (reference a codec "
                         "repository), not both.")
    if codec_dir is not None and (source / CODEC_SUBFOLDER).exists():
        raise ValueError(f"{str(source)!r} already has a {CODEC_SUBFOLDER}/ folder; do not pass codec_dir as well.")
    if codec_dir is not None and not (Path(codec_dir) / "config.json").is_file():
        raise ValueError(f"codec_dir must be a converted codec directory (with config.json), got {str(codec_dir)!r}.")
    _stage_tree(source, stage, skip=("README.md",))
    if codec_dir is not None:
        _stage_tree(Path(codec_dir), stage / CODEC_SUBFOLDER, skip=("README.md",))

    codec_location = None
    processor_path = stage / "processor_config.json"
    if processor_path.is_file():
        processor = read_json_file(processor_path)
        if codec_dir is not None:
            set_processor_codec_reference(stage, None, CODEC_SUBFOLDER)
            codec_location = CODEC_SUBFOLDER
        elif codec_repo_id is not None:
            set_processor_codec_reference(stage, codec_repo_id, None)
            codec_location = codec_repo_id
        elif processor.get("codec_subfolder"):
            if not (stage / processor["codec_subfolder"] / "config.json").is_file():
                raise ValueError(f"the processor's codec_subfolder {processor['codec_subfolder']!r} is not in "
                                 f"{str(source)!r}; pass codec_dir= or codec_repo_id=.")
            codec_location = processor["codec_subfolder"]
        elif processor.get("codec_path"):
            path = processor["codec_path"]
            if (os.path.isabs(path) or os.path.exists(path) or path.startswith(".")
                    or not re.fullmatch(r"[\w.-]+/[\w.-]+", path)):
                raise ValueError(f"the processor loads its codec from the local path {path!r}, which does not exist "
                                 "on the Hub: pass codec_dir= (uploaded as codec/) or codec_repo_id=.")
            codec_location = path
        _portable_tokenizer(stage)
    elif codec_dir is not None or codec_repo_id is not None:
        raise ValueError(f"{str(source)!r} has no processor_config.json to point at a codec.")
    if remote_code:
        export_remote_code(stage)
        if (stage / CODEC_SUBFOLDER / "config.json").is_file():
            export_remote_code(stage / CODEC_SUBFOLDER)
    readme = render_model_card(source, card, repo_id, codec_location=codec_location, base_model=base_model,
                               datasets=datasets, tags=tags, values=card_values, templates_dir=templates_dir)
    _write_text(stage / "README.md", readme)
    return sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())


def publish(
    model_dir: str | os.PathLike,
    repo_id: str,
    codec_dir: str | os.PathLike | None = None,
    card: str = "moss-speech",
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload MOSS-Speech checkpoint with moss-speech",
    create_pr: bool = False,
    codec_repo_id: str | None = None,
    remote_code: bool = True,
    base_model: str | Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    card_values: Mapping[str, str] | None = None,
    revision: str | None = None,
    templates_dir: str | os.PathLike | None = None,
) -> CommitInfo:
    """Upload a model (or codec) directory with its processor, codec, remote code and model card in one commit.

    Args:
        model_dir: A converted or saved MOSS-Speech model directory (or a codec directory with `card="codec"`).
        repo_id: "namespace/name" of the Hub repository (created if needed).
        codec_dir: A codec directory to upload as the repository's `codec/` folder (the processor points at it).
        card: Model card template: "moss-speech", "codec" or "nano".
        private: Create the repository private (an existing repository keeps its visibility).
        token: Hub token (default: the logged-in user's / $HF_TOKEN).
        commit_message: Message of the upload commit.
        create_pr: Open a pull request instead of committing to the main branch.
        codec_repo_id: Instead of `codec_dir`, the repository of a codec published on its own.
        remote_code: Add code files and `auto_map` (loading with `trust_remote_code=True` without this package).
        base_model, datasets, tags: Hub metadata of the card.
        card_values: Overrides of template placeholders (e.g. `provenance`, `evaluation`).
        revision: Branch to commit to.
        templates_dir: Where the card templates are (default: `model_cards/` of the checkout).
    Returns:
        The `CommitInfo` of the upload.
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must be 'namespace/name', got {repo_id!r}.")
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="moss-speech-upload-") as stage:
        stage_upload(model_dir, stage, repo_id, card=card, codec_dir=codec_dir, codec_repo_id=codec_repo_id,
                     remote_code=remote_code, base_model=base_model, datasets=datasets, tags=tags,
                     card_values=card_values, templates_dir=templates_dir)
        api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=stage, commit_message=commit_message, token=token,
                                 repo_type="model", create_pr=create_pr, revision=revision)


__all__ = [
    "BIBTEX",
    "publish",
    "render_model_card",
    "stage_upload",
]
