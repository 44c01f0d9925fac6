"""Benchmark: what the temporal shift costs in a TSM forward pass, and our shift op vs the official one.

For each backbone and batch size it times one clip batch through TSN (no shift, the baseline) and through TSM
with shift_div 8, 4, 2 and all channels, bidirectional and unidirectional, blockres and block, each with our
shift (`temporal_shift`) and with the official zeros-then-copy shift (`temporal_shift_zeros_copy`). All variants
of a placement share one model (same weights); the shift settings are switched between calls. Repetitions are
interleaved round-robin across variants so machine noise hits all of them alike, and medians are reported.
It also times the bare shift op on a ResNet-50 layer1-sized tensor, forward and forward+backward.

Every call also counts the process's minor page faults. With the C library's default allocator every large
activation is a fresh `mmap`, so a forward pass spends much of its time faulting in pages, and a shift that
allocates one more tensor pays for that tensor's pages too; `ssv2prep.malloc` explains the fix the commands use
(`--malloc kept`). `--malloc-modes kept,system` times both allocators in one run (the one this process does not
use in a fresh interpreter) and adds `kept_over_system` per row.

Whole-network medians scatter by several percent on a shared CPU, more than the shift costs, so every model call
also measures the time spent inside the shifts themselves: a forward pre-hook on each shift module and one on the
module it wraps bracket exactly the shift (the wrapped module starts when the shift has returned). `shift_ms` is
the median of that sum per call; `shift_overhead` = shift_ms / the no-shift median is the overhead estimate that
does not depend on subtracting two noisy totals.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ssv2prep.errors import ConfigError
from ssv2prep.malloc import KEPT, SYSTEM, configure_malloc, malloc_mode, minor_page_faults
from ssv2prep.malloc import MODES as MALLOC_MODES
from ssv2prep.models.shift import (
    BIDIRECTIONAL,
    SHIFT_ALL,
    SHIFT_IMPLS,
    UNIDIRECTIONAL,
    ShiftFn,
    shift_modules,
)
from ssv2prep.models.tsm import SHIFT_PLACES, TSM, ModelConfig, build_tsm

log = logging.getLogger(__name__)

SHIFT_DIVS = (8, 4, 2, SHIFT_ALL)
SHIFT_MODES_BENCHED = (BIDIRECTIONAL, UNIDIRECTIONAL)
OURS, OFFICIAL = "fast", "zeros_copy"
OP_CHANNELS = 256  # ResNet-50 layer1 block input: (N*T, 256, size/4, size/4)

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class _Variant:
    shift_div: int  # 0 = no shift
    shift_mode: str | None
    shift_place: str | None
    impl: str | None


def _variants(divs: Sequence[int], modes: Sequence[str], places: Sequence[str]) -> list[_Variant]:
    shifted = [
        _Variant(div, mode, place, impl)
        for place, div, mode, impl in itertools.product(places, divs, modes, (OURS, OFFICIAL))
    ]
    return [_Variant(0, None, None, None), *shifted]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_models(backbone: str, segments: int, device: torch.device, places: Sequence[str]) -> dict[str | None, TSM]:
    """One eval model per placement (plus the TSN baseline under key None), all from the same seed."""
    models: dict[str | None, TSM] = {}
    for place in (None, *places):
        torch.manual_seed(0)
        cfg = ModelConfig(
            backbone=backbone, num_segments=segments, shift_div=8 if place else 0, shift_place=place or "blockres"
        )
        models[place] = build_tsm(cfg).to(device).eval()
    return models


def _configure(model: TSM, variant: _Variant) -> None:
    """Point every shift module of `model` at the variant's fold, mode and implementation."""
    for module in shift_modules(model):
        module.fold_div, module.mode, module.impl = variant.shift_div, variant.shift_mode, variant.impl


Timed = tuple[Callable[[], object] | None, Callable[[], object]]  # (untimed preparation, timed call)


@dataclass(frozen=True, slots=True)
class _Medians:
    seconds: list[float]  # per call
    inside: list[float]  # per call, seconds read from `inner` (zeros without it)
    faults: list[float]  # per call, minor page faults of the process during the call


