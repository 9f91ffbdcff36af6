"""Layer-wise speech/text similarity (MOSS-Speech paper, Fig. 2): where do speech and text representations meet?

For paired speech (codec codes) and transcript (text ids), the model runs twice: on a speech-only grid (one speech
segment: sosp row, code rows, eosp row) and on a text-only grid (the transcript's text rows). At every depth the
hidden states of the speech frames (the code rows) and of the text tokens give a cosine-similarity matrix
(frames x tokens); dynamic time warping (DTW, cost = 1 - cosine) aligns the two sequences and the mean cosine along
the alignment path is that depth's score. High scores mean the layer represents speech and its transcript alike.

Depth: the model's layers in execution order, trunk layers first, then tail layers; `d = 0 .. S + M - 1` for `S`
trunk (`num_shared_layers`) and `M` tail layers (`num_modality_layers`). The hidden state of a layer is its output
(the residual stream, before the tail's final norm). Which tail each sequence goes through is `path`:

- `"modality"` (default): the text sequence through the text tail, the speech sequence through the audio tail, as
  the model runs on each modality;
- `"same"`: both through the text tail, i.e. the single path of the text LLM the model was split from (with a model
  built by `from_text_model`, trunk + text tail is exactly the original layer stack).

Picking `num_shared_layers` for a new base model: build a MOSS-Speech model from it, let the speech side learn
(e.g. a short interleaved pre-training), run this analysis with `path="same"` on paired data and use
[`suggest_num_shared_layers`]: similarity typically rises through the early layers and falls again near the output,
where the layers turn modality-specific; those layers become the tails.

[`plot_layer_similarity`] needs matplotlib (the `[analysis]` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import pretrained
from ..configuration_moss_speech import MossSpeechConfig
from ..feature_extraction_moss_speech import load_audio
from ..grid_moss_speech import GridLayout
from ..modeling_moss_speech import MossSpeechForCausalLM, MossSpeechModel

PATHS = ("modality", "same")


# --------------------------------------------------------------------------------------------------- DTW


def dtw(cost: np.ndarray) -> tuple[float, np.ndarray]:
    """Dynamic time warping over a cost matrix: (total cost, path).

    The path runs from `(0, 0)` to `(n - 1, m - 1)` with steps `(1, 0)`, `(0, 1)` or `(1, 1)` and minimises the summed
    cost of the cells it visits; ties prefer the diagonal step. Returns the path as an int array of shape (K, 2) of
    `(row, column)` pairs in order. Computed anti-diagonal by anti-diagonal (vectorised), O(n x m) time and memory.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ValueError(f"cost must be a non-empty 2-D matrix, got shape {cost.shape}.")
    if not np.isfinite(cost).all():
        raise ValueError("cost holds NaN or infinite values.")
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for k in range(2, n + m + 1):  # k = i + j with 1-based cell indices
        i = np.arange(max(1, k - m), min(n, k - 1) + 1)
        j = k - i
        acc[i, j] = cost[i - 1, j - 1] + np.minimum(np.minimum(acc[i - 1, j - 1], acc[i - 1, j]), acc[i, j - 1])
    path = [(n - 1, m - 1)]
    i, j = n, m
    while (i, j) != (1, 1):
        steps = ((i - 1, j - 1), (i - 1, j), (i, j - 1))  # diagonal first: np.argmin keeps the first minimum
        i, j = steps[int(np.argmin([acc[s] for s in steps]))]
        path.append((i - 1, j - 1))
    return float(acc[n, m]), np.asarray(path[::-1], dtype=np.int64)


