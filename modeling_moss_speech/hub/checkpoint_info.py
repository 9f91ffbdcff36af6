"""What a MOSS-Speech checkpoint directory holds: config summary, parameter counts per branch, weight files.

Used by `moss-speech info`; everything is computed from config.json on the meta device and from safetensors
headers, so describing a 9B checkpoint loads no weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..configuration_moss_speech import MossSpeechConfig
from ..configuration_moss_speech_codec import MossSpeechCodecConfig
from ..loading import read_json_file
from ..modeling_moss_speech import MossSpeechForCausalLM
from ..modeling_moss_speech_codec import MossSpeechCodecModel
from ..processing_moss_speech import MossSpeechProcessor

LM_MODEL_TYPE = MossSpeechConfig.model_type
CODEC_MODEL_TYPE = MossSpeechCodecConfig.model_type
PROCESSOR_FILE = "processor_config.json"
GENERATION_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens",
                     "min_new_tokens", "eos_token_id")
LM_BRANCHES = (
    ("text_embedding", ("model.embed_tokens.",)),
    ("audio_embedding", ("model.audio_embed.",)),
    ("trunk", ("model.shared_block.",)),
    ("text_tail", ("model.text_block.", "model.text_norm.")),
    ("audio_tail", ("model.audio_block.", "model.audio_norm.")),
    ("text_head", ("text_lm_head.",)),
    ("audio_head", ("audio_lm_head.",)),
)
CODEC_COMPONENTS = ("encoder", "flow", "hift", "speaker_encoder")
LM_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "num_hidden_layers", "num_shared_layers", "num_modality_layers", "max_position_embeddings", "vocab_size",
             "audio_vocab_size")
LM_SPECIAL_IDS = ("sosp_token_id", "eosp_token_id", "modality_pad_token_id", "audio_pad_token_id", "pad_token_id",
                  "bos_token_id", "eos_token_id")


def _count_by_prefix(model: torch.nn.Module, branches: Sequence[tuple[str, Sequence[str]]]) -> dict[str, int]:
    """Parameters per branch (first matching prefix), plus `other` if anything is left, plus `total`."""
    counts = {name: 0 for name, _ in branches}
    other = 0
    for name, parameter in model.named_parameters():
        for branch, prefixes in branches:
            if name.startswith(tuple(prefixes)):
                counts[branch] += parameter.numel()
                break
        else:
            other += parameter.numel()
    if other:
        counts["other"] = other
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def _weights_summary(directory: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Safetensors files of `directory` (size, tensors, dtypes) read from their headers, checked against `model`."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_file(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} is not a safetensors index (no weight_map).")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(directory.glob("model*.safetensors"))
    shapes: dict[str, list[int]] = {}
    dtypes: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                shapes[key], _ = list(view.get_shape()), dtypes.add(str(view.get_dtype()))
    expected = {key: list(value.shape) for key, value in model.state_dict().items()}
    differing = sorted(k for k in expected.keys() | shapes.keys() if expected.get(k) != shapes.get(k))
    return {"files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files), "tensors": len(shapes),
            "stored_values": int(sum(int(np.prod(shape)) for shape in shapes.values())), "dtypes": sorted(dtypes),
            "differing_keys": differing if files else [], "matches_config": bool(files) and not differing}


def _lm_info(directory: Path) -> dict[str, Any]:
    """Configuration summary, parameters per branch (meta device) and weight files of an LM directory."""
    config = MossSpeechConfig.from_pretrained(str(directory))
    with torch.device("meta"):
        model = MossSpeechForCausalLM(config)
    info = {"architecture": type(model).__name__, **{name: getattr(config, name) for name in LM_FIELDS},
            "special_ids": {name: getattr(config, name, None) for name in LM_SPECIAL_IDS},
            "dtype": str(getattr(config, "dtype", None) or "unspecified").replace("torch.", ""),
            "parameters": _count_by_prefix(model, LM_BRANCHES), "weights": _weights_summary(directory, model)}
    values = read_json_file(directory / "generation_config.json", "generation config", missing_ok=True)
    if values is not None:
        info["generation"] = {k: v for k, v in values.items()
                              if k in GENERATION_FIELDS or (k.startswith(("text_", "audio_")) and v is not None)}
    return info


def _codec_info(directory: Path) -> dict[str, Any]:
    """Rates, codebook and parameters per component (meta device) of a codec directory."""
    config = MossSpeechCodecConfig.from_pretrained(str(directory))
    with torch.device("meta"):
        model = MossSpeechCodecModel(config)
    return {"architecture": type(model).__name__, "num_codes": config.num_codes,
            "input_sampling_rate": config.sampling_rate, "output_sampling_rate": config.output_sampling_rate,
            "samples_per_code": config.samples_per_code,
            "codes_per_second": config.output_sampling_rate / config.samples_per_code,
            "parameters": _count_by_prefix(model, [(name, (f"{name}.",)) for name in CODEC_COMPONENTS]),
            "weights": _weights_summary(directory, model)}


def _processor_info(directory: Path) -> dict[str, Any]:
    """Tokenizer, special ids (with their tokens), feature extractor and codec reference of a processor directory."""
    processor = MossSpeechProcessor.from_pretrained(str(directory))  # the codec is lazy: not loaded here
    tokenizer, extractor = processor.tokenizer, processor.feature_extractor
    text_ids = {name: {"id": value, "token": tokenizer.convert_ids_to_tokens(value)}
                for name in ("sosp_token_id", "modality_pad_token_id", "text_pad_token_id")
                for value in (getattr(processor, name),)}
    codec = processor.codec_path
    if codec is None and processor.codec_subfolder is not None:
        codec = str(directory / processor.codec_subfolder)
    return {"processor_class": type(processor).__name__, "tokenizer_class": type(tokenizer).__name__,
            "tokenizer_size": len(tokenizer), "special_ids": {**text_ids, **{
                name: {"id": getattr(processor, name)} for name in ("eosp_token_id", "audio_pad_token_id")}},
            "num_codes": processor.num_codes,
            "feature_extractor": {"class": type(extractor).__name__, "sampling_rate": extractor.sampling_rate,
                                  "feature_size": extractor.feature_size},
            "codec": None if codec is None else {"path": codec, "exists": Path(codec).is_dir()},
            "default_system_prompts": processor.default_system_prompts,
            "chat_template": processor.chat_template is not None}


def _scaled(value: float, base: int, units: Sequence[str]) -> str:
    """`value` in the largest unit it reaches: _scaled(2e9, 1000, ("", "K", "M", "B")) == "2.00 B"."""
    power = 0
    while power + 1 < len(units) and value >= base ** (power + 1):
        power += 1
    return f"{value / base ** power:.2f} {units[power]}" if power else f"{int(value)} {units[0]}".rstrip()


def _parameter_rows(counts: dict[str, int]) -> list[tuple[str, str]]:
    """(label, text) rows of a parameter table: count, scaled count, share of the total."""
    total = counts["total"] or 1
    return [("parameters", "counted on the meta device from config.json (no weights loaded)")] + [
        (f"  {name}", f"{value:>16,}  {_scaled(value, 1000, ('', 'K', 'M', 'B')):>9}  {100 * value / total:5.1f} %")
        for name, value in counts.items()]


def _weights_rows(weights: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows describing the safetensors files and whether they match the config."""
    if not weights["files"]:
        return [("weights", "no safetensors files")]
    shown = ", ".join(weights["files"][:3]) + (", ..." if len(weights["files"]) > 3 else "")
    differing = weights["differing_keys"]
    return [("weights", f"{len(weights['files'])} safetensors file(s) ({shown}), "
                        f"{_scaled(weights['bytes'], 1024, ('B', 'KiB', 'MiB', 'GiB'))}, {weights['tensors']} tensors, "
                        f"{weights['stored_values']:,} values, {'/'.join(weights['dtypes'])}"),
            ("", "every tensor matches the config's names and shapes" if not differing else
             f"{len(differing)} tensor(s) missing, unexpected or of another shape: {', '.join(differing[:3])}"
             + (", ..." if len(differing) > 3 else ""))]


