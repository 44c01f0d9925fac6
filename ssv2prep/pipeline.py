"""`ssv2prep run PIPELINE.toml`: stages of the CLI run in order, each recorded when it finishes.

A pipeline file::

    [pipeline]
    name = "demo"
    work_dir = "runs/ssv2"                # relative to the current directory; {work} in values points here

    [stages.shard]                        # a stage per CLI command; options use the CLI flag names
    videos = "{work}/data/20bn-something-something-v2"
    labels = "{work}/data/labels"
    out = "{work}/shards"
    videos_per_shard = 40                 # -> --videos-per-shard 40; true -> a flag; a list -> comma-joined

    [stages.train]
    launcher = ["torchrun", "--nproc-per-node", "8"]   # optional: how to start this stage
    data = "{work}/shards"
    out = "{run}"                         # {run}: {work}/<pipeline name>, or {work}/<name>/<variant> in a sweep

    [stages.eval-test]                    # any name; `command` says which CLI command it runs
    command = "eval"
    args = []                             # positional arguments, if the command takes any

    [sweep]                               # optional: repeat some stages once per variant
    stages = ["train", "eval"]
    variants = [{name = "tsn", shift_div = 0}, {name = "tsm", shift_div = 8}]
    parallel = 2                          # optional: run 2 variants at a time (default 1)

Each stage runs as its own process (`python -m ssv2prep COMMAND ...`, or under its launcher), so a stage can be
torchrun. A finished stage writes `{work}/.pipeline/<pipeline name>/<stage>[@variant].json` with the exact command;
a re-run skips stages whose record matches, and re-runs (resumes) the others: every command resumes on its own.
Pipelines may share a work folder (and so their data stages): their records and run folders are kept apart.

With `parallel = N`, the swept stages run as one chain per variant (train a, eval a), N chains at a time; each
stage process gets `OMP_NUM_THREADS` = cores / N (unless the environment sets it), and its output goes to
`{work}/.pipeline/<pipeline name>/<stage>@<variant>.log` instead of the terminal. Small CPU models train faster
this way than one at a time with all threads: intra-op threading of small convolutions scales poorly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssv2prep.errors import ConfigError, Ssv2PrepError
from ssv2prep.fsutil import atomic_write_json
from ssv2prep.resources import find_pipeline

log = logging.getLogger(__name__)

COMMANDS = ("synth", "download", "extract", "shard", "verify", "train", "eval", "report")
STAGE_KEYS = ("command", "args", "launcher")
RECORD_DIR = ".pipeline"


class StageFailedError(Ssv2PrepError):
    """A stage's process exited non-zero."""


@dataclass(frozen=True, slots=True)
class Stage:
    """One step: a CLI command with its options (already substituted)."""

    name: str
    command: str
    options: dict[str, Any]
    args: tuple[str, ...] = ()
    launcher: tuple[str, ...] = ()
    variant: str | None = None

    @property
    def key(self) -> str:
        """`name` or `name@variant`: the record's name."""
        return self.name if self.variant is None else f"{self.name}@{self.variant}"

    def argv(self) -> list[str]:
        """The full command line of this stage."""
        base = list(self.launcher) + (["-m", "ssv2prep"] if self.launcher else [sys.executable, "-m", "ssv2prep"])
        return [*base, self.command, *self.args, *options_to_args(self.options)]


@dataclass(frozen=True, slots=True)
class Pipeline:
    """A loaded pipeline file."""

    name: str
    work_dir: Path
    stages: list[Stage]
    variants: list[str] = field(default_factory=list)
    source: Path | None = None
    parallel: int = 1  # sweep variants run at a time

    def run_dir(self, variant: str | None = None) -> Path:
        """Where `{run}` points: `{work}/<name>`, or `{work}/<name>/<variant>` for a sweep variant."""
        base = self.work_dir / self.name
        return base / variant if variant else base


