"""transformers' own common model and config tests (`ModelTesterMixin`, `ConfigTester`) run against MOSS-Speech.

Every in-tree transformers model proves it works with the ecosystem (Trainer, PEFT, FSDP's meta-device loading,
`torch.compile`, probing through `output_hidden_states`, caches built from the config, ...) by passing these suites.
No code of transformers is copied here: at test time the pinned version's `tests/test_modeling_common.py` and
`tests/test_configuration_common.py` are taken from its source distribution on the package index
(`pip download --no-deps --no-binary :all: transformers==<installed version>`), cached under the temp directory, and
imported as a package. The module is skipped, with the reason, only when that download is impossible.

The sdist ships `tests/*.py` but not the sub-packages those two files import; the stand-ins below are:
`exporters.test_export.ExportTesterMixin` and `generation.test_utils.GenerationTesterMixin` as empty mixins (the
upstream export tests are not in the sdist: `tests/test_modeling.py` exports and fullgraph-compiles the forward
itself; MOSS-Speech's `generate` is its own two-channel state machine, tested in `tests/test_generation.py`), and
`utils.test_configuration_utils.config_common_kwargs`, written here (non-default values of common config fields).
`parameterized`, which the upstream module imports, is fetched the same way when it is not installed.

Adaptations a two-channel model needs, and nothing else: inputs are (B, L, 2) grids, labels (B, L, 2), and where an
upstream test reads `logits` the text and audio logits are read (`_logits_scored_by_loss`). The model classes are
entered in transformers' auto-class name tables while these tests run (as an in-tree model would be), so the tests
gated on "is this a causal LM / a base model" run for them. Every upstream test that is skipped names why it cannot
apply to this model in `SKIPPED`.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
import unittest.mock
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto import modeling_auto

from modeling_moss_speech import MossSpeechConfig, MossSpeechForCausalLM, MossSpeechModel, MossSpeechPreTrainedModel

PINNED = transformers.__version__
CACHE = Path(tempfile.gettempdir()) / f"moss_speech_transformers_tests_{PINNED}"
PACKAGE = "moss_speech_upstream_tests"
UPSTREAM_FILES = ("test_modeling_common.py", "test_configuration_common.py")


def _pip_download(requirement: str, *options: str) -> Path:
    """Download `requirement` (no dependencies) into the cache with pip; returns the downloaded file."""
    target = CACHE / "downloads"
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               *options, requirement, "-d", str(target)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"`pip download {requirement}` failed: {result.stderr.strip()[-500:]}")
    name = requirement.split("==")[0].lower()
    found = [p for p in target.iterdir() if p.name.lower().startswith(name + "-")]
    if not found:
        raise RuntimeError(f"`pip download {requirement}` left no file in {target}")
    return max(found, key=lambda p: p.stat().st_mtime)


def _upstream_tests_dir() -> Path:
    """The pinned transformers' `tests/` files, extracted from its sdist into the cache (downloaded once)."""
    directory = CACHE / PACKAGE
    if all((directory / name).exists() for name in UPSTREAM_FILES):
        return directory
    sdist = _pip_download(f"transformers=={PINNED}", "--no-binary", ":all:")
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as archive:
        for name in UPSTREAM_FILES:
            member = archive.getmember(f"transformers-{PINNED}/tests/{name}")
            (directory / name).write_bytes(archive.extractfile(member).read())
    # Package marker (also what `direct_transformers_import(tests_dir)` in the config tests executes).
    (directory / "__init__.py").write_text("")
    return directory


def _ensure_parameterized() -> None:
    """`parameterized` (imported by the upstream module): the installed one, else its wheel from the index."""
    try:
        importlib.import_module("parameterized")
    except ImportError:
        wheel = _pip_download("parameterized==0.9.0", "--only-binary", ":all:")
        sys.path.append(str(wheel))  # a pure-Python wheel is importable as a zip
        importlib.import_module("parameterized")


def _stand_in(name: str, **attributes) -> None:
    module = types.ModuleType(f"{PACKAGE}.{name}")
    module.__dict__.update(attributes)
    sys.modules[module.__name__] = module


