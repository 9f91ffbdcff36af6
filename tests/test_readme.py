"""The documentation's runnable examples run as written, and its commands name what exists.

Convention (stated in README.md and at the top of each document): blocks fenced ```python run offline and are executed
here, one namespace per document, in order; blocks fenced ```py need the released weights and are not run. Shell
blocks are not run (installs, downloads, hours of training), but every `moss-speech` command in them must name an
existing sub-command and options it accepts, and every repository script they run must exist.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from modeling_moss_speech.apps.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Every Markdown document of the repository that a reader follows from the README.
DOCUMENTS = ["README.md", "training/README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^ *```{language}\n(.*?)^ *```", text, flags=re.S | re.M)


def _run_python_blocks(document: str, tmp_path: Path, monkeypatch) -> dict:
    """Execute the document's ```python blocks in one namespace, from a copy of examples/ (they write files)."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples", dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in _blocks((ROOT / document).read_text(), "python"):
        exec(compile(block, document, "exec"), namespace)  # noqa: S102 - the examples are the test
    return namespace


def test_readme_examples_run(tmp_path, monkeypatch):
    namespace = _run_python_blocks("README.md", tmp_path, monkeypatch)
    assert namespace["rows"].shape[-1] == 2
    assert namespace["out"].text_loss.item() > 0 and namespace["out"].audio_loss.item() > 0
    assert namespace["answer"].text == "yellow"  # the shipped nano model, greedy by its generation config


def test_usage_examples_run(tmp_path, monkeypatch):
    namespace = _run_python_blocks("docs/usage.md", tmp_path, monkeypatch)
    assert namespace["inputs"]["input_ids"].shape[-1] == 2
    assert [reply.text for reply in namespace["replies"]][0] == "yellow"  # T→T of a trained fact
    assert namespace["replies"][1].audio is not None  # T→S answered in speech


def test_codec_examples_run(tmp_path, monkeypatch):
    namespace = _run_python_blocks("docs/codec.md", tmp_path, monkeypatch)
    assert namespace["codes"].lengths.tolist() == [25, 13]
    assert namespace["speech"].lengths.tolist() == [48000, 24960]


def test_every_runnable_block_is_tested():
    tested = {"README.md", "docs/usage.md", "docs/codec.md"}
    for document in DOCUMENTS:
        if document not in tested:
            assert not _blocks((ROOT / document).read_text(), "python"), f"{document}: add a test that runs it"


def test_the_py_convention_is_explained_where_blocks_need_weights():
    for document in DOCUMENTS:
        text = (ROOT / document).read_text()
        if _blocks(text, "py"):
            assert "```` ```py ````" in text, f"{document} has ```py blocks but does not say what they mean"


def _commands(text: str) -> list[list[str]]:
    """Shell commands of the ```bash blocks: continuation lines joined, comments dropped, split at && and |."""
    commands = []
    for block in _blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            for part in re.split(r"&&|\|\||\|", line):
                words = shlex.split(part.strip().strip("()"))
                while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
                    words = words[1:]
                if words:
                    commands.append(words)
    return commands


@functools.cache
def _help(*args: str) -> str:
    """What `moss-speech ARGS --help` prints."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(io.StringIO()):
        code = main([*args, "--help"])
    return output.getvalue() if code == 0 else ""


@pytest.mark.parametrize("document", DOCUMENTS)
def test_documented_commands_exist(document):
    listed = _help().split("positional arguments:")[1].split("options:")[0]
    for words in _commands((ROOT / document).read_text()):
        if words[0] == "moss-speech" and len(words) > 1 and not words[1].startswith("-"):
            assert re.search(rf"^    {re.escape(words[1])}\b", listed, flags=re.M), f"{document}: {' '.join(words)}"
            for word in words[2:]:
                if word.startswith("--"):
                    assert re.search(rf"{re.escape(word.split('=')[0])}\b", _help(words[1])), \
                        f"{document}: moss-speech {words[1]} has no {word}"
        scripts = [w for w in words if re.match(r"^(training|processing|bench|tests)/\S+\.(py|sh)$", w)]
        for script in scripts:
            assert (ROOT / script).is_file(), f"{document}: {script} does not exist"


def test_ci_runs_the_readme_test_command():
    extract = subprocess.run(
        ["bash", "-c", "grep -o \"awk '.*' README.md\" .ci/run | bash"], cwd=ROOT, capture_output=True, text=True
    )
    command = extract.stdout.strip()
    assert "pytest" in command and "constraints.txt" in command
    assert command in README


def test_extras_are_installed_with_the_constraints():
    for document in DOCUMENTS:
        for words in _commands((ROOT / document).read_text()):
            if Path(words[0]).name == "pip" and "install" in words and any(w.startswith((".", "-e")) for w in words):
                assert "-c" in words and "constraints.txt" in words, f"{document}: {' '.join(words)}"