def dtw_similarity(similarity: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean similarity along the DTW path of `1 - similarity`: (score, path of shape (K, 2))."""
    similarity = np.asarray(similarity, dtype=np.float64)
    _, path = dtw(1.0 - similarity)
    return float(similarity[path[:, 0], path[:, 1]].mean()), path


def cosine_similarity_matrix(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Cosine similarity of every row of `a` (n, H) with every row of `b` (m, H): a float32 (n, m) matrix."""
    a = torch.as_tensor(a).float()
    b = torch.as_tensor(b).float()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be (n, H) and (m, H), got {tuple(a.shape)} and {tuple(b.shape)}.")
    a = torch.nn.functional.normalize(a, dim=-1, eps=1e-12)
    b = torch.nn.functional.normalize(b, dim=-1, eps=1e-12)
    return (a @ b.T).cpu().numpy()


# --------------------------------------------------------------------------------------------------- the model


def _base_model(model: MossSpeechForCausalLM | MossSpeechModel) -> MossSpeechModel:
    if isinstance(model, MossSpeechForCausalLM):
        return model.model
    if isinstance(model, MossSpeechModel):
        return model
    raise TypeError(f"model must be a MossSpeechForCausalLM or MossSpeechModel, got {type(model).__name__}.")


def speech_only_grid(codes: Sequence[int] | torch.Tensor, config: MossSpeechConfig) -> torch.LongTensor:
    """(1, n + 2, 2) grid of one speech segment: sosp row, the `n` code rows, eosp row (rows 1..n are the frames)."""
    rows = GridLayout.from_config(config).speech_rows(torch.as_tensor(codes))
    return torch.tensor([rows], dtype=torch.long)


def text_only_grid(text_ids: Sequence[int] | torch.Tensor, config: MossSpeechConfig) -> torch.LongTensor:
    """(1, m, 2) grid of text rows `(token, audio_pad)`."""
    rows = GridLayout.from_config(config).text_rows(torch.as_tensor(text_ids))
    return torch.tensor([rows], dtype=torch.long).reshape(1, -1, 2)


def layer_names(config: MossSpeechConfig, path: str = "modality") -> list[str]:
    """Names of the analysed depths: `shared.0 ..`, then `tail.0 ..` (`text` tail, or `text/audio` per modality)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
    tail = "text/audio" if path == "modality" else "text"
    return ([f"shared.{i}" for i in range(config.num_shared_layers)]
            + [f"{tail}.{i}" for i in range(config.num_modality_layers)])


@torch.no_grad()
def layer_hidden_states(
    model: MossSpeechForCausalLM | MossSpeechModel, input_ids: torch.LongTensor, tail: str
) -> list[torch.Tensor]:
    """Outputs of every trunk layer, then every `tail` ("text" or "audio") layer, for a (1, L, 2) grid: (L, H) each.

    Read from the model's own `output_hidden_states` (transformers' output recording), running only `tail`: the
    recorded states are the embedded grid followed by one output per layer that ran, trunk first.
    """
    base = _base_model(model)
    if tail not in ("text", "audio"):
        raise ValueError(f"tail must be 'text' or 'audio', got {tail!r}.")
    device = next(base.parameters()).device
    out = base(input_ids=input_ids.to(device), modalities=(tail,), use_cache=False, output_hidden_states=True)
    states = out.hidden_states[1:]  # drop the embeddings
    expected = base.config.num_shared_layers + base.config.num_modality_layers
    if len(states) != expected:
        raise RuntimeError(f"expected {expected} recorded layer outputs, got {len(states)}.")
    return [state[0].detach().float().cpu() for state in states]


# --------------------------------------------------------------------------------------------------- analysis


@dataclass
class LayerSimilarityResult:
    """Result of [`layer_similarity`].

    Args:
        layer_names: One name per depth (trunk layers, then tail layers).
        scores: Per depth, the DTW-path mean cosine similarity averaged over the pairs.
        pair_scores: (pairs, depths) scores of each pair.
        matrices: `matrices[p][d]`: (speech frames, text tokens) cosine similarities of pair `p` at depth `d`.
        alignments: `alignments[p][d]`: the DTW path, (K, 2) `(frame, token)` indices.
        num_shared_layers: Trunk depth of the analysed model (depths `>= num_shared_layers` are tail layers).
        path: "modality" or "same" (which tail each sequence went through).
        center: Whether hidden states were mean-centred before the cosine.
    """

    layer_names: list[str]
    scores: list[float]
    pair_scores: np.ndarray
    matrices: list[list[np.ndarray]]
    alignments: list[list[np.ndarray]]
    num_shared_layers: int
    path: str
    center: bool

    @property
    def num_layers(self) -> int:
        """Number of analysed depths."""
        return len(self.scores)

    def suggest_num_shared_layers(self, fraction: float = 0.9, min_tail_layers: int = 1) -> int:
        """[`suggest_num_shared_layers`] on this result's scores."""
        return suggest_num_shared_layers(self.scores, fraction=fraction, min_tail_layers=min_tail_layers)

    def to_dict(self) -> dict:
        """JSON-ready summary (no matrices): names, scores, per-pair scores, split of the model, suggestion."""
        return {"layer_names": list(self.layer_names), "scores": [float(s) for s in self.scores],
                "pair_scores": np.asarray(self.pair_scores).tolist(), "num_shared_layers": self.num_shared_layers,
                "path": self.path, "center": self.center,
                "suggested_num_shared_layers": self.suggest_num_shared_layers()}


