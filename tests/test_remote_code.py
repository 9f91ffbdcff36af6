"""Remote-code export: a saved tiny checkpoint carries its code and `auto_map`, and a Python that cannot import this
package loads it with `trust_remote_code=True` and computes the same logits, prompt grids, codes and speech."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest
import torch
from helpers import (
    AUDIO_PAD,
    EOSP,
    MODALITY_PAD,
    SOSP,
    tiny_codec_config,
    tiny_config,
    tiny_tokenizer,
    tone,
    write_release_codec,
    write_release_lm,
)
from transformers.dynamic_module_utils import get_imports

from modeling_moss_speech import MossSpeechCodecModel, MossSpeechForCausalLM, MossSpeechProcessor
from modeling_moss_speech.hub.convert_moss_speech_original_to_hf import convert_checkpoint
from modeling_moss_speech.hub.publish import stage_upload
from modeling_moss_speech.hub.remote_code import (
    PACKAGE_DIR,
    REMOTE_CODE_IMPORTS,
    RemoteCodeError,
    check_remote_code,
    export_remote_code,
    remote_code_modules,
    save_pretrained_with_remote_code,
)

HUB_REPO = "org/tiny-moss-speech"
CONVERSATION = [{"role": "user", "content": "hello, what is the capital of france?"},
                {"role": "assistant", "content": {"type": "audio", "codes": [3, 17, 40, 8]}},
                {"role": "user", "content": "tell me more."}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The tiny release, converted (codec in codec/) and exported with remote code."""
    pytest.importorskip("onnx")
    root = tmp_path_factory.mktemp("remote")
    write_release_lm(root / "release_lm")
    write_release_codec(root / "release_codec")
    out = root / "tiny-moss-speech"
    convert_checkpoint(root / "release_lm", out, codec_dir=root / "release_codec",
                       codec_base_config=tiny_codec_config(), dtype="float32")
    export_remote_code(out)
    export_remote_code(out / "codec")
    return out


