"""Layer-wise speech/text similarity (paper Fig. 2): DTW, per-layer scores on a tiny model, the plot, the CLI."""

from __future__ import annotations

import itertools
import json
import struct
import sys

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import espeak, tiny_codec_config, tiny_config, tiny_tokenizer

from modeling_moss_speech import MossSpeechCodecModel, MossSpeechForCausalLM
from modeling_moss_speech.apps.analysis import (
    LayerSimilarityResult,
    analyze_layers_main,
    dtw,
    dtw_similarity,
    layer_hidden_states,
    layer_similarity,
    plot_layer_similarity,
    speech_only_grid,
    split_grid,
    suggest_num_shared_layers,
    text_only_grid,
)
from modeling_moss_speech.processing_moss_speech import MossSpeechProcessor

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model() -> MossSpeechForCausalLM:
    torch.manual_seed(0)
    return MossSpeechForCausalLM(tiny_config(num_hidden_layers=4, num_shared_layers=3)).eval()


@pytest.fixture(scope="module")
def pairs() -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 64, (n,), generator=g).tolist(), torch.randint(5, 250, (m,), generator=g).tolist())
            for n, m in ((17, 5), (9, 4))]


def brute_force_dtw(cost: np.ndarray) -> float:
    """Minimum summed cost over every monotone (1,0)/(0,1)/(1,1) path, by enumeration."""
    n, m = cost.shape
    best = np.inf
    # a path is a sequence of moves; enumerate sequences of "down"/"right"/"diag" with the right totals
    for diagonal in range(min(n, m)):
        down, right = n - 1 - diagonal, m - 1 - diagonal
        for moves in set(itertools.permutations("d" * down + "r" * right + "g" * diagonal)):
            i = j = 0
            total = cost[0, 0]
            for move in moves:
                i, j = i + (move in "dg"), j + (move in "rg")
                total += cost[i, j]
            best = min(best, total)
    return best


def test_dtw_finds_the_known_path_of_a_hand_made_matrix():
    # Speech frames (rows) x text tokens (columns): frames 0-1 say token 0, frame 2 token 1, frames 3-5 token 2.
    similarity = np.full((6, 3), -0.5)
    for frame, token in [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 2)]:
        similarity[frame, token] = 0.9
    similarity[2, 0] = 0.2  # a tempting but worse detour
    score, path = dtw_similarity(similarity)
    assert path.tolist() == [[0, 0], [1, 0], [2, 1], [3, 2], [4, 2], [5, 2]]
    assert score == pytest.approx(0.9)
    total, same = dtw(1.0 - similarity)
    assert total == pytest.approx(6 * 0.1) and same.tolist() == path.tolist()


def test_dtw_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (1, 4), (4, 1), (3, 4), (5, 3), (4, 4)):
        cost = rng.random(shape)
        total, path = dtw(cost)
        assert total == pytest.approx(brute_force_dtw(cost))
        assert total == pytest.approx(cost[path[:, 0], path[:, 1]].sum())
        assert path[0].tolist() == [0, 0] and path[-1].tolist() == [shape[0] - 1, shape[1] - 1]
        steps = np.diff(path, axis=0)
        assert all(tuple(s) in {(1, 0), (0, 1), (1, 1)} for s in steps)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        dtw(np.zeros((0, 3)))