def options_to_args(options: dict[str, Any]) -> list[str]:
    """`{"videos_per_shard": 40, "flip": True, "lr_steps": [20, 40]}` -> `--videos-per-shard 40 --flip ...`."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list | tuple):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set train.epochs=2`, `--set work_dir=out`, `--set sweep.variants=[...]`: edit the parsed file."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value (got {item!r})")
        parts = key.strip().split(".")
        if parts[0] in ("work_dir", "name"):
            target, last = doc.setdefault("pipeline", {}), parts[0]
        elif parts[0] == "sweep":
            target, last = doc.setdefault("sweep", {}), parts[-1]
        else:
            if len(parts) != 2:
                raise ConfigError(f"--set {key}: use STAGE.OPTION=value (e.g. train.epochs=2)")
            if parts[0] not in doc.get("stages", {}):
                raise ConfigError(f"--set {key}: the pipeline has no stage {parts[0]!r}")
            target, last = doc["stages"][parts[0]], parts[1]
        target[last] = _parse_value(value.strip())
    return doc


def _substitute(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return re.sub(r"\{(work|run|variant)\}", lambda m: names[m.group(1)], value)
    if isinstance(value, list):
        return [_substitute(v, names) for v in value]
    return value


def _make_stage(name: str, table: dict[str, Any], names: dict[str, str], variant: dict[str, Any] | None) -> Stage:
    command = table.get("command", name)
    if command not in COMMANDS:
        raise ConfigError(f"stage {name!r}: unknown command {command!r}; expected one of {list(COMMANDS)}")
    options = {k: _substitute(v, names) for k, v in table.items() if k not in STAGE_KEYS}
    if variant:
        options.update({k: v for k, v in variant.items() if k != "name" and command == "train"})
    return Stage(
        name=name,
        command=command,
        options=options,
        args=tuple(_substitute(table.get("args", []), names)),
        launcher=tuple(table.get("launcher", [])),
        variant=variant["name"] if variant else None,
    )


def _variants(doc: dict[str, Any]) -> tuple[list[dict[str, Any]], set[str]]:
    sweep = doc.get("sweep")
    if not sweep:
        return [], set()
    variants, stages = sweep.get("variants", []), set(sweep.get("stages", ["train", "eval"]))
    names = [v.get("name") for v in variants]
    if not variants or None in names or len(set(names)) != len(names):
        raise ConfigError("[sweep] needs a non-empty list of variants, each with a unique name")
    unknown = stages - set(doc.get("stages", {}))
    if unknown:
        raise ConfigError(f"[sweep] stages {sorted(unknown)} are not stages of the pipeline")
    parallel = sweep.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise ConfigError(f"[sweep] parallel must be an integer >= 1 (got {parallel!r})")
    return variants, stages


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Parse, override and expand a pipeline file (sweep stages repeated once per variant, in file order).

    `path` is a file, or the name of a shipped pipeline (`demo`, `ssv2-tsm-r50-8f`); ConfigError when neither."""
    p = find_pipeline(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: pipeline file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc})") from exc
    unknown = set(doc) - {"pipeline", "stages", "sweep"}
    if unknown or "stages" not in doc:
        raise ConfigError(f"{p}: expected tables [pipeline], [stages.*] and optionally [sweep]; got {sorted(doc)}")
    doc = apply_overrides(doc, overrides or [])
    meta = doc.get("pipeline", {})
    name = str(meta.get("name", p.stem))
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"{p}: pipeline name {name!r} may hold only letters, digits, '.', '_' and '-'")
    work = Path(meta.get("work_dir", "runs"))
    variants, swept = _variants(doc)
    stages: list[Stage] = []
    for stage_name, table in doc["stages"].items():
        for v in variants if stage_name in swept else [None]:
            run = work / name / v["name"] if v else work / name
            names = {"work": str(work), "run": str(run), "variant": v["name"] if v else ""}
            stages.append(_make_stage(stage_name, table, names, v))
    if swept:  # run each variant's stages together: train a, eval a, train b, eval b
        first = next(i for i, s in enumerate(stages) if s.variant is not None)
        fixed_before, rest = stages[:first], stages[first:]
        order = [v["name"] for v in variants]
        swept_stages = sorted((s for s in rest if s.variant), key=lambda s: order.index(s.variant or ""))
        stages = fixed_before + swept_stages + [s for s in rest if not s.variant]
    parallel = int(doc.get("sweep", {}).get("parallel", 1)) if variants else 1
    return Pipeline(name, work, stages, [v["name"] for v in variants], p, parallel)