def test_exported_files_and_auto_maps(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_moss_speech.MossSpeechConfig",
                                  "AutoModel": "modeling_moss_speech.MossSpeechForCausalLM",
                                  "AutoModelForCausalLM": "modeling_moss_speech.MossSpeechForCausalLM"}
    processor = json.loads((exported / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing_moss_speech.MossSpeechProcessor"}
    # The feature extractor is taken from the processor's module, so both use one class object.
    assert processor["feature_extractor"]["auto_map"]["AutoFeatureExtractor"] == \
        "processing_moss_speech.MossSpeechFeatureExtractor"
    codec = json.loads((exported / "codec" / "config.json").read_text())
    assert codec["auto_map"] == {"AutoConfig": "modeling_moss_speech_codec.MossSpeechCodecConfig",
                                 "AutoModel": "modeling_moss_speech_codec.MossSpeechCodecModel"}
    allowed = REMOTE_CODE_IMPORTS | set(sys.stdlib_module_names)
    for directory in (exported, exported / "codec"):
        for path in directory.glob("*.py"):
            assert set(get_imports(str(path))) <= allowed, path.name
    # Only the model's flat modules ship: no application module and no stand-in for one.
    shipped = {p.name for p in exported.glob("*.py")} | {p.name for p in (exported / "codec").glob("*.py")}
    assert all((PACKAGE_DIR / name).is_file() for name in shipped), shipped
    assert not shipped & {"training_utils.py", "chat_moss_speech.py", "cli.py", "__init__.py"}


def test_register_for_auto_class_path_gives_the_same_export(exported, tmp_path):
    config = tiny_config()
    model = MossSpeechForCausalLM(config)
    codec = MossSpeechCodecModel(tiny_codec_config())
    processor = MossSpeechProcessor.from_model_config(config, tiny_tokenizer(), codec=codec)
    save_pretrained_with_remote_code(model, tmp_path)
    save_pretrained_with_remote_code(processor, tmp_path)
    for directory, reference in ((tmp_path, exported), (tmp_path / "codec", exported / "codec")):
        assert sorted(p.name for p in directory.glob("*.py")) == sorted(p.name for p in reference.glob("*.py"))
        for path in directory.glob("*.py"):
            assert path.read_text() == (reference / path.name).read_text(), path.name
    for name in ("config.json", "processor_config.json", "codec/config.json"):
        mine, theirs = (json.loads((d / name).read_text()) for d in (tmp_path, exported))
        assert mine["auto_map"] == theirs["auto_map"], name
    # The registration is undone: an ordinary save writes no code.
    model.save_pretrained(str(tmp_path / "plain"))
    assert not list((tmp_path / "plain").glob("*.py"))
    assert "auto_map" not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_disallowed_imports_are_caught(tmp_path):
    (tmp_path / "modeling_x.py").write_text("import peft\nfrom .helpers import thing\n")
    with pytest.raises(RemoteCodeError, match=r"modeling_x\.py imports 'peft'.*imports \.helpers, which is not"):
        check_remote_code(tmp_path)
    with pytest.raises(ValueError, match="holds no MOSS-Speech"):
        export_remote_code(tmp_path)


def test_remote_code_ships_only_flat_modules():
    assert "modeling_moss_speech" in remote_code_modules(["modeling_moss_speech"])
    # An application subpackage (or anything that is not a flat module of the package) cannot ship.
    for name in ("apps", "trainer", "hub", "no_such_module"):
        with pytest.raises(RemoteCodeError, match=f"{name!r} is imported relatively but .* not a flat module"):
            remote_code_modules([name])


# ------------------------------------------------------------------------------------------ without the package

_CHILD = r'''
import importlib.abc, json, os, sys

class _NoMossSpeech(importlib.abc.MetaPathFinder):
    """Belt and braces: even if the package were on the path, it must not be importable here."""
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_moss_speech" or name.startswith("modeling_moss_speech."):
            raise ModuleNotFoundError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, _NoMossSpeech())
sys.path = [p for p in sys.path if p not in ("", os.getcwd(), @REPO@)]
try:
    import modeling_moss_speech  # noqa: F401
    raise SystemExit("modeling_moss_speech is importable in the child")
except ModuleNotFoundError:
    pass

import torch
from transformers import AutoFeatureExtractor, AutoModel, AutoModelForCausalLM, AutoProcessor

inputs = torch.load(@INPUTS@)
everything = {}
for source in (@CHECKPOINT@, @HUB_REPO@):  # a local directory, then a repository id served from the Hub cache
    results = everything[source] = {}
    lm = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, dtype=torch.float32).eval()
    base = AutoModel.from_pretrained(source, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(lm).__name__ == type(base).__name__ == "MossSpeechForCausalLM", (type(lm), type(base))
    assert type(lm).__module__.startswith("transformers_modules."), type(lm).__module__
    with torch.no_grad():
        out = lm(inputs["grid"])
        results["text_logits"], results["audio_logits"] = out.text_logits, out.audio_logits
        results["generated"] = lm.generate(inputs["grid"], max_new_tokens=6, do_sample=False)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
    results["prompt"] = processor([json.loads(@CONVERSATION@)], output_modality="audio")["input_ids"]
    codec = processor.codec  # loaded from codec/ by the remote processor
    results["codes"] = codec.encode(inputs["wave"], sampling_rate=16000).codes[0]
    results["speech"] = codec.decode([inputs["codes"]], generator=torch.Generator().manual_seed(3)).waveforms
extractor = AutoFeatureExtractor.from_pretrained(@CHECKPOINT@ + "/codec", trust_remote_code=True)
assert type(extractor).__name__ == "MossSpeechFeatureExtractor", type(extractor)
standalone = AutoModel.from_pretrained(@CHECKPOINT@ + "/codec", trust_remote_code=True).eval()
assert type(standalone).__name__ == "MossSpeechCodecModel"
everything["standalone_codes"] = standalone.encode(inputs["wave"], sampling_rate=16000).codes[0]
torch.save(everything, @RESULTS@)
print("child ok", type(lm).__module__)
'''


def _bare_python(root: Path) -> str:
    """A fresh venv that sees the installed dependencies (a path entry) but not this package's editable install."""
    env_dir = root / "bare-venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    site = Path(sysconfig.get_paths(vars={"base": str(env_dir), "platbase": str(env_dir)})["purelib"])
    site.mkdir(parents=True, exist_ok=True)
    # A plain path line: the directory is searched, but .pth files inside it (the editable finder) are not run.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(env_dir / "bin" / "python")


def test_loads_with_trust_remote_code_without_the_package(exported, tmp_path):
    """A Python in which `modeling_moss_speech` cannot be imported gets the same results from the exported code."""
    config = tiny_config()
    grid = torch.tensor([[[5, AUDIO_PAD], [6, AUDIO_PAD], [SOSP, AUDIO_PAD], [MODALITY_PAD, 3], [MODALITY_PAD, EOSP],
                          [7, AUDIO_PAD], [SOSP, AUDIO_PAD]]])
    inputs = {"grid": grid, "wave": tone(1.1, 16000), "codes": torch.tensor([3, 17, 40, 8, 21])}
    torch.save(inputs, tmp_path / "inputs.pt")
    values = {"@REPO@": str(Path(__file__).resolve().parents[1]), "@INPUTS@": str(tmp_path / "inputs.pt"),
              "@CHECKPOINT@": str(exported), "@RESULTS@": str(tmp_path / "out.pt"),
              "@CONVERSATION@": json.dumps(CONVERSATION), "@HUB_REPO@": HUB_REPO}
    script = textwrap.dedent(_CHILD)
    for token, value in values.items():
        script = script.replace(token, repr(value))
    # What `publish` would upload, laid out as the Hub cache holds a downloaded repository: loading the id offline
    # takes transformers' Hub path (each module file fetched and its imports checked), not the local-directory one.
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    repo_cache = cache / f"models--{HUB_REPO.replace('/', '--')}"
    stage_upload(exported, repo_cache / "snapshots" / commit, HUB_REPO)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    done = subprocess.run([_bare_python(tmp_path), "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "child ok transformers_modules." in done.stdout
    everything = torch.load(tmp_path / "out.pt")

    model = MossSpeechForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    assert model.config.vocab_size == config.vocab_size
    with torch.no_grad():
        out = model(grid)
        generated = model.generate(grid, max_new_tokens=6, do_sample=False)
    processor = MossSpeechProcessor.from_pretrained(str(exported))
    prompt = processor([CONVERSATION], output_modality="audio")["input_ids"]
    codec = processor.codec
    codes = codec.encode(inputs["wave"], sampling_rate=16000).codes[0]
    speech = codec.decode([inputs["codes"]], generator=torch.Generator().manual_seed(3)).waveforms
    assert torch.equal(everything["standalone_codes"], codes)
    for source in (str(exported), HUB_REPO):
        got = everything[source]
        # another process, weights loaded separately (alignment, SIMD order): float32 tolerance for floats,
        # exact for token ids
        torch.testing.assert_close(got["text_logits"], out.text_logits, msg=source)
        torch.testing.assert_close(got["audio_logits"], out.audio_logits, msg=source)
        assert torch.equal(got["generated"], generated), source
        assert torch.equal(got["prompt"], prompt), source
        assert torch.equal(got["codes"], codes), source
        torch.testing.assert_close(got["speech"], speech, msg=source)