def _format_info(report: dict[str, Any]) -> str:
    """The human-readable form of `info`'s report."""
    lines = [f"{report['path']}: {', '.join(report['holds'])}"]

    def section(title: str, rows: Sequence[tuple[str, str]]) -> None:
        """Append a titled block of aligned `label  value` lines."""
        lines.extend(["", title] + [f"  {label:<19}{value}" for label, value in rows])

    if (lm := report.get("model")) is not None:
        ids = lm["special_ids"]
        section(f"MOSS-Speech language model ({lm['architecture']}, dtype {lm['dtype']})", [
            ("hidden size", f"{lm['hidden_size']} (intermediate {lm['intermediate_size']}, {lm['num_attention_heads']} "
                            f"heads, {lm['num_key_value_heads']} key/value heads, head dim {lm['head_dim']})"),
            ("layers", f"{lm['num_hidden_layers']} = {lm['num_shared_layers']} shared (trunk) + "
                       f"{lm['num_modality_layers']} per tail (text and audio tails: "
                       f"{lm['num_shared_layers'] + 2 * lm['num_modality_layers']} layers at run time)"),
            ("vocabularies", f"text {lm['vocab_size']:,}, audio {lm['audio_vocab_size']:,} "
                             f"(codes 0..{ids['eosp_token_id'] - 1})"),
            ("text ids", f"sosp {ids['sosp_token_id']}, modality pad {ids['modality_pad_token_id']}, pad "
                         f"{ids['pad_token_id']}, bos {ids['bos_token_id']}, eos {ids['eos_token_id']}"),
            ("audio ids", f"eosp {ids['eosp_token_id']}, audio pad {ids['audio_pad_token_id']}"),
            ("max positions", f"{lm['max_position_embeddings']:,}"),
            *_parameter_rows(lm["parameters"]), *_weights_rows(lm["weights"]),
            *([("generation", ", ".join(f"{k} {v}" for k, v in lm["generation"].items()))] if "generation" in lm
              else []),
        ])
    if (codec := report.get("codec")) is not None:
        section(f"MOSS-Speech codec ({codec['architecture']})", [
            ("codes", f"{codec['num_codes']:,} ({codec['codes_per_second']:g} per second, "
                      f"{codec['samples_per_code']} output samples each)"),
            ("audio", f"in {codec['input_sampling_rate']} Hz, out {codec['output_sampling_rate']} Hz"),
            *_parameter_rows(codec["parameters"]), *_weights_rows(codec["weights"]),
        ])
    if (processor := report.get("processor")) is not None:
        ids, extractor, ref = processor["special_ids"], processor["feature_extractor"], processor["codec"]
        names = {name: name.removesuffix("_token_id").replace("_", " ") for name in ids}
        section(f"Processor ({processor['processor_class']})", [
            ("tokenizer", f"{processor['tokenizer_class']}, {processor['tokenizer_size']:,} tokens"),
            ("text ids", ", ".join(f"{names[k]} {v['id']} ({v['token']})" for k, v in ids.items() if "token" in v)),
            ("audio ids", ", ".join(f"{names[k]} {v['id']}" for k, v in ids.items() if "token" not in v)
             + f", {processor['num_codes']:,} codes"),
            ("feature extractor", f"{extractor['class']} ({extractor['sampling_rate']} Hz, "
                                  f"{extractor['feature_size']} mel bins)"),
            ("codec", "none (speech needs --codec)" if ref is None else ref["path"] + (
                "" if ref["exists"] else " (not a local directory: a Hub repo id?)")),
            ("chat template", "yes" if processor["chat_template"] else "no"),
            *[(f"{modality} prompt", repr(prompt)) for modality, prompt in processor["default_system_prompts"].items()],
        ])
    return "\n".join(lines)


