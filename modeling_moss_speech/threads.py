"""How many CPU threads torch uses: one policy and one `--threads` option for every command and script.

PyTorch's default intra-op pool has one thread per core. On a machine where anything else runs, its OpenMP threads
spend most of their time waiting for each other at every barrier: on a 2-core machine with one other busy process,
the same `moss-speech chat` answer took many times longer with 2 threads than with 1 (a nano answer: 0.4 s with 1
thread, 6-18 s with 2), with identical outputs. So the default here is `OMP_NUM_THREADS` when it is set, else half
the usable CPUs (at least 1); a command line's `--threads N` overrides both.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

THREADS_ENV = "OMP_NUM_THREADS"
THREADS_HELP = (f"torch CPU threads (default: ${THREADS_ENV} if set, else half the usable CPUs, at least 1; more "
                "threads than idle cores make every step wait)")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else `os.cpu_count()`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def default_threads() -> int:
    """`$OMP_NUM_THREADS` when it is a positive integer, else half of `usable_cpus()`, at least 1."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, usable_cpus() // 2)


def check_threads(threads: int | None, name: str = "threads") -> int:
    """`threads` as a positive int (`None`: `default_threads()`); `ValueError`/`TypeError` naming `name` otherwise."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"{name} must be a positive integer or None, got {type(threads).__name__} {threads!r}.")
    if threads < 1:
        raise ValueError(f"{name} must be a positive integer (CPU threads), got {threads}.")
    return threads


def set_threads(threads: int | None = None) -> int:
    """Use `threads` torch intra-op threads (`None`: `default_threads()`); returns the count in use before.

    Only the intra-op pool is set: torch allows setting the inter-op pool once per process, before any parallel
    work, which a library call cannot guarantee.
    """
    threads = check_threads(threads)
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    return previous


def _positive_int(text: str) -> int:
    """argparse type of `--threads`: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: Any = None) -> None:
    """Add `--threads N` to `parser`; its default `None` means `default_threads()` once given to `set_threads`."""
    parser.add_argument("--threads", type=_positive_int, default=default, metavar="N", help=THREADS_HELP)


__all__ = ["THREADS_ENV", "add_threads_argument", "check_threads", "default_threads", "set_threads", "usable_cpus"]
