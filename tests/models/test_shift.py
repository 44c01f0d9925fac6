"""Tests of the temporal shift op, its module wrapper, and the shift benchmark."""

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ssv2prep.bench.shift import format_table, run_shift_bench
from ssv2prep.cli import main
from ssv2prep.errors import ConfigError
from ssv2prep.malloc import malloc_mode
from ssv2prep.models.shift import (
    SHIFT_ALL,
    SMALL_TENSOR_NUMEL,
    TemporalShift,
    shift_modules,
    shift_split,
    temporal_shift,
    temporal_shift_zeros_copy,
)

IMPLS = [temporal_shift, temporal_shift_zeros_copy]
MODES = ["bidirectional", "unidirectional"]


def _expected_split(channels: int, fold_div: int, mode: str) -> tuple[int, int]:
    """(from t+1, from t-1) channel counts, written from the documented convention."""
    if mode == "unidirectional":
        return 0, channels // fold_div
    if fold_div == 1:
        return (channels + 1) // 2, channels // 2
    return channels // fold_div, channels // fold_div


def _formula_shift(x: torch.Tensor, num_segments: int, fold_div: int, mode: str) -> torch.Tensor:
    """Element-by-element reference: out[n, t, c] = x[n, src(t, c), c], or 0 when src falls outside the clip."""
    nt, channels = x.shape[:2]
    x5 = x.view(nt // num_segments, num_segments, channels, *x.shape[2:])
    out = torch.zeros_like(x5)
    n_next, n_prev = _expected_split(channels, fold_div, mode)
    for t in range(num_segments):
        for c in range(channels):
            src = t + 1 if c < n_next else t - 1 if c < n_next + n_prev else t
            if 0 <= src < num_segments:
                out[:, t, c] = x5[:, src, c]
    return out.view(x.shape)


def _frames(t_values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(t_values, dtype=torch.float32).view(len(t_values), -1, 1, 1)


# x[t, c] = 10 t + c + 1 for N=1, T=3, C=4, H=W=1; the expectations below are worked out by hand.
HAND_INPUT = [[1, 2, 3, 4], [11, 12, 13, 14], [21, 22, 23, 24]]
HAND_CASES = [
    ("bidirectional", 4, [[11, 0, 3, 4], [21, 2, 13, 14], [0, 12, 23, 24]]),
    ("unidirectional", 4, [[0, 2, 3, 4], [1, 12, 13, 14], [11, 22, 23, 24]]),
    ("bidirectional", SHIFT_ALL, [[11, 12, 0, 0], [21, 22, 3, 4], [0, 0, 13, 14]]),
    ("bidirectional", 2, [[11, 12, 0, 0], [21, 22, 3, 4], [0, 0, 13, 14]]),
    ("unidirectional", SHIFT_ALL, [[0, 0, 0, 0], [1, 2, 3, 4], [11, 12, 13, 14]]),
    ("unidirectional", 2, [[0, 0, 3, 4], [1, 2, 13, 14], [11, 12, 23, 24]]),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("mode", "fold_div", "expected"), HAND_CASES)
def test_shift_hand_computed(impl, mode, fold_div, expected):
    out = impl(_frames(HAND_INPUT), 3, fold_div, mode)
    assert torch.equal(out, _frames(expected))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fold_div", [8, 4, 3, 2, SHIFT_ALL])
@pytest.mark.parametrize("shape", [(2, 3, 16, 5, 4), (1, 4, 7, 3, 3), (3, 1, 8, 2, 2)])
def test_shift_matches_formula(impl, mode, fold_div, shape):
    n, t, c, h, w = shape
    x = torch.randn(n * t, c, h, w)
    assert torch.equal(impl(x, t, fold_div, mode), _formula_shift(x, t, fold_div, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fold_div", [8, SHIFT_ALL])
def test_shift_large_tensor_path_equals_reference(mode, fold_div):
    # Above SMALL_TENSOR_NUMEL the op takes the write-once path; values and gradients must not change.
    x = torch.randn(2 * 4, 64, 24, 24)
    assert x.numel() > SMALL_TENSOR_NUMEL
    ref = temporal_shift_zeros_copy(x, 4, fold_div, mode)
    assert torch.equal(temporal_shift(x, 4, fold_div, mode), ref)
    grad_out = torch.randn_like(x)
    grads = []
    for impl in IMPLS:
        xg = x.clone().requires_grad_(True)
        impl(xg, 4, fold_div, mode).backward(grad_out)
        grads.append(xg.grad)
    assert torch.equal(grads[0], grads[1])


def test_shift_counts_moved_channels():
    assert shift_split(256, 8, "bidirectional") == (32, 32)
    assert shift_split(256, 8, "unidirectional") == (0, 32)
    assert shift_split(7, SHIFT_ALL, "bidirectional") == (4, 3)
    assert shift_split(7, SHIFT_ALL, "unidirectional") == (0, 7)
    assert shift_split(3, 8, "bidirectional") == (0, 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fold_div", [4, SHIFT_ALL])
def test_shift_gradcheck(mode, fold_div):
    x = torch.randn(2 * 3, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: temporal_shift(t, 3, fold_div, mode), (x,))
    assert torch.autograd.gradgradcheck(lambda t: temporal_shift(t, 3, fold_div, mode), (x,))


def test_shift_gradient_is_reverse_shift():
    # d(sum(w * shift(x)))/dx moves w back: the channel read from t+1 at t sends its gradient to t+1.
    x = _frames(HAND_INPUT).requires_grad_(True)
    weights = _frames([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    (temporal_shift(x, 3, 4, "bidirectional") * weights).sum().backward()
    assert torch.equal(x.grad, _frames([[0, 6, 3, 4], [1, 10, 7, 8], [5, 0, 11, 12]]))


def test_shift_non_contiguous_input():
    x = torch.randn(2 * 4, 16, 5, 5)
    x_cl = x.to(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    assert torch.equal(temporal_shift(x_cl, 4, 8, "bidirectional"), temporal_shift_zeros_copy(x, 4, 8, "bidirectional"))


CL = torch.channels_last


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fold_div", [8, 4, 3, 2, SHIFT_ALL])
@pytest.mark.parametrize("shape", [(2, 3, 16, 5, 4), (1, 4, 64, 34, 34)])  # the second takes the write-once path
def test_shift_keeps_channels_last_and_values(impl, mode, fold_div, shape):
    n, t, c, h, w = shape
    x = torch.randn(n * t, c, h, w).to(memory_format=CL)
    assert not x.is_contiguous()
    out = impl(x, t, fold_div, mode)
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()
    assert out.stride() == x.stride()
    assert torch.equal(out, _formula_shift(x.contiguous(), t, fold_div, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fold_div", [8, SHIFT_ALL])
@pytest.mark.parametrize("size", [5, 34])  # small and write-once paths, also for the backward shift
def test_shift_gradient_keeps_channels_last_and_is_the_reference_gradient(mode, fold_div, size):
    x = torch.randn(2 * 4, 64, size, size).to(memory_format=CL).requires_grad_(True)
    grad_out = torch.randn(x.shape).to(memory_format=CL)
    (grad,) = torch.autograd.grad(temporal_shift(x, 4, fold_div, mode), x, grad_out)
    assert grad.is_contiguous(memory_format=CL) and not grad.is_contiguous()
    xr = x.detach().contiguous().requires_grad_(True)
    (_formula_shift(xr, 4, fold_div, mode) * grad_out.contiguous()).sum().backward()
    assert torch.equal(grad, xr.grad)


def test_shift_of_a_channels_last_conv_output_feeds_the_next_conv_without_layout_change():
    torch.manual_seed(0)
    conv_in, conv_out = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)
    net = nn.Sequential(conv_in, TemporalShift(conv_out, num_segments=4, fold_div=8)).to(memory_format=CL)
    x = torch.randn(2 * 4, 3, 8, 8).to(memory_format=CL)
    shifted = temporal_shift(conv_in(x), 4, 8)
    assert shifted.is_contiguous(memory_format=CL)
    ref = conv_out(_formula_shift(conv_in(x).contiguous(), 4, 8, "bidirectional"))
    assert torch.allclose(net(x), ref, atol=1e-5)


def test_shift_of_a_non_dense_input_equals_the_reference():
    # a channel slice is neither contiguous nor channels-last: the output is a plain contiguous tensor
    x = torch.randn(2 * 4, 32, 5, 5)[:, 8:24]
    out = temporal_shift(x, 4, 8, "bidirectional")
    assert out.is_contiguous() and torch.equal(out, _formula_shift(x.contiguous(), 4, 8, "bidirectional"))


def test_shift_rejects_bad_arguments():
    x = torch.randn(6, 8, 2, 2)
    with pytest.raises(ConfigError, match="shift mode"):
        temporal_shift(x, 3, 8, "sideways")
    with pytest.raises(ConfigError, match="fold_div"):
        temporal_shift(x, 3, 0, "bidirectional")
    with pytest.raises(ValueError, match="multiple of T=4"):
        temporal_shift(x, 4, 8, "bidirectional")
    with pytest.raises(ValueError, match=r"\(N\*T, C, H, W\)"):
        temporal_shift(torch.randn(6, 8), 3, 8, "bidirectional")


def test_temporal_shift_module_wraps_net_as_net():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 4, kernel_size=1, bias=False)
    module = TemporalShift(conv, num_segments=4, fold_div=8, mode="unidirectional")
    assert list(module.state_dict()) == ["net.weight"]
    x = torch.randn(2 * 4, 16, 3, 3)
    expected = conv(_formula_shift(x, 4, 8, "unidirectional"))
    assert torch.allclose(module(x), expected, atol=1e-6)
    copying = TemporalShift(conv, num_segments=4, fold_div=8, mode="unidirectional", impl="zeros_copy")
    assert shift_modules(nn.Sequential(copying)) == [copying]
    assert torch.allclose(copying(x), expected, atol=1e-6)
    with pytest.raises(ConfigError, match="implementation"):
        TemporalShift(conv, num_segments=4, fold_div=8, mode="unidirectional", impl="cuda_kernel")


def test_shift_bench_structure_and_ratios():
    result = run_shift_bench(backbones=("resnet18",), segments=4, size=64, batch_sizes=(1,), repeats=1, warmup=0)
    rows = result["rows"]
    # no shift + 4 shift amounts x 2 modes x 2 places x 2 implementations
    assert len(rows) == 1 + 4 * 2 * 2 * 2
    assert rows[0]["shift_div"] == 0 and rows[0]["impl"] is None
    assert {(r["shift_div"], r["shift_mode"], r["shift_place"], r["impl"]) for r in rows[1:]} == {
        (d, m, p, i) for d in (8, 4, 2, 1) for m in MODES for p in ("blockres", "block") for i in ("fast", "zeros_copy")
    }
    base = rows[0]["median_ms"]
    official = {
        (r["shift_div"], r["shift_mode"], r["shift_place"]): r["median_ms"] for r in rows if r["impl"] == "zeros_copy"
    }
    for r in rows:
        assert r["median_ms"] > 0 and r["ms_per_clip"] == pytest.approx(r["median_ms"] / r["batch_size"])
        assert r["overhead_vs_no_shift"] == pytest.approx(r["median_ms"] / base)
        if r["impl"] == "fast":
            key = (r["shift_div"], r["shift_mode"], r["shift_place"])
            assert r["ours_over_official"] == pytest.approx(r["median_ms"] / official[key])
        else:
            assert r["ours_over_official"] is None
        # time inside the shifts: none without a shift, a positive part of the whole call otherwise
        assert (r["shift_ms"] == 0) == (r["shift_div"] == 0)
        assert r["shift_ms"] < r["median_ms"] and r["shift_overhead"] == pytest.approx(r["shift_ms"] / base)
        # one allocator mode (this process's): faults counted, no cross-mode ratio
        assert r["malloc"] == malloc_mode() and r["faults_per_call"] >= 0 and r["kept_over_system"] is None
    assert result["settings"]["malloc_modes"] == [malloc_mode()]
    ops = result["op_rows"]
    assert len(ops) == 2 * 2 * 2 and all(r["shape"] == [4, 256, 16, 16] for r in ops)
    for r in ops:
        if r["impl"] == "fast":
            ref = next(
                o
                for o in ops
                if o["impl"] == "zeros_copy" and o["pass"] == r["pass"] and o["shift_mode"] == r["shift_mode"]
            )
            assert r["ours_over_official"] == pytest.approx(r["median_ms"] / ref["median_ms"])
    table = format_table(result)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(rows) + 1 + 2 + len(ops)
    assert lines[2].startswith(f"| resnet18 | 1 | {malloc_mode()} | none (TSN) |")
    assert sum("| all |" in line for line in lines) == 8


def test_shift_bench_subset_and_both_allocators_in_one_run():
    result = run_shift_bench(
        backbones=("resnet18",),
        segments=4,
        size=32,
        batch_sizes=(2,),
        repeats=1,
        warmup=0,
        shift_divs=(8,),
        shift_modes=("unidirectional",),
        shift_places=("blockres",),
        malloc_modes=("kept", "system"),
    )
    rows, ops = result["rows"], result["op_rows"]
    # per allocator: no shift + 1/8 unidirectional blockres with both implementations; ops: 2 passes x 2 impls
    for mode in ("kept", "system"):
        mine = [(r["shift_div"], r["shift_mode"], r["impl"]) for r in rows if r["malloc"] == mode]
        assert mine == [(0, None, None), (8, "unidirectional", "fast"), (8, "unidirectional", "zeros_copy")]
        assert len([o for o in ops if o["malloc"] == mode]) == 4
    assert len(rows) == 6 and len(ops) == 8
    system = {(r["shift_div"], r["impl"]): r["median_ms"] for r in rows if r["malloc"] == "system"}
    for r in rows:
        if r["malloc"] == "kept":
            assert r["kept_over_system"] == pytest.approx(r["median_ms"] / system[(r["shift_div"], r["impl"])])
        else:
            assert r["kept_over_system"] is None
        assert r["batch_size"] == 2 and r["overhead_vs_no_shift"] > 0
    assert result["settings"]["malloc_modes"] == ["kept", "system"]
    assert "| kept |" in format_table(result) and "| system |" in format_table(result)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--shift-divs", "3"], "shift_divs must be a non-empty subset of [8, 4, 2, 1]"),
        (["--places", "stem"], "shift_places must be"),
        (["--malloc-modes", "tcmalloc"], "malloc_modes must be"),
    ],
)
def test_shift_bench_rejects_unknown_choices_in_one_line(args, needle):
    result = CliRunner().invoke(main, ["bench", "shift", "--backbones", "resnet18", *args])
    assert result.exit_code == ConfigError.exit_code and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], result.stderr


def test_shift_bench_rejects_a_non_integer_list():
    result = CliRunner().invoke(main, ["bench", "shift", "--batch-sizes", "1,eight"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "--batch-sizes" in result.stderr and "'1,eight'" in result.stderr


def test_compiled_shift_takes_one_path_at_every_size() -> None:
    """Under torch.compile small inputs take the write-once path too (no size-dependent branch to guard on), with
    the reference values."""
    graphs: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda x: temporal_shift(x, 4, 8), backend=recording_backend, dynamic=False)
    small = torch.randn(8, 16, 4, 4)
    assert small.numel() < SMALL_TENSOR_NUMEL
    for x in (small, torch.randn(8, 64, 32, 32)):
        torch.testing.assert_close(fn(x), temporal_shift(x, 4, 8))
    assert len(graphs) == 2 and all("empty_like" in g and "zeros" not in g for g in graphs)