def read_config(directory: Path) -> dict | None:
    """config.json of `directory` as a dict, `None` if there is none; `ValueError` if it is not valid JSON."""
    return read_json_file(directory / "config.json", missing_ok=True)


def describe_checkpoint(directory: str | Path) -> dict[str, Any]:
    """A JSON-able report of what `directory` holds: LM, codec and/or processor, with per-branch counts."""
    directory = Path(directory)
    config = read_config(directory)
    report: dict[str, Any] = {"path": str(directory), "holds": []}
    model_type = None if config is None else config.get("model_type")
    if model_type == LM_MODEL_TYPE:
        report["holds"].append("model")
        report["model"] = _lm_info(directory)
    elif model_type == CODEC_MODEL_TYPE:
        report["holds"].append("codec")
        report["codec"] = _codec_info(directory)
    if (directory / PROCESSOR_FILE).is_file():
        report["holds"].append("processor")
        report["processor"] = _processor_info(directory)
    if not report["holds"]:
        found = f"a config.json of model_type {model_type!r}" if config is not None else "no config.json"
        raise ValueError(f"{str(directory)!r} holds no MOSS-Speech model, codec or processor ({found}, "
                         f"no {PROCESSOR_FILE})")
    return report


def format_report(report: dict[str, Any]) -> str:
    """Human-readable text of a `describe_checkpoint` report."""
    return _format_info(report)


__all__ = ["describe_checkpoint", "format_report"]