def _round_robin(
    calls: Sequence[Timed],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    on_progress: ProgressFn | None,
    inner: Callable[[], float] | None = None,
) -> _Medians:
    """Medians of each call, timing the calls in turn `warmup + repeats` times (warm-up rounds discarded).

    `inner`, when given, is read after each call (seconds measured inside it, then reset)."""
    times: list[list[float]] = [[] for _ in calls]
    inside: list[list[float]] = [[] for _ in calls]
    faults: list[list[float]] = [[] for _ in calls]
    rounds = warmup + repeats
    for rnd in range(rounds):
        for i, (prepare, call) in enumerate(calls):
            if prepare is not None:
                prepare()
            _sync(device)
            if inner is not None:
                inner()
            faults_before = minor_page_faults()
            start = time.perf_counter()
            call()
            _sync(device)
            elapsed = time.perf_counter() - start
            if rnd >= warmup:
                times[i].append(elapsed)
                faults[i].append(minor_page_faults() - faults_before)
                inside[i].append(inner() if inner is not None else 0.0)
        if on_progress is not None:
            on_progress(rnd + 1, rounds)
    return _Medians(*([statistics.median(v) for v in values] for values in (times, inside, faults)))


class _ShiftTimer:
    """Sums the wall time spent inside the shift of every `TemporalShift` of some models (CPU: exact; CUDA: with
    a synchronisation at each bracket, so only meaningful for relative numbers)."""

    def __init__(self, models: Sequence[torch.nn.Module], device: torch.device) -> None:
        self.total = 0.0
        self._start = 0.0
        self._device = device
        self._handles = []
        for model in models:
            for module in shift_modules(model):
                self._handles.append(module.register_forward_pre_hook(self._enter))
                self._handles.append(module.net.register_forward_pre_hook(self._leave))

    def _enter(self, *_: object) -> None:
        _sync(self._device)
        self._start = time.perf_counter()

    def _leave(self, *_: object) -> None:
        _sync(self._device)
        self.total += time.perf_counter() - self._start

    def read_and_reset(self) -> float:
        """Seconds measured since the last call."""
        total, self.total = self.total, 0.0
        return total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _model_rows(
    backbone: str,
    batch_size: int,
    *,
    segments: int,
    size: int,
    models: dict[str | None, TSM],
    variants: list[_Variant],
    timing: dict[str, Any],
) -> list[dict[str, Any]]:
    clips = torch.randn(batch_size, segments, 3, size, size, device=timing["device"])

    def timed(variant: _Variant) -> Timed:
        model = models[variant.shift_place]

        def call() -> object:
            with torch.inference_mode():
                return model(clips)

        return (lambda: _configure(model, variant)), call

    timer = _ShiftTimer(list(models.values()), timing["device"])
    try:
        medians = _round_robin([timed(v) for v in variants], **timing, inner=timer.read_and_reset)
    finally:
        timer.remove()
    rows = [
        {
            "backbone": backbone,
            "batch_size": batch_size,
            "shift_div": v.shift_div,
            "shift_mode": v.shift_mode,
            "shift_place": v.shift_place,
            "impl": v.impl,
            "median_ms": m * 1e3,
            "ms_per_clip": m * 1e3 / batch_size,
            "shift_ms": s * 1e3,
            "faults_per_call": f,
        }
        for v, m, s, f in zip(variants, medians.seconds, medians.inside, medians.faults, strict=True)
    ]
    baseline = rows[0]["median_ms"]
    _add_ratios(rows, baseline_ms=baseline, key_fields=MODEL_CASE)
    official_shift = {_key(r, MODEL_CASE): r["shift_ms"] for r in rows if r["impl"] == OFFICIAL}
    for row in rows:
        ref = official_shift.get(_key(row, MODEL_CASE)) if row["impl"] == OURS else None
        row["shift_overhead"] = row["shift_ms"] / baseline
        row["shift_ours_over_official"] = row["shift_ms"] / ref if ref else None
    return rows


# The fields that tell a model row's shift settings apart, and an op row's case (rows of one backbone and batch).
MODEL_CASE = ("shift_div", "shift_mode", "shift_place")
OP_CASE = ("shape", "pass", "shift_mode")


def _key(row: dict[str, Any], fields: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(row.get(f)) for f in fields)


def _add_ratios(rows: list[dict[str, Any]], *, baseline_ms: float | None, key_fields: Sequence[str]) -> None:
    """Add `overhead_vs_no_shift` (time / baseline) and `ours_over_official` (ours / zeros-copy, same settings)."""
    official = {_key(r, key_fields): r["median_ms"] for r in rows if r["impl"] == OFFICIAL}
    for row in rows:
        if baseline_ms is not None:
            row["overhead_vs_no_shift"] = row["median_ms"] / baseline_ms
        row["ours_over_official"] = row["median_ms"] / official[_key(row, key_fields)] if row["impl"] == OURS else None


def _op_forward(shift: ShiftFn, x: torch.Tensor, segments: int, mode: str) -> Timed:
    def call() -> object:
        with torch.inference_mode():
            return shift(x, segments, 8, mode)

    return None, call


