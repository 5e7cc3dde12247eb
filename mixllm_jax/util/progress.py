"""Progress on the terminal: tqdm bars for loops, a timed line for a single step; both on stderr and
quiet unless stdout and stderr are terminals (a piped or logged run prints results only).

    for batch in progress.bar(batches, desc="embed", unit="batch"): ...
    with progress.step("saving the checkpoint"): save(...)
"""

from __future__ import annotations

import contextlib
import sys
import time


def enabled() -> bool:
    """Whether progress is shown: stdout and stderr are both terminals."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def bar(iterable=None, **kw):
    """``tqdm(iterable, **kw)`` shown only when :func:`enabled` (else it iterates silently)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled(), **kw)


@contextlib.contextmanager
def step(desc: str):
    """One step without iterations: ``desc ...`` when it starts, ``desc: 3.1 s`` when it ends."""
    if not enabled():
        yield
        return
    t = time.perf_counter()
    print(f"{desc} ...", end="\r", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        print(f"{desc}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