def _record_path(pipeline: Pipeline, stage: Stage) -> Path:
    return pipeline.work_dir / RECORD_DIR / pipeline.name / f"{stage.key}.json"


def stage_log(pipeline: Pipeline, stage: Stage) -> Path:
    """Where a stage of a parallel sweep writes its output (the others write to the terminal)."""
    return _record_path(pipeline, stage).with_suffix(".log")


def stage_status(pipeline: Pipeline, stage: Stage) -> str:
    """`done` (recorded with this exact command), `changed` (recorded with another) or `pending`."""
    path = _record_path(pipeline, stage)
    if not path.is_file():
        return "pending"
    record = json.loads(path.read_text(encoding="utf-8"))
    return "done" if record.get("argv")[1:] == stage.argv()[1:] else "changed"


def select_stages(pipeline: Pipeline, *, from_stage: str | None = None, only: str | None = None) -> list[Stage]:
    """The stages to consider: all, from one on (`--from`), or one (`--only`); names may carry `@variant`."""
    names = [s.name for s in pipeline.stages] + [s.key for s in pipeline.stages]
    for wanted in (from_stage, only):
        if wanted is not None and wanted not in names:
            raise ConfigError(
                f"no stage {wanted!r}; stages: {', '.join(dict.fromkeys(s.key for s in pipeline.stages))}"
            )
    if only is not None:
        return [s for s in pipeline.stages if only in (s.name, s.key)]
    if from_stage is not None:
        start = next(i for i, s in enumerate(pipeline.stages) if from_stage in (s.name, s.key))
        return pipeline.stages[start:]
    return list(pipeline.stages)


# Stage processes still running, so that a stopped `run` stops them too. Each runs in its own process group (the
# whole group of a torchrun stage is stopped at once), which also keeps the terminal's Ctrl-C away from them: the
# parent forwards it and then waits for them, so nothing outlives the parent.
_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()
STOP_GRACE_S = 10.0


class _StopRequested(Exception):
    """The pipeline is stopping; no new stage starts."""


def _run_child(argv: list[str], **kwargs: Any) -> int:
    with _LIVE_LOCK:
        if _STOPPING.is_set():
            raise _StopRequested(f"not starting {argv[0]}: the pipeline is stopping")
        proc = subprocess.Popen(argv, process_group=0, **kwargs)
        _LIVE.add(proc)
    try:
        return proc.wait()
    except BaseException as exc:  # Ctrl-C or SIGTERM (as KeyboardInterrupt) while waiting: the stage stops too
        _stop([proc], _signal_of(exc), STOP_GRACE_S)
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc)


def _signal_of(exc: BaseException) -> int:
    """The signal to pass on to stages for `exc`: the one that stopped us (the CLI's SIGTERM carries `signum`)."""
    return getattr(exc, "signum", signal.SIGINT) if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM


def stop_stages(sig: int = signal.SIGINT, grace_s: float = STOP_GRACE_S) -> None:
    """Stop every running stage and start no new one: `sig` to each stage's process group, SIGKILL to the group
    after `grace_s`; returns once they are gone."""
    with _LIVE_LOCK:
        _STOPPING.set()
        procs = list(_LIVE)
    _stop(procs, sig, grace_s)