def _op_forward_backward(shift: ShiftFn, x: torch.Tensor, segments: int, mode: str) -> Timed:
    x_grad = x.clone().requires_grad_(True)
    grad_out = torch.randn_like(x)

    def prepare() -> None:
        x_grad.grad = None

    def call() -> object:
        shift(x_grad, segments, 8, mode).backward(grad_out)
        return x_grad.grad

    return prepare, call


# pass name -> builder of the timed call for one shift implementation and mode
OP_PASSES: dict[str, Callable[[ShiftFn, torch.Tensor, int, str], Timed]] = {
    "forward": _op_forward,
    "forward_backward": _op_forward_backward,
}


def _op_rows(
    batch_size: int, *, segments: int, size: int, modes: Sequence[str], timing: dict[str, Any]
) -> list[dict[str, Any]]:
    shape = (batch_size * segments, OP_CHANNELS, max(1, size // 4), max(1, size // 4))
    x = torch.randn(shape, device=timing["device"])
    cases = list(itertools.product(OP_PASSES, modes, (OURS, OFFICIAL)))
    calls = [OP_PASSES[p](SHIFT_IMPLS[impl], x, segments, mode) for p, mode, impl in cases]
    medians = _round_robin(calls, **timing)
    rows = [
        {"shape": list(shape), "pass": p, "shift_mode": mode, "impl": impl, "median_ms": m * 1e3, "faults_per_call": f}
        for (p, mode, impl), m, f in zip(cases, medians.seconds, medians.faults, strict=True)
    ]
    _add_ratios(rows, baseline_ms=None, key_fields=OP_CASE)
    return rows


def _check_choices(name: str, values: Sequence[Any], allowed: Sequence[Any]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigError(f"bench shift: {name} must be a non-empty subset of {list(allowed)}, got {list(values)}")


def _bench_in_process(
    backbones: Sequence[str],
    batch_sizes: Sequence[int],
    *,
    segments: int,
    size: int,
    variants: list[_Variant],
    places: Sequence[str],
    modes: Sequence[str],
    timing: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    for backbone in backbones:
        models = _build_models(backbone, segments, timing["device"], places)
        for batch_size in batch_sizes:
            log.info("timing %s, batch %d, T=%d, %dpx (malloc %s)", backbone, batch_size, segments, size, malloc_mode())
            rows += _model_rows(
                backbone, batch_size, segments=segments, size=size, models=models, variants=variants, timing=timing
            )
    op_rows = [
        row for b in batch_sizes for row in _op_rows(b, segments=segments, size=size, modes=modes, timing=timing)
    ]
    for row in (*rows, *op_rows):
        row["malloc"] = malloc_mode()
    return rows, op_rows


def _bench_in_child(malloc: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Entry point of a fresh interpreter (multiprocessing "spawn"): apply `malloc`, then bench in process."""
    configure_malloc(malloc)
    return run_shift_bench(**kwargs)


def _add_malloc_ratios(rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    """`kept_over_system`: a row's median / the same row's median under the system allocator (None without it)."""
    system = {_key(r, fields): r["median_ms"] for r in rows if r["malloc"] == SYSTEM}
    for row in rows:
        ref = system.get(_key(row, fields))
        row["kept_over_system"] = row["median_ms"] / ref if row["malloc"] == KEPT and ref else None


def run_shift_bench(
    *,
    backbones: Sequence[str] = ("resnet50",),
    segments: int = 8,
    size: int = 224,
    batch_sizes: Sequence[int] = (1, 8),
    repeats: int = 10,
    warmup: int = 2,
    device: str | torch.device = "cpu",
    shift_divs: Sequence[int] = SHIFT_DIVS,
    shift_modes: Sequence[str] = SHIFT_MODES_BENCHED,
    shift_places: Sequence[str] = SHIFT_PLACES,
    malloc_modes: Sequence[str] | None = None,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Time TSM forward latency per shift variant and the bare shift op (random weights; nothing downloaded).

    Args:
        backbones: backbone names (keys of `ssv2prep.models.tsm.BACKBONES`).
        segments: T, frames per clip.
        size: frame height and width in pixels.
        batch_sizes: clips per forward call.
        repeats: timed rounds per variant (medians are reported).
        warmup: untimed rounds before them.
        device: where to run ("cpu", "cuda", ...).
        shift_divs, shift_modes, shift_places: the shifted variants to time (each also with both implementations).
        malloc_modes: allocator modes to time (`ssv2prep.malloc.MODES`); None = this process's mode only. A mode
            other than this process's runs in a fresh interpreter (an allocator setting cannot be undone).
        on_progress: called with `(rounds_done, rounds_total)` after every round of each timing group (in this
            process only).

    Returns:
        `{"settings": {...}, "rows": [...], "op_rows": [...]}`. A model row has backbone, batch_size, shift_div
        (0 = no shift, 1 = all channels), shift_mode, shift_place, impl ("fast" = ours, "zeros_copy" = official,
        None for no shift), malloc, median_ms, ms_per_clip, faults_per_call (median minor page faults),
        shift_ms (median time inside the shifts), shift_overhead (shift_ms / the no-shift median),
        overhead_vs_no_shift (median / the no-shift median of the same backbone, batch size and malloc mode),
        ours_over_official (our median / the official median of the same settings, None on other rows),
        shift_ours_over_official (the same for shift_ms) and kept_over_system (median / the same row's median
        under the system allocator, when both were timed). An op row has shape, pass, shift_mode, impl, malloc,
        median_ms, faults_per_call, ours_over_official and kept_over_system.

    Raises:
        ConfigError: for an unknown shift option or malloc mode.
    """
    _check_choices("shift_divs", shift_divs, SHIFT_DIVS)
    _check_choices("shift_modes", shift_modes, SHIFT_MODES_BENCHED)
    _check_choices("shift_places", shift_places, SHIFT_PLACES)
    modes = list(malloc_modes) if malloc_modes is not None else [malloc_mode()]
    _check_choices("malloc_modes", modes, MALLOC_MODES)
    kwargs: dict[str, Any] = {
        "backbones": list(backbones),
        "segments": segments,
        "size": size,
        "batch_sizes": list(batch_sizes),
        "repeats": repeats,
        "warmup": warmup,
        "device": str(device),
        "shift_divs": list(shift_divs),
        "shift_modes": list(shift_modes),
        "shift_places": list(shift_places),
    }
    dev = torch.device(device)
    timing = {"repeats": repeats, "warmup": warmup, "device": dev, "on_progress": on_progress}
    variants = _variants(shift_divs, shift_modes, shift_places)
    rows: list[dict[str, Any]] = []
    op_rows: list[dict[str, Any]] = []
    for mode in modes:
        if mode == malloc_mode():
            mode_rows, mode_ops = _bench_in_process(
                backbones,
                batch_sizes,
                segments=segments,
                size=size,
                variants=variants,
                places=shift_places,
                modes=shift_modes,
                timing=timing,
            )
        else:
            log.info("timing with malloc %s in a fresh interpreter", mode)
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                child = pool.apply(_bench_in_child, (mode, kwargs))
            mode_rows, mode_ops = child["rows"], child["op_rows"]
        rows += mode_rows
        op_rows += mode_ops
    _add_malloc_ratios(rows, ("backbone", "batch_size", *MODEL_CASE, "impl"))
    _add_malloc_ratios(op_rows, (*OP_CASE, "impl"))
    settings = {
        **kwargs,
        "malloc_modes": modes,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return {"settings": settings, "rows": rows, "op_rows": op_rows}


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _shift_label(row: dict[str, Any]) -> str:
    if row["shift_div"] == 0:
        return "none (TSN)"
    return "all" if row["shift_div"] == SHIFT_ALL else f"1/{row['shift_div']}"


def _faults(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown tables of a `run_shift_bench` result: model latency rows, then the bare shift op rows."""
    lines = [
        "| backbone | batch | malloc | shift | mode | place | impl | median ms | ms/clip | faults/call | vs no shift "
        "| ours/official | shift ms inside | shift overhead | shift ours/official | kept/system |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['backbone']} | {r['batch_size']} | {r['malloc']} | {_shift_label(r)} | {r['shift_mode'] or ''} | "
            f"{r['shift_place'] or ''} | {r['impl'] or ''} | {r['median_ms']:.2f} | {r['ms_per_clip']:.2f} | "
            f"{_faults(r['faults_per_call'])} | {_fmt(r['overhead_vs_no_shift'], '.3f')} | "
            f"{_fmt(r['ours_over_official'], '.3f')} | {r['shift_ms']:.2f} | {100 * r['shift_overhead']:.2f}% | "
            f"{_fmt(r['shift_ours_over_official'], '.3f')} | {_fmt(r['kept_over_system'], '.3f')} |"
        )
    lines += [
        "",
        "| shift op shape | malloc | pass | mode | impl | median ms | faults/call | ours/official | kept/system |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["op_rows"]:
        shape = "x".join(str(d) for d in r["shape"])
        lines.append(
            f"| {shape} | {r['malloc']} | {r['pass']} | {r['shift_mode']} | {r['impl']} | {r['median_ms']:.3f} | "
            f"{_faults(r['faults_per_call'])} | {_fmt(r['ours_over_official'], '.3f')} | "
            f"{_fmt(r['kept_over_system'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"