def _check_ids(values: Any, low: int, high: int, what: str) -> list[int]:
    tensor = torch.as_tensor(values)
    if tensor.numel() == 0:
        raise ValueError(f"{what} is empty.")
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer ids, got dtype {tensor.dtype}.")
    ids = tensor.reshape(-1).tolist()
    bad = [i for i in ids if not low <= i < high]
    if bad:
        raise ValueError(f"{what} holds id {bad[0]}, outside [{low}, {high}).")
    return ids


def layer_similarity(
    model: MossSpeechForCausalLM | MossSpeechModel,
    pairs: Sequence[tuple[Sequence[int] | torch.Tensor, Sequence[int] | torch.Tensor]],
    path: str = "modality",
    center: bool = False,
) -> LayerSimilarityResult:
    """Layer-wise speech/text similarity of paired (speech codes, transcript text ids).

    Args:
        model: A MOSS-Speech model (its special ids build the grids).
        pairs: `(codes, text_ids)` per utterance: 1-D speech codes (`0 <= c < eosp_token_id`) and the transcript's
            text ids (e.g. `tokenizer(text, add_special_tokens=False)["input_ids"]`).
        path: "modality" (text tail for the text input, audio tail for the speech input) or "same" (text tail for
            both); see the module docstring.
        center: Subtract, per depth and pair, the mean hidden state of all compared positions (speech frames and
            text tokens together) before the cosine. Large LLMs carry a few huge residual dimensions shared by every
            position that push all cosines towards 1; centring removes that common offset.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
    base = _base_model(model)
    config = base.config
    if not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError("pairs must be a non-empty list of (codes, text_ids).")
    was_training = base.training
    base.eval()
    names = layer_names(config, path)
    all_scores, matrices, alignments = [], [], []
    try:
        for index, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"pairs[{index}] must be a (codes, text_ids) pair, got {type(pair).__name__}.")
            codes = _check_ids(pair[0], 0, config.num_audio_codes, f"pairs[{index}] codes")
            text_ids = _check_ids(pair[1], 0, config.vocab_size, f"pairs[{index}] text ids")
            speech_states = layer_hidden_states(base, speech_only_grid(codes, config),
                                                "audio" if path == "modality" else "text")
            text_states = layer_hidden_states(base, text_only_grid(text_ids, config), "text")
            pair_scores, pair_matrices, pair_paths = [], [], []
            for speech, text in zip(speech_states, text_states):
                frames = speech[1 : 1 + len(codes)]
                if center:
                    mean = torch.cat([frames, text]).mean(dim=0, keepdim=True)
                    frames, text = frames - mean, text - mean
                matrix = cosine_similarity_matrix(frames, text)
                score, alignment = dtw_similarity(matrix)
                pair_scores.append(score)
                pair_matrices.append(matrix)
                pair_paths.append(alignment)
            all_scores.append(pair_scores)
            matrices.append(pair_matrices)
            alignments.append(pair_paths)
    finally:
        base.train(was_training)
    pair_scores = np.asarray(all_scores, dtype=np.float64)
    return LayerSimilarityResult(
        layer_names=names, scores=pair_scores.mean(axis=0).tolist(), pair_scores=pair_scores, matrices=matrices,
        alignments=alignments, num_shared_layers=config.num_shared_layers, path=path, center=center,
    )


def suggest_num_shared_layers(scores: Sequence[float], fraction: float = 0.9, min_tail_layers: int = 1) -> int:
    """A trunk depth from per-layer similarity scores: the layers up to where similarity leaves its peak.

    Rule: find the peak layer `p`; walk forward while the score stays at or above `fraction x peak`; the last
    such layer `l` is the last shared one, so the suggestion is `l + 1` layers, capped so that at least
    `min_tail_layers` layers remain for the tails (and at least 1). A non-positive peak gives `p + 1`.
    """
    values = [float(s) for s in scores]
    if len(values) < 2:
        raise ValueError(f"scores needs at least 2 layers, got {len(values)}.")
    if not all(np.isfinite(values)):
        raise ValueError(f"scores must be finite, got {values}.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
    if isinstance(min_tail_layers, bool) or not isinstance(min_tail_layers, int) or min_tail_layers < 1:
        raise ValueError(f"min_tail_layers must be an integer >= 1, got {min_tail_layers!r}.")
    peak = int(np.argmax(values))
    last = peak
    if values[peak] > 0:
        threshold = fraction * values[peak]
        while last + 1 < len(values) and values[last + 1] >= threshold:
            last += 1
    return max(1, min(last + 1, len(values) - min_tail_layers))


# --------------------------------------------------------------------------------------------------- plot


def plot_layer_similarity(
    result: LayerSimilarityResult,
    path: str | os.PathLike,
    pair: int = 0,
    layers: Sequence[int] | None = None,
    fraction: float = 0.9,
) -> Path:
    """Write a PNG: the per-layer score curve (top) and similarity heatmaps with their DTW paths (bottom).

    Args:
        result: What [`layer_similarity`] returned.
        path: The PNG file to write.
        pair: Which pair's heatmaps to show.
        layers: Depths to show as heatmaps (at most 6); default: the first layer, the peak, the last trunk layer
            and the last layer.
        fraction: Passed to [`suggest_num_shared_layers`] for the marked suggestion.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plot_layer_similarity needs matplotlib: pip install 'moss-speech[analysis]' "
                          "(or pip install matplotlib).") from error
    if not isinstance(result, LayerSimilarityResult):
        raise TypeError(f"result must be a LayerSimilarityResult, got {type(result).__name__}.")
    if not 0 <= pair < len(result.matrices):
        raise ValueError(f"pair must be in [0, {len(result.matrices)}), got {pair}.")
    depth = result.num_layers
    if layers is None:
        peak = int(np.argmax(result.scores))
        layers = sorted({0, peak, max(result.num_shared_layers - 1, 0), depth - 1})
    layers = [int(layer) for layer in layers]
    if not layers or len(layers) > 6 or any(not 0 <= layer < depth for layer in layers):
        raise ValueError(f"layers must be 1 to 6 depths in [0, {depth}), got {layers}.")

    figure = Figure(figsize=(3.2 * max(len(layers), 2), 6.4), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, len(layers), height_ratios=[1.0, 1.2])
    curve = figure.add_subplot(grid[0, :])
    x = np.arange(depth)
    curve.plot(x, result.scores, marker="o", label="mean over pairs")
    if len(result.matrices) > 1:
        curve.plot(x, result.pair_scores[pair], linestyle=":", alpha=0.6, label=f"pair {pair}")
    curve.axvline(result.num_shared_layers - 0.5, color="gray", linestyle="--", label="trunk | tail (model)")
    suggestion = suggest_num_shared_layers(result.scores, fraction=fraction) if depth > 1 else depth
    curve.axvline(suggestion - 0.5, color="tab:red", linestyle=":", label=f"suggested split ({suggestion})")
    curve.set_xticks(x)
    curve.set_xticklabels(result.layer_names, rotation=45, ha="right", fontsize=7)
    curve.set_ylabel("DTW mean cosine")
    curve.set_title(f"speech/text similarity per layer (path={result.path}"
                    + (", centred" if result.center else "") + ")")
    curve.legend(fontsize=7, loc="best")
    for column, layer in enumerate(layers):
        axis = figure.add_subplot(grid[1, column])
        matrix = result.matrices[pair][layer]
        image = axis.imshow(matrix.T, aspect="auto", origin="lower", cmap="viridis", vmin=-1.0, vmax=1.0)
        alignment = result.alignments[pair][layer]
        axis.plot(alignment[:, 0], alignment[:, 1], color="white", linewidth=1.0)
        axis.set_title(f"{result.layer_names[layer]}: {result.pair_scores[pair][layer]:.3f}", fontsize=8)
        axis.set_xlabel("speech frame", fontsize=7)
        if column == 0:
            axis.set_ylabel("text token", fontsize=7)
        axis.tick_params(labelsize=6)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path), format="png")
    return path