def _import_upstream() -> tuple[types.ModuleType, types.ModuleType]:
    directory = _upstream_tests_dir()
    _ensure_parameterized()
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, directory / "__init__.py",
                                                      submodule_search_locations=[str(directory)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
        for sub in ("exporters", "generation", "utils"):
            _stand_in(sub)
        _stand_in("exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
        _stand_in("generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
        _stand_in("utils.test_configuration_utils", config_common_kwargs={
            "return_dict": False, "output_hidden_states": True, "output_attentions": True, "dtype": "float16",
            "chunk_size_feed_forward": 5, "architectures": ["MossSpeechForCausalLM"],
            "id2label": {0: "speech", 1: "text"}, "label2id": {"speech": 0, "text": 1}, "problem_type": "regression",
        })
    return (importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_configuration_common"))


try:
    with warnings.catch_warnings():
        # Upstream's own pytest marks (flash_attn_test, torch_compile_test, ...) are registered in its conftest.
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        modeling_common, configuration_common = _import_upstream()
except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as error:  # no index, no sdist, no member
    pytest.skip(f"transformers {PINNED}'s test files could not be obtained from its sdist: {error}",
                allow_module_level=True)

ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = configuration_common.ConfigTester
ids_tensor = modeling_common.ids_tensor


# Upstream tests that cannot apply to this model, each with the reason. Not a list of defects: a test that fails
# because of a defect is fixed in the model, not listed here.
SKIPPED = {
    "test_num_layers_is_small": (
        "the tester counts runtime attention layers (trunk + text tail + audio tail = 3, the smallest model with a "
        "trunk and both tails; config.num_hidden_layers is 2): every recorded attention/hidden state belongs to one "
        "of them, and upstream's bound of 2 would leave no layer for one of the tails"
    ),
    "test_resize_tokens_embeddings": (
        "the input embedding is two tables selected per row by the text id (modality pad -> audio table): resizing "
        "the text table alone cannot keep the grid's audio rows consistent, and the release never resizes"
    ),
    "test_resize_embeddings_untied": (
        "resizes one input table and one head; MOSS-Speech has two of each (see test_resize_tokens_embeddings)"
    ),
    "test_resize_embeddings_untied_no_reinit_on_post_init": (
        "resizes one input table and one head; MOSS-Speech has two of each (see test_resize_tokens_embeddings)"
    ),
    "test_inputs_embeds_matches_input_ids": (
        "builds inputs_embeds as get_input_embeddings()(input_ids), a one-table lookup; a grid row's embedding comes "
        "from one of two tables (MossSpeechModel.embed_grid): test_modeling.py::test_inputs_embeds_of_the_grid"
    ),
    "test_inputs_embeds": (
        "builds inputs_embeds as get_input_embeddings()(input_ids), which for a (B, L, 2) grid is (B, L, 2, H): "
        "the two-channel equivalent is test_modeling.py::test_inputs_embeds_of_the_grid"
    ),
    "test_model_rope_scaling_from_config": (
        "feeds the base model (1, L) one-channel ids and reads `last_hidden_state`; the same check on (1, L, 2) "
        "grids and the tails' outputs is test_modeling.py::test_rope_scaling_from_config"
    ),
    "test_problem_types": "sequence-classification heads only; MOSS-Speech has none",
}


# Upstream tests that load deliberately incomplete checkpoints (a base model's weights into a model with heads, a
# checkpoint with tensors removed) and check transformers' lenient path: missing tensors freshly initialised and
# reported. Here a checkpoint that does not match is refused by default (strict loading: a missing or unexpected
# tensor is an error naming the keys); the lenient path is `strict=False`, so these tests run with it: they check
# that `strict=False` behaves as transformers does.
LENIENT_LOADING = ("test_base_model_prefix_loads_base_weights", "test_correct_missing_keys",
                   "test_model_weights_reload_no_missing_tied_weights")


def _skip_reason(name: str) -> str | None:
    for prefix, reason in SKIPPED.items():
        if name == prefix or name.startswith(prefix + "_"):
            return reason
    return None


class _ChannelLogits:
    """The text and audio logits where an upstream test reads one `logits` tensor: `argmax`/`argmin` over the
    vocabulary give (B, L, 2) targets, one per channel, as `shift_labels` for a two-channel head."""

    def __init__(self, text: torch.Tensor, audio: torch.Tensor) -> None:
        self.text, self.audio = text, audio

    def argmax(self, dim: int = -1) -> torch.Tensor:
        return torch.stack([self.text.argmax(dim), self.audio.argmax(dim)], dim=-1)

    def argmin(self, dim: int = -1) -> torch.Tensor:
        return torch.stack([self.text.argmin(dim), self.audio.argmin(dim)], dim=-1)


class MossSpeechModelTester:
    """Tiny configs and (B, L, 2) grids for the upstream mixin (the role of an in-tree model's `*ModelTester`)."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 3, seq_length: int = 7) -> None:
        self.parent = parent
        self.batch_size, self.seq_length = batch_size, seq_length
        self.is_training = True
        self.vocab_size, self.audio_vocab_size = 99, 77
        self.hidden_size, self.intermediate_size = 32, 37
        self.num_attention_heads, self.num_key_value_heads, self.head_dim = 4, 2, 8
        self.num_shared_layers, self.num_modality_layers = 1, 1
        # What the recorded outputs count: one attention map per runtime layer, one hidden state more (embeddings).
        self.num_hidden_layers = self.num_shared_layers + 2 * self.num_modality_layers
        self.expected_num_hidden_layers = self.num_hidden_layers + 1
        # Special ids given explicitly (their small-vocabulary defaults are tested in tests/test_config.py).
        self.sosp_token_id, self.modality_pad_token_id, self.pad_token_id = 96, 97, 98
        self.eosp_token_id, self.audio_pad_token_id = 70, 71

    def get_config(self) -> MossSpeechConfig:
        return MossSpeechConfig(
            vocab_size=self.vocab_size, audio_vocab_size=self.audio_vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_shared_layers + self.num_modality_layers,
            num_shared_layers=self.num_shared_layers, num_modality_layers=self.num_modality_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, max_position_embeddings=512, sosp_token_id=self.sosp_token_id,
            modality_pad_token_id=self.modality_pad_token_id, pad_token_id=self.pad_token_id,
            eos_token_id=self.pad_token_id, eosp_token_id=self.eosp_token_id,
            audio_pad_token_id=self.audio_pad_token_id,
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[MossSpeechConfig, dict[str, torch.Tensor]]:
        """Grids mixing text rows (audio column = audio pad) and speech rows (text column = modality pad), the first
        sequence left-padded by two rows."""
        shape = (self.batch_size, self.seq_length)
        text = ids_tensor(list(shape), self.sosp_token_id)
        audio = ids_tensor(list(shape), self.eosp_token_id)
        speech = ids_tensor(list(shape), 2).bool()
        grid = torch.stack([torch.where(speech, self.modality_pad_token_id, text),
                            torch.where(speech, audio, self.audio_pad_token_id)], dim=-1)
        mask = torch.ones(shape, dtype=torch.long, device=grid.device)
        mask[0, :2] = 0
        grid[0, :2, 0], grid[0, :2, 1] = self.pad_token_id, self.audio_pad_token_id
        return self.get_config(), {"input_ids": grid, "attention_mask": mask}


@pytest.fixture(scope="module", autouse=True)
def _registered_in_auto_name_tables():
    """Enter the model classes in transformers' auto-class name tables, as an in-tree model is, for this module."""
    tables = [(modeling_auto.MODEL_MAPPING_NAMES, "MossSpeechModel"),
              (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "MossSpeechForCausalLM")]
    for table, name in tables:
        table["moss_speech"] = name
    yield
    for table, _ in tables:
        table.pop("moss_speech", None)


class MossSpeechModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MossSpeechModel, MossSpeechForCausalLM)
    # generate is MOSS-Speech's own two-channel state machine (tests/test_generation.py), not GenerationMixin's.
    all_generative_model_classes = ()
    # Resizing the embeddings cannot apply (two tables, see SKIPPED).
    test_resize_embeddings = False

    def setUp(self) -> None:
        reason = _skip_reason(self._testMethodName)
        if reason is not None:
            self.skipTest(reason)
        if self._testMethodName in LENIENT_LOADING:
            checked = MossSpeechPreTrainedModel.from_pretrained.__func__

            def lenient(cls, *args, **kwargs):
                kwargs.setdefault("strict", False)
                return checked(cls, *args, **kwargs)

            patcher = unittest.mock.patch.object(MossSpeechPreTrainedModel, "from_pretrained", classmethod(lenient))
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = MossSpeechModelTester(self)
        self.config_tester = ConfigTester(self, config_class=MossSpeechConfig, hidden_size=37, vocab_size=99,
                                          audio_vocab_size=77, num_hidden_layers=2, num_shared_layers=1,
                                          num_modality_layers=1, sosp_token_id=96, modality_pad_token_id=97,
                                          pad_token_id=98, eosp_token_id=70, audio_pad_token_id=71)

    def test_config(self) -> None:
        self.config_tester.run_common_tests()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        labels = inputs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.ndim == 2:
            # Two-channel targets, aligned with the (B, L, 2) grid.
            inputs["labels"] = torch.stack([labels, labels], dim=-1)
        return inputs

    def _logits_scored_by_loss(self, model, logits):
        if logits is not None:
            return logits
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        with torch.no_grad():
            out = model(**self._prepare_for_class(inputs, type(model)))
        return _ChannelLogits(out.text_logits, out.audio_logits)


def test_every_skip_names_an_upstream_test_and_a_reason():
    upstream = {name for name in dir(ModelTesterMixin) if name.startswith("test_")}
    for name, reason in SKIPPED.items():
        assert any(test == name or test.startswith(name + "_") for test in upstream), name
        assert len(reason) > 40, name


def test_meta_device_codec_materialises_with_init_weights():
    """The codec built on the meta device, `to_empty()`, then `init_weights()`: every tensor written (the storage is
    poisoned with NaN first), buffers equal to a normally built codec's, and it encodes and decodes."""
    from helpers import tiny_codec_config, tone
    from transformers import initialization as init

    from modeling_moss_speech import MossSpeechCodecModel

    config = tiny_codec_config()
    with torch.device("meta"):
        codec = MossSpeechCodecModel(copy.deepcopy(config))
    codec.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*codec.parameters(), *codec.buffers()]:
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    codec.init_weights()
    unwritten = [name for name, t in [*codec.named_parameters(), *codec.named_buffers()]
                 if t.is_floating_point() and t.isnan().any()]
    assert unwritten == []
    with init.no_init_weights():
        fresh = MossSpeechCodecModel(copy.deepcopy(config))
    fresh_buffers = dict(fresh.named_buffers())
    for name, buffer in codec.named_buffers():
        assert torch.equal(buffer, fresh_buffers[name]), name
    codec.eval()
    codes = codec.encode(tone(0.5), sampling_rate=16000).codes[0]
    assert codes.numel() > 0
    assert torch.isfinite(codec.decode(codes, generator=torch.Generator().manual_seed(0)).waveforms).all()