def test_suggest_num_shared_layers_rule():
    # peak at layer 2 (0.9); layer 3 keeps 0.85 >= 0.9 * 0.9; layer 4 drops -> 4 shared layers
    assert suggest_num_shared_layers([0.1, 0.5, 0.9, 0.85, 0.3, 0.2]) == 4
    assert suggest_num_shared_layers([0.1, 0.5, 0.9, 0.85, 0.3, 0.2], fraction=0.99) == 3
    assert suggest_num_shared_layers([0.1, 0.2, 0.3]) == 2  # at least one tail layer remains
    assert suggest_num_shared_layers([0.9, 0.1, 0.1, 0.1]) == 1
    assert suggest_num_shared_layers([-0.3, -0.1, -0.2]) == 2  # non-positive peak: up to the peak
    with pytest.raises(ValueError, match="fraction"):
        suggest_num_shared_layers([0.1, 0.2], fraction=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        suggest_num_shared_layers([0.5])


def test_one_score_per_layer_on_a_tiny_model(model, pairs):
    result = layer_similarity(model, pairs)
    assert isinstance(result, LayerSimilarityResult)
    assert result.layer_names == ["shared.0", "shared.1", "shared.2", "text/audio.0"]
    assert result.num_layers == 4 and result.num_shared_layers == 3 and result.pair_scores.shape == (2, 4)
    assert np.allclose(result.scores, result.pair_scores.mean(axis=0))
    assert all(-1.0 <= s <= 1.0 for s in result.scores)
    for (codes, text), matrices, alignments in zip(pairs, result.matrices, result.alignments):
        assert [m.shape for m in matrices] == [(len(codes), len(text))] * 4
        assert all(a[-1].tolist() == [len(codes) - 1, len(text) - 1] for a in alignments)
    assert 1 <= result.suggest_num_shared_layers() <= 3
    assert json.loads(json.dumps(result.to_dict()))["scores"] == pytest.approx(result.scores)

    # The trunk is the same computation on both paths; only the tail depths differ.
    same = layer_similarity(model, pairs, path="same")
    assert same.layer_names[-1] == "text.0"
    assert np.allclose(same.pair_scores[:, :3], result.pair_scores[:, :3])
    assert not np.allclose(same.pair_scores[:, 3], result.pair_scores[:, 3])
    centred = layer_similarity(model, pairs[:1], center=True)
    assert centred.center and centred.pair_scores.shape == (1, 4)


def test_hidden_states_are_the_layers_the_model_runs(model, pairs):
    codes, text = pairs[0]
    speech = speech_only_grid(codes, model.config)
    assert speech[0, 0].tolist() == [290, 10] and speech[0, -1].tolist() == [291, 64]
    assert speech.shape[1] == len(codes) + 2 and speech[0, 1:-1, 1].tolist() == codes
    assert text_only_grid(text, model.config)[0, :, 1].eq(10).all()
    for tail, grid in (("audio", speech), ("text", text_only_grid(text, model.config))):
        states = layer_hidden_states(model, grid, tail)
        assert len(states) == 4
        with torch.no_grad():
            out = model.model(grid, modalities=(tail,), use_cache=False)
        norm = model.model.audio_norm if tail == "audio" else model.model.text_norm
        assert torch.allclose(norm(states[-1]), getattr(out, f"{tail}_last_hidden_state")[0], atol=1e-6)
        assert torch.allclose(states[2], out.shared_last_hidden_state[0], atol=1e-6)


def test_bad_pairs_raise_clear_errors(model, pairs):
    with pytest.raises(ValueError, match=r"pairs\[0\] codes holds id 64, outside \[0, 64\)"):
        layer_similarity(model, [([1, 64], [5])])
    with pytest.raises(ValueError, match=r"pairs\[1\] text ids is empty"):
        layer_similarity(model, [pairs[0], ([1, 2], [])])
    with pytest.raises(ValueError, match="path must be one of"):
        layer_similarity(model, pairs, path="audio")
    with pytest.raises(TypeError, match="MossSpeechForCausalLM or MossSpeechModel"):
        layer_similarity(torch.nn.Linear(2, 2), pairs)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png(model, pairs, tmp_path):
    result = layer_similarity(model, pairs)
    path = plot_layer_similarity(result, tmp_path / "plots" / "layers.png", layers=[0, 1, 2, 3])
    data = path.read_bytes()
    assert png_size(data) == (4 * 320, 640) and len(data) > 10_000  # 3.2 x 6.4 inches per heatmap column, 100 dpi
    default = plot_layer_similarity(result, tmp_path / "default.png")  # first, peak, last trunk, last layer
    assert png_size(default.read_bytes())[1] == 640
    with pytest.raises(ValueError, match="layers must be 1 to 6 depths"):
        plot_layer_similarity(result, tmp_path / "bad.png", layers=[7])


def test_plot_without_matplotlib_says_how_to_install(model, pairs, tmp_path, monkeypatch):
    result = layer_similarity(model, pairs[:1])
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"moss-speech\[analysis\]"):
        plot_layer_similarity(result, tmp_path / "x.png")


def test_split_grid_recovers_codes_and_text(model):
    rows = [[5, 10], [6, 10], [290, 10], [291, 3], [291, 17], [291, 64], [280, 10]]
    assert split_grid(rows, model.config, text_pad_token_id=280) == ([3, 17], [5, 6])


def test_analyze_layers_cli_with_a_wav_and_with_a_prepared_dataset(model, tmp_path, capsys):
    torch.manual_seed(0)
    codec = MossSpeechCodecModel(tiny_codec_config()).eval()
    model.save_pretrained(tmp_path / "model")
    MossSpeechProcessor.from_model_config(model.config, tiny_tokenizer(), codec=codec).save_pretrained(
        tmp_path / "processor")
    wav, rate = espeak("what is the weather today")
    sf.write(tmp_path / "q.wav", wav.numpy(), rate)
    argv = ["--model", str(tmp_path / "model"), "--processor", str(tmp_path / "processor"), "--audio",
            str(tmp_path / "q.wav"), "--transcript", "what is the weather today", "--output-png",
            str(tmp_path / "out.png"), "--output-json", str(tmp_path / "out.json"), "--device", "cpu"]
    assert analyze_layers_main(argv) == 0
    summary = json.loads((tmp_path / "out.json").read_text())
    assert len(summary["scores"]) == 4 and summary["num_pairs"] == 1
    assert 1 <= summary["suggested_num_shared_layers"] <= 3
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layer_names"][0] == "shared.0"
    assert (tmp_path / "out.png").read_bytes()[:8] == PNG_MAGIC

    # An 'interleaved' prepare_dataset.py output holds both segments of each pair: no codec needed.
    grids = [[[5, 10], [6, 10], [290, 10], [291, 3], [291, 17], [291, 64]],
             [[290, 10], [291, 8], [291, 64], [7, 10], [8, 10], [9, 10]]]
    datasets.Dataset.from_dict({"input_ids": grids}).save_to_disk(str(tmp_path / "prepared"))
    argv = ["--model", str(tmp_path / "model"), "--processor", str(tmp_path / "processor"), "--dataset",
            str(tmp_path / "prepared"), "--path", "same", "--output-json", str(tmp_path / "ds.json")]
    assert analyze_layers_main(argv) == 0
    summary = json.loads((tmp_path / "ds.json").read_text())
    assert summary["num_pairs"] == 2 and summary["path"] == "same" and len(summary["pair_scores"]) == 2
    # the same through the console script's entry point
    from modeling_moss_speech.apps.cli.main import main

    (tmp_path / "ds.json").unlink()
    assert main(["analyze-layers", *argv]) == 0
    assert json.loads((tmp_path / "ds.json").read_text())["num_pairs"] == 2
    with pytest.raises(ValueError, match="one transcript per audio file"):
        analyze_layers_main(argv[:4] + ["--audio", str(tmp_path / "q.wav")])
