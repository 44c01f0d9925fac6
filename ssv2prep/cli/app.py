"""The `ssv2prep` command group, its global options, and the helpers every command module shares.

The command line is the only part of ssv2prep that talks to the terminal. Each command validates its options,
calls one library function and turns its progress callbacks into rich progress bars. Known errors
(`Ssv2PrepError`) become one line on stderr and the error's exit code; `--debug` shows the traceback too. Heavy
imports (torch, av) happen inside command bodies so `--help` stays fast.
"""

from __future__ import annotations

import faulthandler
import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ssv2prep import __version__
from ssv2prep.errors import Ssv2PrepError
from ssv2prep.fsutil import write_problem
from ssv2prep.malloc import ENV_VAR as MALLOC_ENV_VAR
from ssv2prep.malloc import KEPT, configure_malloc
from ssv2prep.malloc import MODES as MALLOC_MODES

console = Console(stderr=True)
out = Console(soft_wrap=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs; `signum` says which."""

    signum = signal.SIGTERM


# Commands whose clean stop matters (finished work recorded, workers and stage processes stopped) turn SIGTERM into
# `Terminated`; the others keep Python's default (SIGTERM ends the process at once), which torchrun relies on.
SIGTERM_COMMANDS = frozenset({"synth", "download", "extract", "shard", "verify", "report", "run", "demo"})


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


class _Group(click.Group):
    """A click group that turns known errors into a one-line message and an exit code.

    `Ssv2PrepError` -> its message and `exit_code`; Ctrl-C -> exit 130 (SIGTERM -> 143); an OSError that means an
    output cannot be written (disk full, read-only file system, permission) -> the path and the problem, exit 1.
    """

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.obj and ctx.obj.get("debug"))
        try:
            return super().invoke(ctx)
        except Ssv2PrepError as exc:
            if debug:
                console.print_exception()
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
            click.echo(f"error: {what}; finished work is kept, re-run to resume", err=True)
            sys.exit(128 + signum)
        except OSError as exc:
            problem = write_problem(exc)
            if problem is None:
                raise
            if debug:
                console.print_exception()
            where = exc.filename if exc.filename is not None else "an output file"
            click.echo(f"error: {where}: {problem}", err=True)
            sys.exit(1)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A plain handler on whatever `sys.stderr` is at the time of each record (as the rich console does)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 0 else logging.INFO
    handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    if not console.is_terminal:  # batch jobs (Slurm, `2> log`): one plain, greppable line per record, never wrapped
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
        handler.setLevel(logging.WARNING)  # under torchrun / srun only rank 0 says more than warnings
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    # Library modules log at INFO; third-party chatter stays at WARNING.
    for noisy in ("urllib3", "PIL", "matplotlib", "libav", "botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def progress_bars(*, transfer: bool = False) -> Iterator[Progress]:
    """Rich progress bars on stderr (counts, rate, ETA; bytes/s with `transfer`), off when it is not a terminal."""
    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn()]
    columns += [TransferSpeedColumn()] if transfer else [MofNCompleteColumn(), TextColumn("{task.fields[rate]}")]
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        yield progress


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="ssv2prep")
@click.option("-v", "--verbose", count=True, help="More log output (-v: debug).")
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Only warnings and errors (on stderr); no results or tables on stdout. Files are still written.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks for known errors too.")
@click.option(
    "--malloc",
    "malloc",
    type=click.Choice(MALLOC_MODES),
    default=KEPT,
    show_default=True,
    envvar=MALLOC_ENV_VAR,
    help="CPU allocator: 'kept' reuses freed memory instead of page-faulting fresh pages on every forward pass "
    "(a batch-8 TSN-ResNet-50 forward ran 2.1x faster here: bench shift --malloc-modes kept,system); 'system' "
    "keeps the C library's defaults.",
)
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, debug: bool, malloc: str) -> None:
    """Prepare Something-Something-V2 as WebDataset shards and train/evaluate TSM models on them.

    \b
    Data:
      synth OUT                      a synthetic dataset in the exact SSv2 form (no download needed)
      download --dest DL             the real files of the shipped ssv2.json manifest (resumable)
      extract --src DL --dest DATA   join parts as a stream, untar safely, gather labels
      shard --videos V --labels L --out SHARDS   WebDataset shards, index, manifest and stats per split
      verify SHARDS                  re-read every shard against its index
      report SHARDS                  plots and contact sheets of a shard folder
    Models:
      train --data SHARDS --out RUN  TSM/TSN from shards (one process or torchrun)
      eval --checkpoint CKPT --data SHARDS     the official test protocol; --grid for several fidelities
      predict CKPT VIDEO...          classify video files (--online: frame by frame)
      export CKPT                    a checkpoint in the official layout and file name
    Whole jobs and measurements:
      run PIPELINE                   a shipped pipeline by name or a .toml file, stage by stage, resumable
      demo                           the whole job on synthetic data
      bench shard|loader|shift       ours against a baseline and a bound, with ratios
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _enable_faulthandler()
    if ctx.invoked_subcommand in SIGTERM_COMMANDS and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    _setup_logging(verbose, quiet)
    out.quiet = quiet  # set on every call: tests invoke several commands in one process
    in_effect = configure_malloc(malloc)
    if in_effect != malloc:  # not glibc, or `kept` was applied earlier in this process
        logging.getLogger("ssv2prep").debug("--malloc %s asked for; the process runs with %s", malloc, in_effect)
    os.environ[MALLOC_ENV_VAR] = malloc  # stages that `run` and `demo` start as subprocesses follow the choice


def _enable_faulthandler() -> None:
    """A crash in native code (gloo, FFmpeg, libjpeg) prints the Python stack of every thread to stderr before the
    process dies, so a batch job's log says where it was (not only "exitcode -6"). No-op where stderr is not a file
    (click's test runner)."""
    if not faulthandler.is_enabled():
        with suppress(AttributeError, ValueError, io.UnsupportedOperation):
            faulthandler.enable(all_threads=True)


def split_list(value: str) -> tuple[str, ...]:
    """The non-empty items of a comma-separated option value."""
    return tuple(s.strip() for s in value.split(",") if s.strip())


N = TypeVar("N", int, float)


def _number_list(option: str, value: str, kind: Callable[[str], N], what: str) -> tuple[N, ...]:
    try:
        return tuple(kind(v) for v in split_list(value))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {what}, got {value!r}", param_hint=option) from None


def int_list(option: str, value: str) -> tuple[int, ...]:
    """A comma-separated list of integers, or a one-line usage error naming the option."""
    return _number_list(option, value, int, "integers")


def float_list(option: str, value: str) -> tuple[float, ...]:
    """A comma-separated list of numbers, or a one-line usage error naming the option."""
    return _number_list(option, value, float, "numbers")


F = TypeVar("F", bound=Callable[..., Any])


def jpeg_encoder_option(help_text: str) -> Callable[[F], F]:
    """The `--jpeg-encoder ffmpeg|pillow` option (shard and bench shard)."""
    return click.option(
        "--jpeg-encoder", type=click.Choice(["ffmpeg", "pillow"]), default="ffmpeg", show_default=True, help=help_text
    )


def emit_json(path: Path | None, result: dict[str, Any]) -> None:
    """Write a benchmark result as JSON when `--json` was given."""
    if path is not None:
        from ssv2prep.fsutil import atomic_write_json

        atomic_write_json(path, result)
        out.print(f"wrote {path}")


def config_default(cls: type, name: str) -> Any:
    """The default of field `name` of the config dataclass `cls`, so an option's default is defined once, there."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            break
    raise KeyError(f"{cls.__name__} has no field {name!r} with a default")