def _stop(procs: list[subprocess.Popen[bytes]], sig: int, grace_s: float) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    deadline = time.monotonic() + grace_s
    try:
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        # After the grace time, or at once on a second Ctrl-C: SIGKILL to what is left of each group, stray
        # grandchildren of a finished stage included.
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_stage(pipeline: Pipeline, stage: Stage, *, threads: int | None = None) -> float:
    """Run one stage's process and record it when it exits 0. Returns seconds.

    Output goes to this terminal, or, with `threads` (a parallel sweep), to the stage's log file next to its record,
    and the process gets `OMP_NUM_THREADS=threads` unless the environment already sets it."""
    argv = stage.argv()
    env, log_path = None, None
    if threads is not None:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
        log_path = stage_log(pipeline, stage)
        log_path.parent.mkdir(parents=True, exist_ok=True)
    started, start_unix = time.strftime("%Y-%m-%dT%H:%M:%S"), time.time()
    start = time.perf_counter()
    if log_path is None:
        returncode = _run_child(argv)
    else:
        with log_path.open("w", encoding="utf-8") as out:
            returncode = _run_child(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if returncode != 0:
        where = f"; its output is in {log_path}" if log_path else ""
        raise StageFailedError(
            f"stage {stage.key} failed (exit {returncode}){where}; fix the cause and re-run: finished stages are "
            "skipped and this one resumes"
        )
    atomic_write_json(
        _record_path(pipeline, stage),
        {
            "stage": stage.key,
            "argv": argv,
            "seconds": round(seconds, 2),
            "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "start_unix": round(start_unix, 3),
            "end_unix": round(time.time(), 3),
        },
    )
    return seconds


def _groups(stages: list[Stage], parallel: int) -> list[list[list[Stage]]]:
    """Split the stages into groups run one after another; a group is a list of chains run side by side.

    Without parallelism every stage is its own group. With it, each run of consecutive swept stages becomes one
    group holding one chain per variant (its stages in order)."""
    groups: list[list[list[Stage]]] = []
    for stage in stages:
        if parallel > 1 and stage.variant is not None and groups and groups[-1][0][0].variant is not None:
            chains = groups[-1]
            chain = next((c for c in chains if c[0].variant == stage.variant), None)
            if chain is None:
                chains.append([stage])
            else:
                chain.append(stage)
        else:
            groups.append([[stage]])
    return groups


def run_pipeline(
    pipeline: Pipeline,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    force: bool | None = None,
    on_stage: Callable[[Stage, str], None] | None = None,
    on_state: Callable[[Stage, str, Path | None], None] | None = None,
) -> list[tuple[Stage, str]]:
    """Run the selected stages, skipping those recorded as done unless forced.

    `force` defaults to True when `from_stage` or `only` is given (the CLI's `--from`/`--only` re-run stages).
    Returns (stage, what happened: "skipped" or "ran") per stage, in plan order; `on_stage(stage, status)` is
    called before each. Sweep variants run `pipeline.parallel` at a time; when a chain fails the others finish
    their current chain and the first failure is raised.

    `on_state(stage, state, log)` follows each stage through "queued" (every stage of a group of parallel chains,
    before the group starts), "running", then "done", "failed" or "skipped" (recorded as done); `log` is the
    stage's log file in a parallel sweep, else None (its output goes to the terminal). It is called from the
    chains' threads.
    """
    forced = force if force is not None else (from_stage is not None or only is not None)
    selected = select_stages(pipeline, from_stage=from_stage, only=only)
    outcome: dict[str, str] = {}
    from ssv2prep.workers import cpu_count

    threads = max(1, cpu_count() // pipeline.parallel) if pipeline.parallel > 1 else None

    def state(stage: Stage, what: str, threads: int | None) -> None:
        if on_state:
            on_state(stage, what, stage_log(pipeline, stage) if threads is not None else None)

    def run_chain(chain: list[Stage], threads: int | None) -> None:
        for stage in chain:
            status = stage_status(pipeline, stage)
            if on_stage:
                on_stage(stage, status)
            if status == "done" and not forced:
                outcome[stage.key] = "skipped"
                state(stage, "skipped", threads)
                continue
            state(stage, "running", threads)
            try:
                run_stage(pipeline, stage, threads=threads)
            except BaseException:
                state(stage, "failed", threads)
                raise
            outcome[stage.key] = "ran"
            state(stage, "done", threads)

    _STOPPING.clear()
    try:
        for chains in _groups(selected, pipeline.parallel):
            if len(chains) == 1:
                run_chain(chains[0], threads if chains[0][0].variant is not None else None)
                continue
            for chain in chains:
                for stage in chain:
                    state(stage, "queued", threads)
            with ThreadPoolExecutor(max_workers=pipeline.parallel) as pool:
                futures = [pool.submit(run_chain, chain, threads) for chain in chains]
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                raise errors[0]  # type: ignore[misc]
    except BaseException as exc:
        # Ctrl-C, SIGTERM (the CLI raises it as a KeyboardInterrupt carrying `signum`) or a failed chain: the stages
        # still running get the same signal, then SIGKILL if they do not stop.
        stop_stages(_signal_of(exc))
        raise
    return [(stage, outcome[stage.key]) for stage in selected if stage.key in outcome]
