"""A stage kernel's share of the CPU cores, which may change while it runs.

The stage runner runs several editing cells at once, each kernel with its share of the cores. When the queue
empties, the last cells would go on with one share while the other cores idle (on 2 cores: SmolLM2's ROME cell
on one thread for half an hour). So the runner writes each running kernel's share into a file named by
:data:`ENV`, and the kernel follows it: :func:`follow` (called from every progress-bar update and from the
editing loops, at most every few seconds) sets ``torch``'s intra-op thread count to the file's number.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: Environment variable naming the file that holds this kernel's thread count.
ENV = "HELPERS_THREADS_FILE"
CHECK_INTERVAL_S = 5.0
_last_check = 0.0


def follow(force: bool = False) -> int | None:
    """Set torch's thread count to the number in ``$HELPERS_THREADS_FILE`` when it differs; returns the count
    set (None when nothing changed, no file is named, or it was checked less than :data:`CHECK_INTERVAL_S`
    ago unless ``force``). Never raises: a missing or garbled file leaves the count as it is."""
    global _last_check
    path = os.environ.get(ENV)
    now = time.monotonic()
    if not path or (not force and now - _last_check < CHECK_INTERVAL_S):
        return None
    _last_check = now
    try:
        wanted = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
    import torch

    if wanted < 1 or wanted == torch.get_num_threads():
        return None
    log.info("thread budget: %d -> %d threads", torch.get_num_threads(), wanted)
    torch.set_num_threads(wanted)
    return wanted


def write(path: Path, threads: int) -> None:
    """Give the kernel that follows ``path`` ``threads`` threads (atomically: it never reads half a number)."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(str(int(threads)))
    os.replace(tmp, path)


def shares(running: list[Path], cpus: int) -> dict[Path, int]:
    """Each running kernel's thread count when ``cpus`` cores are shared among them: ``cpus // n`` each, the
    remainder to the first ones (5 cores, 2 kernels: 3 and 2)."""
    n = len(running)
    if n == 0:
        return {}
    base, extra = divmod(max(cpus, n), n)
    return {p: base + (1 if i < extra else 0) for i, p in enumerate(running)}
