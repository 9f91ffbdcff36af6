"""The codec's optional CTC recogniser (nano checkpoints) and the speech-tokenizer training script."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
import torchaudio
from helpers import CTC_ALPHABET, ctc_config, espeak, tiny_codec_config

from modeling_moss_speech import MossSpeechCodecModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
import train_speech_tokenizer  # noqa: E402


def test_ctc_alphabet_validation():
    with pytest.raises(ValueError, match="repeated"):
        ctc_config(ctc_alphabet="abca")
    with pytest.raises(ValueError, match="ctc_alphabet"):
        ctc_config(ctc_alphabet="")
    with pytest.raises(ValueError, match="ctc_upsample"):
        ctc_config(ctc_upsample=0)


def test_release_codec_has_no_ctc_head_and_refuses_to_transcribe():
    codec = MossSpeechCodecModel(tiny_codec_config())
    assert not codec.can_transcribe
    assert not any(k.startswith("encoder.ctc_head") for k in codec.state_dict())
    with pytest.raises(ValueError, match="no CTC recogniser"):
        codec.transcribe(torch.zeros(16000), sampling_rate=16000)


def test_ctc_head_saves_loads_and_batches_like_single_rows(tmp_path):
    torch.manual_seed(0)
    codec = MossSpeechCodecModel(ctc_config()).eval()
    assert any(k.startswith("encoder.ctc_head.") for k in codec.state_dict())
    codec.save_pretrained(tmp_path)
    loaded = MossSpeechCodecModel.from_pretrained(tmp_path).eval()
    codes = [torch.randint(0, 64, (n,)) for n in (3, 9, 5)]
    together = loaded.transcribe_codes(codes)
    assert together == codec.transcribe_codes(codes)
    # Padding a row next to longer ones must not change its transcript (key-padding mask).
    assert together == [loaded.transcribe_codes([c])[0] for c in codes]
    with pytest.raises(ValueError, match="outside the codebook"):
        loaded.transcribe_codes([torch.tensor([64])])


def test_greedy_decoding_merges_repeats_and_drops_blanks():
    codec = MossSpeechCodecModel(ctc_config())
    head = codec.encoder.ctc_head
    a, b, space = CTC_ALPHABET.index("a") + 1, CTC_ALPHABET.index("b") + 1, CTC_ALPHABET.index(" ") + 1
    frames = [0, a, a, 0, a, space, space, b, b, 0, 0, space]
    log_probs = torch.full((1, len(frames), len(CTC_ALPHABET) + 1), -10.0)
    log_probs[0, torch.arange(len(frames)), torch.tensor(frames)] = 0.0
    assert head.greedy_decode(log_probs, torch.tensor([len(frames)])) == ["aa b"]
    assert head.greedy_decode(log_probs, torch.tensor([3])) == ["a"]


def _tiny_corpus(path: Path) -> None:
    from datasets import Audio, Dataset, DatasetDict

    rows = []
    for i, text in enumerate(["red", "blue", "green", "red blue", "green red", "blue green"] * 2):
        wav, rate = espeak(text, voice=("en-us", "en+m3")[i % 2])
        wav = torchaudio.functional.resample(wav, rate, 16000)
        buffer = io.BytesIO()
        sf.write(buffer, wav.numpy(), 16000, format="FLAC")
        rows.append({"text": text, "audio": {"bytes": buffer.getvalue(), "path": None}})
    data = Dataset.from_list(rows).cast_column("audio", Audio(sampling_rate=16000))
    DatasetDict(train=data.select(range(10)), validation=data.select(range(10, 12))).save_to_disk(str(path))


def test_train_speech_tokenizer_learns_and_saves_a_transcribing_codec(tmp_path):
    _tiny_corpus(tmp_path / "corpus")
    config = ctc_config().to_dict()
    (tmp_path / "codec.json").write_text(json.dumps({k: config[k] for k in
                                                     ("encoder_config", "flow_config", "vocoder_config",
                                                      "speaker_config")}))
    summary = train_speech_tokenizer.main([
        "--corpus", str(tmp_path / "corpus"), "--codec_config", str(tmp_path / "codec.json"),
        "--output", str(tmp_path / "out"), "--max_steps", "600", "--batch_size", "5", "--eval_every", "1000",
        "--learning_rate", "5e-3", "--report_splits", "validation",
    ])
    assert summary["steps"] == 600
    # The held-out report reads the same split through the same inference path as the final validation score.
    assert summary["held_out_splits"]["validation"]["cer"] == pytest.approx(summary["validation"]["cer"], abs=1e-4)
    codec = MossSpeechCodecModel.from_pretrained(tmp_path / "out").eval()
    texts = ["red", "blue", "green", "red blue", "green red"]
    speech = [espeak(text, voice="en-us") for text in texts]
    heard = codec.transcribe([wav for wav, _ in speech], sampling_rate=speech[0][1])
    # Overfits ten utterances: the training sentences come back through waveform → codes → CTC.
    scores = train_speech_tokenizer.recognition_scores(heard, texts)
    assert scores["cer"] < 0.3, (heard, scores)  # an untrained encoder scores ~1.0
    assert summary["codes_used"] > 1


def test_train_speech_tokenizer_turns_a_release_style_encoder_local(tmp_path):
    """--init_from a codec with a position table under a --codec_config with encoder_attention_window: the weights
    carry over, the table is dropped; any other mismatch is refused."""
    _tiny_corpus(tmp_path / "corpus")
    torch.manual_seed(0)
    base = ctc_config(vocoder_type="griffin_lim", griffin_lim_iters=4, speaker_config=None)
    MossSpeechCodecModel(base).save_pretrained(tmp_path / "codec")
    config = base.to_dict()
    config["encoder_config"]["encoder_attention_window"] = 4
    keys = ("encoder_config", "flow_config", "vocoder_config", "vocoder_type", "griffin_lim_iters", "speaker_config")
    (tmp_path / "local.json").write_text(json.dumps({k: config[k] for k in keys}))
    args = ["--corpus", str(tmp_path / "corpus"), "--init_from", str(tmp_path / "codec"), "--max_steps", "1",
            "--batch_size", "2", "--eval_examples", "2"]
    train_speech_tokenizer.main([*args, "--codec_config", str(tmp_path / "local.json"),
                                 "--output", str(tmp_path / "out")])
    codec = MossSpeechCodecModel.from_pretrained(tmp_path / "out")
    assert codec.config.encoder_config.encoder_attention_window == 4
    assert "encoder.embed_positions.weight" not in codec.state_dict()
    before = MossSpeechCodecModel.from_pretrained(tmp_path / "codec").state_dict()
    # loaded, then one Adam step (each weight moves by about the learning rate, 2e-3)
    moved = (codec.state_dict()["encoder.conv1.weight"] - before["encoder.conv1.weight"]).abs().max()
    assert 0 < moved < 0.01
    config["encoder_config"]["ctc_layers"] = base.encoder_config.ctc_layers + 1
    (tmp_path / "other.json").write_text(json.dumps({k: config[k] for k in keys}))
    with pytest.raises(ValueError, match="does not match --codec_config .*ctc_head.layers.1"):
        train_speech_tokenizer.main([*args, "--codec_config", str(tmp_path / "other.json"),
                                     "--output", str(tmp_path / "other")])


def test_train_speech_recognizer_changes_only_the_ctc_head(tmp_path):
    import train_speech_recognizer

    _tiny_corpus(tmp_path / "corpus")
    torch.manual_seed(0)
    config = ctc_config(vocoder_type="griffin_lim", griffin_lim_iters=4, speaker_config=None)
    MossSpeechCodecModel(config).save_pretrained(tmp_path / "codec")
    summary = train_speech_recognizer.main([
        "--codec", str(tmp_path / "codec"), "--corpus", str(tmp_path / "corpus"), "--output", str(tmp_path / "out"),
        "--max_train_examples", "6", "--eval_examples", "2", "--max_steps", "5", "--batch_size", "4",
    ])
    assert summary["examples"] > 0 and set(summary["validation_after"]) == {"original", "roundtrip"}
    before = MossSpeechCodecModel.from_pretrained(tmp_path / "codec").state_dict()
    after = MossSpeechCodecModel.from_pretrained(tmp_path / "out").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # The codes the LLM was trained on stay exactly the same: only the recogniser head moves.
    assert changed and all(k.startswith("encoder.ctc_head.") for k in changed)


def test_warp_features_moves_formants_and_stretches_time():
    feat = torch.zeros(40, 30)
    feat[10] = 1.0  # one spectral peak
    assert torch.equal(train_speech_tokenizer.warp_features(feat), feat)
    up = train_speech_tokenizer.warp_features(feat, frequency_factor=1.2)
    down = train_speech_tokenizer.warp_features(feat, frequency_factor=0.8)
    assert up.shape == down.shape == feat.shape
    assert int(up[:, 0].argmax()) == 12 and int(down[:, 0].argmax()) == 8
    longer = train_speech_tokenizer.warp_features(feat, time_factor=1.1)
    assert longer.shape == (40, 33) and torch.allclose(longer[10], torch.ones(33))
    with pytest.raises(ValueError, match="positive"):
        train_speech_tokenizer.warp_features(feat, frequency_factor=0.0)


def test_train_speech_tokenizer_refuses_out_of_range_augmentation(tmp_path):
    with pytest.raises(ValueError, match="--vtlp"):
        train_speech_tokenizer.main(["--corpus", "c", "--codec_config", "c.json", "--output", str(tmp_path),
                                     "--vtlp", "0.7"])


def test_words_per_code_follows_the_ctc_alignment():
    codec = MossSpeechCodecModel(ctc_config())  # ctc_upsample 4
    head = codec.encoder.ctc_head
    ids = {c: CTC_ALPHABET.index(c) + 1 for c in "ab "}
    # 6 codes x 4 frames: code 0 silence, codes 1-2 say "aa" (a blank between the repeat), code 3 the space,
    # code 4 "b", code 5 silence again
    frames = [0, 0, 0, 0, ids["a"], ids["a"], 0, 0, 0, ids["a"], 0, 0, 0, ids[" "], 0, 0,
              ids["b"], ids["b"], 0, 0, 0, 0, 0, 0]
    log_probs = torch.full((len(frames), len(CTC_ALPHABET) + 1), -10.0)
    log_probs[torch.arange(len(frames)), torch.tensor(frames)] = 0.0
    # leading silence belongs to the next word, trailing silence to the last
    assert head.words_per_code(log_probs, "aa b") == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="single spaces"):
        head.words_per_code(log_probs, "aa  b")
    with pytest.raises(ValueError, match="outside the CTC alphabet"):
        head.words_per_code(log_probs, "aa B")
    with pytest.raises(ValueError, match="too few"):
        head.words_per_code(log_probs[:4], "aa b")
    with pytest.raises(ValueError, match="log_probs must be"):
        head.words_per_code(log_probs[:5], "a")
    # through the codec: one word index per code, non-decreasing, from the first word to the last
    torch.manual_seed(0)
    words = codec.eval().words_per_code(torch.randint(0, 64, (12,)).tolist(), "ab ba ab")
    assert len(words) == 12 and words == sorted(words) and words[0] == 0 and words[-1] == 2
    with pytest.raises(ValueError, match="one utterance"):
        codec.words_per_code(torch.zeros(2, 12, dtype=torch.long), "ab")
    with pytest.raises(ValueError, match="no CTC recogniser"):
        MossSpeechCodecModel(tiny_codec_config()).words_per_code([1, 2, 3], "ab")
