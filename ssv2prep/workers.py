"""The process pools of the data stages (`shard`, `verify`): one way to start them, the same in every stage.

- Workers ignore SIGINT: Ctrl-C is the parent's to handle (it stops the pool and records what finished); a worker
  taking the terminal's SIGINT would die with a traceback or turn its item into a failure. SIGTERM, which the
  parent uses to stop them, ends them at once (a forked worker would otherwise inherit the CLI's handler).
- Workers take the parent's environment as it is when the pool starts. A fork server keeps the environment it was
  started with, so without this a pool made after the environment changed (object-store credentials and endpoint,
  thread settings) would run with the old one.
- `fork` while the parent runs no other thread (workers start at once, modules already imported), else
  `forkserver`: forking a process with threads (an object store's IO loop, a progress bar) can copy a lock held
  mid-use into a child that then waits on it forever.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor


def _init_worker(environ: dict[str, str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the CLI's handler; stopping must stop it
    os.environ.clear()
    os.environ.update(environ)


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def worker_pool(workers: int, *, preload: list[str]) -> ProcessPoolExecutor:
    """A pool of `workers` processes as the module docstring describes; `preload` names the modules a fork server
    imports once for all its workers (the module whose functions run there)."""
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("fork")
    else:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(preload)
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(dict(os.environ),)
    )
