"""The README's runnable examples (```python blocks) run as written; ```py blocks need the Hub and are skipped."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")  # the nano example asks examples/*.wav
    monkeypatch.chdir(tmp_path)  # examples write files (a voice prompt)
    blocks = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
    assert blocks, "README has no runnable example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the examples are the test
    assert namespace["rows"].shape[-1] == 2
    assert namespace["codes"].lengths.tolist() == [25, 13]
    assert namespace["speech"].lengths.tolist() == [48000, 24960]
    assert namespace["answer"].text == "yellow"  # the shipped nano model, greedy by its generation config


def test_ci_runs_the_readme_test_command():
    extract = subprocess.run(
        ["bash", "-c", "grep -o \"awk '.*' README.md\" .ci/run | bash"], cwd=ROOT, capture_output=True, text=True
    )
    command = extract.stdout.strip()
    assert "pytest" in command and "constraints.txt" in command
    assert command in README
