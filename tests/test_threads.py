"""`--threads`: one policy (`modeling_moss_speech.threads`) for every CLI command and every script."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import sys
from pathlib import Path

import pytest
import torch

from modeling_moss_speech import threads
from modeling_moss_speech.apps.cli import info as cli_info
from modeling_moss_speech.apps.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for folder in ("training", "processing", "bench")
                 for p in (ROOT / folder).glob("*.py") if '__name__ == "__main__"' in p.read_text())


@pytest.fixture
def restore_threads():
    count = torch.get_num_threads()
    yield
    torch.set_num_threads(count)


@pytest.mark.parametrize(("env", "cpus", "expected"), [
    ("3", 2, 3),      # OMP_NUM_THREADS wins
    (None, 2, 1),     # half the CPUs: 1 of 2
    (None, 16, 8),
    (None, 1, 1),     # at least one
    ("", 8, 4),       # set but empty or invalid: ignored, as the CPUs decide
    ("0", 8, 4),
    ("two", 8, 4),
])
def test_default_threads(monkeypatch, env, cpus, expected):
    if env is None:
        monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    else:
        monkeypatch.setenv(threads.THREADS_ENV, env)
    monkeypatch.setattr(threads, "usable_cpus", lambda: cpus)
    assert threads.default_threads() == expected


def test_set_threads_returns_the_previous_count(monkeypatch, restore_threads):
    torch.set_num_threads(1)
    assert threads.set_threads(2) == 1 and torch.get_num_threads() == 2
    monkeypatch.setenv(threads.THREADS_ENV, "1")
    assert threads.set_threads() == 2 and torch.get_num_threads() == 1  # None: the default


@pytest.mark.parametrize(("value", "error", "match"), [
    (0, ValueError, "threads must be a positive integer.*got 0"),
    (-2, ValueError, "got -2"),
    (1.5, TypeError, "threads must be a positive integer or None, got float 1.5"),
    ("2", TypeError, "got str '2'"),
    (True, TypeError, "got bool True"),
])
def test_set_threads_rejects_bad_values(value, error, match, restore_threads):
    before = torch.get_num_threads()
    with pytest.raises(error, match=match):
        threads.set_threads(value)
    assert torch.get_num_threads() == before


def _subcommands() -> list[str]:
    action = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_cli_command_takes_threads(command, capsys):
    assert cli.main([command, "--help"]) == 0
    assert "--threads N" in capsys.readouterr().out


def test_cli_runs_the_command_with_threads_and_restores_the_count(monkeypatch, tmp_path, restore_threads):
    seen = []
    monkeypatch.setattr(cli_info, "run", lambda args: seen.append(torch.get_num_threads()) or 0)
    torch.set_num_threads(1)
    assert cli.main(["info", str(tmp_path), "--threads", "2"]) == 0
    assert cli.main(["--threads", "3", "info", str(tmp_path)]) == 0  # before the sub-command too
    assert seen == [2, 3] and torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_cli_rejects_bad_threads(value, capsys):
    assert cli.main(["info", ".", "--threads", value]) == 2
    assert f"argument --threads: expected an integer >= 1, got '{value}'" in capsys.readouterr().err


def _help_text(path: Path, monkeypatch) -> str:
    """The `--help` text of a script: its parser's help (`make_parser`), else what `main(["--help"])` prints."""
    monkeypatch.syspath_prepend(str(path.parent))
    monkeypatch.syspath_prepend(str(ROOT / "processing"))
    name = f"threads_test_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    if hasattr(module, "make_parser"):  # training/ and processing/: dataclass arguments
        return module.make_parser().format_help()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        if inspect.signature(module.main).parameters:
            module.main(["--help"])
        else:
            monkeypatch.setattr(sys, "argv", [str(path), "--help"])
            module.main()
    assert exit_.value.code in (0, None)
    return out.getvalue()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_takes_threads(script, monkeypatch):
    text = _help_text(ROOT / script, monkeypatch)
    assert "--threads" in text, f"{script} has no --threads option"