# --------------------------------------------------------------------------------------------------- CLI


def add_analyze_layers_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `analyze-layers` flags to `parser` (for a `moss-speech` subcommand or a standalone parser)."""
    parser.add_argument("--model", default=None, help="MossSpeechForCausalLM directory or repo id (default: the "
                                                      "shipped MOSS-Speech-Nano checkpoint).")
    parser.add_argument("--processor", default=None, help="MossSpeechProcessor directory (tokenizer, special ids) "
                                                          "(default: the --model directory).")
    parser.add_argument("--codec", default=None, help="codec directory for audio inputs (default: the processor's).")
    parser.add_argument("--audio", nargs="+", default=None, help="audio files (any rate, read with soundfile).")
    parser.add_argument("--transcript", nargs="+", default=None, help="one transcript per --audio file.")
    parser.add_argument("--dataset", default=None,
                        help="save_to_disk directory: a prepare_dataset.py 'interleaved' output (input_ids holds "
                             "both segments) or a dataset with audio and text columns.")
    parser.add_argument("--audio-column", default="audio")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--num-samples", type=int, default=8, help="dataset rows to analyse (default 8).")
    parser.add_argument("--path", choices=PATHS, default="modality",
                        help="modality: audio tail for speech, text tail for text; same: text tail for both.")
    parser.add_argument("--center", action="store_true", help="mean-centre hidden states before the cosine.")
    parser.add_argument("--fraction", type=float, default=0.9, help="threshold of suggest_num_shared_layers.")
    parser.add_argument("--output-png", default=None, help="write the plot here (needs matplotlib).")
    parser.add_argument("--output-json", default=None, help="write the scores here.")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu.")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return parser


def split_grid(rows: Sequence[Sequence[int]], config: MossSpeechConfig, text_pad_token_id: int | None = None
               ) -> tuple[list[int], list[int]]:
    """(speech codes, text ids) of a grid: the codes of all its speech segments and the ids of all its text segments
    (`GridLayout.split_rows`: start-of-speech and `text_pad_token_id` rows excluded; a speech row whose audio id is
    neither a code nor end-of-speech raises `ValueError`)."""
    layout = dataclasses.replace(GridLayout.from_config(config), text_pad_token_id=text_pad_token_id)
    segments = layout.split_rows(rows, where="grid")
    codes = [int(c) for segment in segments if segment.modality == "audio" for c in segment.ids]
    text_ids = [int(t) for segment in segments if segment.modality == "text" for t in segment.ids]
    return codes, text_ids


def _pairs_from_arguments(args: argparse.Namespace, config: MossSpeechConfig, processor: Any, codec_loader: Any
                          ) -> list[tuple[list[int], list[int]]]:
    def tokenize(text: Any, where: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: expected a non-empty transcript, got {text!r}.")
        return list(processor.tokenizer(text.strip(), add_special_tokens=False)["input_ids"])

    audio, transcripts = [], []
    if args.audio is not None or args.transcript is not None:
        if args.dataset is not None:
            raise ValueError("give either --audio/--transcript or --dataset, not both.")
        if not args.audio or not args.transcript or len(args.audio) != len(args.transcript):
            raise ValueError(f"--audio and --transcript need one transcript per audio file, got "
                             f"{len(args.audio or [])} files and {len(args.transcript or [])} transcripts.")
        audio = [load_audio(path, where=f"--audio {path!r}") for path in args.audio]
        transcripts = [tokenize(t, f"--transcript {i}") for i, t in enumerate(args.transcript)]
    elif args.dataset is not None:
        import datasets

        data = datasets.load_from_disk(args.dataset)
        if isinstance(data, datasets.DatasetDict):
            data = data[next(iter(data))]
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}.")
        data = data.select(range(min(args.num_samples, len(data))))
        if "input_ids" in data.column_names:
            pairs = []
            for row in data["input_ids"]:
                codes, text_ids = split_grid(row, config, processor.text_pad_token_id)
                if codes and text_ids:
                    pairs.append((codes, text_ids))
            if not pairs:
                raise ValueError(f"--dataset {args.dataset!r}: no row holds both a speech and a text segment (use an "
                                 "'interleaved' prepare_dataset.py output).")
            return pairs
        for name in (args.audio_column, args.text_column):
            if name not in data.column_names:
                raise ValueError(f"--dataset {args.dataset!r} has no column {name!r} (columns: {data.column_names}).")
        if isinstance(data.features[args.audio_column], datasets.Audio):
            data = data.cast_column(args.audio_column, datasets.Audio(decode=False))
        for index, row in enumerate(data):
            audio.append(load_audio(row[args.audio_column], where=f"--dataset row {index}"))
            transcripts.append(tokenize(row[args.text_column], f"--dataset row {index}"))
    else:
        raise ValueError("give paired data: --audio FILE... --transcript TEXT..., or --dataset DIR.")
    codec = codec_loader()
    codes = []
    for array, rate in audio:
        codes.append(codec.encode(array, sampling_rate=rate).codes[0].tolist())
    return list(zip(codes, transcripts))


def run_analyze_layers(args: argparse.Namespace) -> LayerSimilarityResult:
    """Run the analysis for parsed `analyze-layers` arguments; prints a JSON summary and writes the outputs."""
    from ..modeling_moss_speech_codec import MossSpeechCodecModel
    from ..processing_moss_speech import MossSpeechProcessor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_path = args.model if args.model is not None else str(pretrained.nano_path())
    processor_path = args.processor if args.processor is not None else model_path
    model = MossSpeechForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype)).to(device).eval()
    processor = MossSpeechProcessor.from_pretrained(processor_path)

    def codec_loader() -> MossSpeechCodecModel:
        codec = MossSpeechCodecModel.from_pretrained(args.codec) if args.codec else processor.codec
        if codec is None:
            raise ValueError("audio inputs need a codec: pass --codec, or a processor that has one.")
        return codec.to(device).eval()

    pairs = _pairs_from_arguments(args, model.config, processor, codec_loader)
    result = layer_similarity(model, pairs, path=args.path, center=args.center)
    summary = result.to_dict()
    summary["suggested_num_shared_layers"] = result.suggest_num_shared_layers(fraction=args.fraction)
    summary["num_pairs"] = len(pairs)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(summary, indent=2))
    if args.output_png:
        plot_layer_similarity(result, args.output_png, fraction=args.fraction)
    print(json.dumps({k: summary[k] for k in ("layer_names", "scores", "suggested_num_shared_layers", "num_pairs")}))
    return result


def analyze_layers_main(argv: Sequence[str] | None = None) -> int:
    """`moss-speech analyze-layers` as a function: parse `argv`, run, return 0."""
    parser = argparse.ArgumentParser(prog="moss-speech analyze-layers",
                                     description="Layer-wise speech/text similarity (MOSS-Speech paper, Fig. 2).")
    add_analyze_layers_arguments(parser)
    run_analyze_layers(parser.parse_args(argv))
    return 0


__all__ = [
    "LayerSimilarityResult",
    "PATHS",
    "add_analyze_layers_arguments",
    "analyze_layers_main",
    "cosine_similarity_matrix",
    "dtw",
    "dtw_similarity",
    "layer_hidden_states",
    "layer_names",
    "layer_similarity",
    "plot_layer_similarity",
    "run_analyze_layers",
    "speech_only_grid",
    "split_grid",
    "suggest_num_shared_layers",
    "text_only_grid",
]
