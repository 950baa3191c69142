"""Compiled CPU kernels (llamarun.kernels) against plain torch references, and the portable fallback.

The kernels quantize each 32-block of an activation row to int16, so the exact reference is: dequantized
weight @ dequantized activation (built from the kernel's own activation quantization, ``quantize_act``);
that must match to float rounding. Against unquantized activations the error must stay within int16
activation rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llamarun import kernels
from llamarun import quantize as Q

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.reason()}")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

M_VALUES = [1, 3, 17, 64]


def _reference(x: torch.Tensor, qt: Q.QuantizedTensor) -> torch.Tensor:
    """What the integer kernel computes, in float64: the weight as stored, the activations as the kernel
    quantizes them (int16 per 32-block), plus (int4) the min term on the exact activations."""
    k = qt.shape[1]
    x2 = x.reshape(-1, k)
    q, d, s = torch.ops.llamarun.quantize_act(x2)
    xr = (q.double().view(-1, k // 32, 32) * d.double()[..., None]).view(-1, k)
    if qt.mode == "int8":
        return (xr @ qt.dequantize(torch.float64).t()).view(*x.shape[:-1], -1)
    n = qt.shape[0]
    g = qt.group_size
    qv = Q._unpack_int4(qt.qweight).double().view(n, k // g, g)
    scaled = (qv * qt.scales_f16().double()[..., None]).view(n, k)
    mins = qt.mins_f16().double()[..., None].expand(n, k // g, g).reshape(n, k)
    return (xr @ scaled.t() + x2.double() @ mins.t()).view(*x.shape[:-1], -1)


def _assert_act_rounding(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y = x @ w^T up to int16 rounding of x: |err[m, n]| = |(x_m - xq_m) . w_n| <= ||x_m - xq_m|| ||w_n||,
    and per-32-block int16 rounding keeps ||x_m - xq_m|| under 1e-4 of ||x_m|| (bound with margin: 1e-3)."""
    x2, w = x.reshape(-1, x.shape[-1]).double(), w.double()
    err = (y.reshape(x2.shape[0], -1).double() - x2 @ w.t()).abs()
    assert (err <= 1e-3 * x2.norm(dim=-1, keepdim=True) * w.norm(dim=-1) + 1e-5).all()


def _random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Rows of different magnitudes and a few outliers, like real projections.
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.1
    w[torch.rand(n, k, generator=g) < 0.002] *= 20
    return w


@needs_kernels
@pytest.mark.parametrize("mode,n,k,g", [
    ("int8", 96, 576, None), ("int8", 50, 64, 32), ("int8", 7, 96, 32), ("int8", 33, 1536, 64),
    ("int4", 96, 576, 32), ("int4", 50, 64, 32), ("int4", 7, 96, 32), ("int4", 33, 1536, 64), ("int4", 3, 192, 96),
])
@pytest.mark.parametrize("m", M_VALUES)
def test_kernel_matches_reference(mode, n, k, g, m):
    w = _random_weight(n, k, seed=n * 1000 + k)
    qt = Q.quantize_tensor(w, mode, g)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2
    layer = Q.make_linear(qt)
    y = layer._kernel(x)
    ref = _reference(x, qt)
    scale = ref.abs().max().item() + 1e-6
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert (y.double() - ref).abs().max().item() <= 2e-5 * scale
    _assert_act_rounding(y, x, qt.dequantize(torch.float64))  # and against float activations


needs_tiles = pytest.mark.skipif(not kernels.bf16_tiles(), reason="no bf16 tiles (AMX) on this CPU")


@needs_tiles
@pytest.mark.parametrize("mode,n,k,g", [
    ("int8", 96, 576, None), ("int8", 48, 64, 32), ("int4", 96, 576, 32), ("int4", 48, 1536, 64), ("int4", 16, 192, 96),
])
@pytest.mark.parametrize("m", [1, 6, 16, 17, 40])
def test_bf16_tiles_match_the_bf16_reference(mode, n, k, g, m):
    """The AMX path: x and the dequantized weight each rounded to bf16 once, products summed in float32.
    Below its row threshold the same op runs the integer kernel, bit for bit."""
    qt = Q.quantize_tensor(_random_weight(n, k, seed=n + k), mode, g)
    op, args = Q.make_linear(qt)._kernel_args()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2
    y = op(x, *args[:-1], 1)
    ref = x.bfloat16().double() @ qt.dequantize().bfloat16().double().t()
    assert y.shape == (m, n) and (y.double() - ref).abs().max().item() <= 1e-3 * (ref.abs().max().item() + 1e-6)
    assert not torch.equal(y, op(x, *args[:-1], 0))  # really another path than the integer kernel
    assert torch.equal(op(x, *args[:-1], m + 1), op(x, *args[:-1], 0))


@needs_tiles
def test_bf16_tiles_follow_the_dense_dtype_and_need_16_row_strips():
    """A layer uses the tiles from BATCH_MIN_ROWS rows on once its dense dtype is bf16 (as Llama.load sets
    it on such CPUs), never the dense path; output widths that are not a multiple of 16 keep the kernels."""
    layer = Q.make_linear(Q.quantize_tensor(_random_weight(64, 128, 3), "int4", 32))
    x = torch.randn(40, 128)
    fp32 = layer(x)
    layer.dense_dtype = torch.bfloat16
    assert layer.batch_rows == Q.BATCH_MIN_ROWS and layer._kernel_args()[1][-1] == Q.BATCH_MIN_ROWS
    tiles = layer(x)
    op, args = layer._kernel_args()
    assert torch.equal(tiles, op(x, *args)) and not torch.equal(tiles, fp32)
    torch.testing.assert_close(tiles, fp32, rtol=2e-2, atol=2e-2)
    small = x[: Q.BATCH_MIN_ROWS - 1]
    assert torch.equal(layer(small), op(small, *args[:-1], 0))
    layer.dense_dtype = torch.float32
    assert layer.batch_rows == 0 and torch.equal(layer(x), fp32)
    odd = Q.make_linear(Q.quantize_tensor(_random_weight(50, 128, 4), "int4", 32))
    op, args = odd._kernel_args()
    expected = _int8_reference(x, odd.qtensor)  # no tiles: the int8 batch products
    assert (op(x, *args[:-1], 1).double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def _int8_reference(x: torch.Tensor, qt) -> torch.Tensor:
    """What the int8 batch products compute, in float64: each 32-block of x rounded to int8 (scale amax /
    127, round half to even), times the stored weight (w = q * scale [+ min])."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    blocks = x2.view(x2.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # As the kernels round: x * (127 / amax) in float32 (x / d can land on the other side of a .5 tie), the
    # division a true one: torch computes `127 / t` as 127 * reciprocal(t), which rounds differently now and
    # then (seed 92 of test_int8_batches_follow_set_int8_batches: 104.5 against the kernels' 104.50001).
    q = torch.round(blocks * torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), 0))
    xq = (q.double() * (amax / 127).double()).view_as(x2)
    return xq @ qt.dequantize(torch.float64).t()


needs_int8 = pytest.mark.skipif(not kernels.int8_batches(), reason="no int8 batch products on this CPU")


def _skip_without_int8() -> None:
    if kernels.bf16_tiles():
        pytest.skip("this CPU takes batches to the bf16 tiles")
    if not kernels.int8_batches():
        pytest.skip("no int8 batch products on this CPU")


@needs_int8
@pytest.mark.parametrize("mode,n,k,g", [
    ("int8", 96, 576, None), ("int8", 48, 64, 32), ("int8", 40, 224, 32), ("int8", 33, 1536, 64),
    ("int4", 96, 576, 32), ("int4", 48, 1536, 64), ("int4", 16, 192, 96), ("int4", 7, 96, 32), ("int4", 50, 160, 32),
])
@pytest.mark.parametrize("m", [1, 6, 7, 15, 16, 40, 150])
def test_int8_batches_match_the_int8_reference(mode, n, k, g, m):
    """Without AMX tiles, batches from the op's row threshold on run with x rounded to int8 per 32-block:
    the same sums as the float64 reference of that rounding, block counts that are not a multiple of 4 or 8
    included (the tails are masked loads), and from ``kernels.gemm_min_rows()`` rows (16; 10 on Zen 5) through
    the int8 GEMM (16-row tiles; 150 rows: a partial tile and two passes of 8 tiles; output widths not a
    multiple of its 8 rows; with AVX2 the GEMM takes every batch, half tiles of 8 rows included). The error against float x stays near llama.cpp's (Q8
    activations). Below the threshold the same op runs the int16 kernel, bit for bit."""
    _skip_without_int8()
    qt = Q.quantize_tensor(_random_weight(n, k, seed=n + k), mode, g)
    op, args = Q.make_linear(qt)._kernel_args()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2
    y = op(x, *args[:-1], 1)
    ref = _int8_reference(x, qt)
    assert y.shape == (m, n) and (y.double() - ref).abs().max().item() <= 2e-5 * (ref.abs().max().item() + 1e-6)
    exact = x.double() @ qt.dequantize(torch.float64).t()
    assert ((y.double() - exact).norm() / exact.norm()).item() < 2e-2
    assert torch.equal(op(x, *args[:-1], m + 1), op(x, *args[:-1], 0))


@needs_int8
@pytest.mark.parametrize("mode,n,k,g", [("int4", 45, 96, 32), ("int8", 17, 192, 64), ("int4", 64, 576, 32),
                                        ("int8", 8, 224, None)])
def test_int8_gemm_agrees_with_the_row_kernel(mode, n, k, g):
    """From ``kernels.gemm_min_rows()`` rows (16; 10 on Zen 5) the int8 products run as a GEMM (16 activation
    rows in a register's lanes): the same rounded inputs and integer block sums as the row kernel below it
    (with AVX2: the GEMM's half tiles), so every row agrees with what the row kernel gives it, to float32
    rounding."""
    _skip_without_int8()
    qt = Q.quantize_tensor(_random_weight(n, k, seed=n), mode, g)
    op, args = Q.make_linear(qt)._kernel_args()
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(k))
    gemm = op(x, *args[:-1], 1)
    gemm_rows = kernels.gemm_min_rows()
    step = 8 if gemm_rows == 1 else min(8, gemm_rows - 1)  # row kernel chunks below it (AVX2: half tiles)
    rows = torch.cat([op(x[i : i + step], *args[:-1], 1) for i in range(0, 37, step)])
    assert (gemm - rows).abs().max() <= 1e-6 * rows.abs().max()


@needs_int8
def test_gemm_threshold_can_be_overridden():
    """LLAMARUN_GEMM_MIN_ROWS moves where the AVX-512 int8 products turn into the GEMM (read once per
    process: a fresh one here); a value that is not a positive count is ignored."""
    if kernels.gemm_min_rows() == 1:
        pytest.skip("AVX2: the GEMM takes every batch")
    code = "from llamarun import kernels; print(kernels.gemm_min_rows())"
    for value, want in (("12", 12), ("abc", kernels.gemm_min_rows()), ("0", kernels.gemm_min_rows())):
        env = {**os.environ, "LLAMARUN_GEMM_MIN_ROWS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert int(out.stdout) == want, value


@needs_int8
def test_int8_batches_follow_set_int8_batches():
    """set_int8_batches gives layers the row threshold, and every larger batch (prefill's included) goes to
    the int8 products instead of the dense path; rows=0 turns it off: the layer's output is then the int16
    kernel's again, and large batches dequantize + GEMM."""
    _skip_without_int8()
    model = torch.nn.Sequential(Q.make_linear(Q.quantize_tensor(_random_weight(64, 128, 5), "int4", 32)))
    layer = model[0]
    x = torch.randn(Q.int8_batch_rows(), 128)
    int16 = layer(x)
    assert Q.set_int8_batches(model) == 1 and layer.batch_rows == Q.int8_batch_rows()
    assert Q.int8_batch_rows() == (Q.WIDE_INT8_MIN_ROWS if kernels.wide_avx512() else Q.BATCH_MIN_ROWS)
    int8 = layer(x)
    assert not torch.equal(int8, int16)
    assert (int8.double() - _int8_reference(x, layer.qtensor)).abs().max() <= 1e-5 * int8.abs().max()
    assert torch.equal(layer(x[:-1]), layer._kernel(x[:-1]))  # one row short: int16
    big = torch.randn(2 * Q.DENSE_MIN_ROWS["int4"], 128)
    assert (layer(big).double() - _int8_reference(big, layer.qtensor)).abs().max() <= 1e-5 * layer(big).abs().max()
    Q.set_int8_batches(model, 0)
    assert layer.batch_rows == 0 and torch.equal(layer(x), int16)
    assert layer.dense_min_rows == Q.DENSE_MIN_ROWS["int4"]
    torch.testing.assert_close(layer(big), big @ layer.dequantize().t(), rtol=1e-5, atol=1e-5)  # dense path


@needs_int8
def test_set_int8_batches_switches_every_layer():
    """Every quantized layer's batches stay in the kernels (no dense path), int8 products for int4 and int8
    weights alike (AVX2 without VNNI: the int8 ones through the sign trick). rows=0 switches all back."""
    _skip_without_int8()
    layers = [Q.make_linear(Q.quantize_tensor(_random_weight(32, 64, i), mode, 32)) for i, mode in
              enumerate(("int4", "int8"))]
    model = torch.nn.Sequential(*layers)
    x = torch.randn(2 * Q.DENSE_MIN_ROWS["int8"], 64)
    assert Q.set_int8_batches(model) == 2
    assert all(m.batch_rows == Q.int8_batch_rows() and m.dense_min_rows == 1 << 62 for m in layers)
    for layer in layers:
        y = layer(x)
        assert (y.double() - _int8_reference(x, layer.qtensor)).abs().max() <= 1e-5 * y.abs().max()
    assert Q.set_int8_batches(model, 0) == 2 and not any(m.batch_rows for m in layers)


@needs_int8
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("m", [7, 16, 40])
def test_int8_batches_keep_nan_in_its_row(mode, m):
    """A NaN input reaches its own row's outputs through the int8 rounding (a block's largest magnitude would
    drop it: NaN compares false) and no other row's, in the row kernel, a GEMM tile and a half tile alike."""
    _skip_without_int8()
    qt = Q.quantize_tensor(_random_weight(24, 96, 3), mode, 32)
    op, args = Q.make_linear(qt)._kernel_args()
    x = torch.randn(m, 96)
    x[m // 2, 40] = float("nan")
    y = op(x, *args[:-1], 1)
    assert y.isnan().any(dim=1).tolist() == [i == m // 2 for i in range(m)]


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_leading_dims_dense_path_and_dtypes(mode):
    qt = Q.quantize_tensor(_random_weight(80, 128, 1), mode, 32)
    layer = Q.make_linear(qt)
    x = torch.randn(2, 5, 128)
    y = layer(x)
    assert y.shape == (2, 5, 80)
    torch.testing.assert_close(y, _reference(x, qt).float(), rtol=1e-4, atol=1e-4)
    # Large batches go through dequantize + float GEMM: exact float math on the stored weight.
    xl = torch.randn(3, 40, 128)
    assert xl.numel() >= layer.dense_min_rows * 128
    torch.testing.assert_close(layer(xl), xl @ qt.dequantize().t(), rtol=1e-5, atol=1e-5)
    # The kernel path on the same input: within activation rounding.
    _assert_act_rounding(layer._kernel(xl), xl, qt.dequantize())
    # bf16 activations: computed in float32, returned in bf16.
    yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), layer(x.bfloat16().float()), rtol=1e-2, atol=1e-2)
    # Empty batch.
    assert layer(torch.randn(0, 128)).shape == (0, 80)


@needs_kernels
def test_dense_path_tiles_large_outputs(monkeypatch):
    monkeypatch.setattr(Q, "_DENSE_TILE_BYTES", 64 * 4 * 20)  # 20-row tiles over 70 rows
    for mode in ("int8", "int4"):
        qt = Q.quantize_tensor(_random_weight(70, 64, 2), mode, 32)
        x = torch.randn(100, 64)
        torch.testing.assert_close(Q.make_linear(qt)._dense(x), x @ qt.dequantize().t(), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_dequant_ops_match_torch():
    for mode, g in (("int8", None), ("int8", 32), ("int4", 32), ("int4", 64)):
        qt = Q.quantize_tensor(_random_weight(37, 128, 3), mode, g)
        layer = Q.make_linear(qt)
        torch.testing.assert_close(layer._dequant_rows(0, 37), qt.dequantize(), rtol=0, atol=0)
        torch.testing.assert_close(layer._dequant_rows(5, 9), qt.dequantize()[5:14], rtol=0, atol=0)


@needs_kernels
def test_unsupported_shapes_raise_clear_errors():
    ops = torch.ops.llamarun
    q = torch.zeros(4, 48, dtype=torch.int8)
    s = torch.zeros(4, 1, dtype=torch.int16)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ops.q8_linear(torch.randn(1, 48), q, s, 48)
    q = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="does not match"):
        ops.q8_linear(torch.randn(1, 32), q, torch.zeros(4, 2, dtype=torch.int16), 32)
    with pytest.raises(RuntimeError, match="group_size"):
        ops.q8_linear(torch.randn(1, 64), q, torch.zeros(4, 3, dtype=torch.int16), 48)
    with pytest.raises(RuntimeError, match="float32"):
        ops.q8_linear(torch.randn(1, 64, dtype=torch.float64), q, torch.zeros(4, 2, dtype=torch.int16), 32)
    with pytest.raises(RuntimeError, match="mins"):
        ops.q4_linear(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.int16),
                      torch.zeros(4, 1, dtype=torch.int16), 32)
    # At the quantizer: int4 groups must be whole 32-blocks dividing in_features.
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.quantize_int4(torch.randn(4, 48), 48)
    with pytest.raises(ValueError, match="does not divide"):
        Q.quantize_int4(torch.randn(4, 96), 64)


def test_int8_any_width_uses_portable_path():
    """Per-channel int8 allows any in_features; widths the kernel cannot take use the torch path."""
    w = torch.randn(10, 50)
    layer = Q.Int8Linear.from_float(w)
    x = torch.randn(3, 50)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t(), rtol=1e-5, atol=1e-5)
    assert layer._fast is False


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("m", M_VALUES)
def test_fallback_path(mode, m):
    """The portable path (forced per layer) computes x @ dequantized(W)^T exactly."""
    qt = Q.quantize_tensor(_random_weight(48, 96, 4), mode, 32)
    layer = Q.make_linear(qt)
    layer.use_kernels(False)
    x = torch.randn(m, 96)
    torch.testing.assert_close(layer(x), x @ qt.dequantize().t(), rtol=1e-5, atol=1e-5)
    if kernels.available():
        layer.use_kernels(True)
        _assert_act_rounding(layer(x), x, qt.dequantize())


def test_env_var_disables_kernels():
    """LLAMARUN_KERNELS=0 makes available() False with a reason, and layers still work."""
    code = ("import torch; from llamarun import kernels, quantize as Q; "
            "assert not kernels.available(); print(kernels.reason()); "
            "l = Q.Int4Linear.from_float(torch.randn(8, 64)); x = torch.randn(2, 64); "
            "torch.testing.assert_close(l(x), x @ l.dequantize().t()); assert l._fast is False")
    env = {"LLAMARUN_KERNELS": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LLAMARUN_KERNELS=0" in out.stdout


def test_build_failure_falls_back(tmp_path):
    """No compiler: the build fails with a one-line reason and available() is False (fresh cache dir)."""
    code = ("from llamarun import kernels; assert not kernels.available(); print(kernels.reason())")
    env = {"LLAMARUN_CACHE": str(tmp_path), "CXX": "/nonexistent/c++", "PATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "compiler" in out.stdout


@needs_kernels
def test_threads_and_repeated_calls_agree():
    """Single- and multi-threaded runs give identical results (each output is computed by one thread)."""
    qt = Q.quantize_tensor(_random_weight(2000, 256, 5), "int4", 32)
    layer = Q.make_linear(qt)
    x = torch.randn(3, 256)
    try:
        kernels.set_num_threads(1)
        y1 = layer(x)
        kernels.set_num_threads(2)
        ys = [layer(x) for _ in range(20)]
        xl = torch.randn(100, 256)
        dense2 = layer._dense(xl)  # dequantized rows on 2 threads
        kernels.set_num_threads(1)
        dense1 = layer._dense(xl)
    finally:
        kernels.set_num_threads(None)
    for y in ys:
        assert torch.equal(y, y1)
    assert torch.equal(dense1, dense2)
    old = kernels.set_spin_us(0)  # helpers that sleep at once still join in and give the same results
    try:
        kernels.set_num_threads(2)
        assert all(torch.equal(layer(x), y1) for _ in range(5))
    finally:
        kernels.set_num_threads(None)
        assert kernels.set_spin_us(old) == 0


@needs_kernels
@pytest.mark.parametrize("g", [32, 64, 96])
def test_compiled_int4_quantizer_matches_torch(monkeypatch, g):
    """The compiled int4 search and the torch one: same method, so nearly the same choices and error,
    and both never worse than plain min/max rounding."""
    w = _random_weight(300, 192, 6)
    w[3, :g] = 0  # a constant group
    compiled = Q.quantize_int4(w, g)
    monkeypatch.setattr(Q.kernels, "available", lambda: False)
    reference = Q.quantize_int4(w, g)
    plain = Q.quantize_int4(w, g, search=False)
    err = {name: (qt.dequantize() - w).pow(2).sum().item() for name, qt in
           (("compiled", compiled), ("torch", reference), ("plain", plain))}
    assert err["compiled"] <= err["plain"] and err["torch"] <= err["plain"]
    assert abs(err["compiled"] - err["torch"]) <= 0.01 * err["torch"]
    assert (compiled.scales == reference.scales).float().mean() > 0.95
    assert torch.equal(compiled.dequantize()[3, :g], torch.zeros(g))


@needs_kernels
@pytest.mark.parametrize("heads,head_dim", [(9, 64), (3, 6), (2, 18)])
def test_rope_op_matches_model(heads, head_dim):
    """The fused rotary op (prefill) against model.apply_rope, on a view of a fused qkv product (q's heads
    are strided, as in Attention.forward) and on a contiguous tensor; bad shapes are clear errors."""
    from llamarun.model import apply_rope

    s = 13
    angles = torch.rand(s, head_dim // 2, dtype=torch.float64) * 10
    rope = torch.stack([angles.cos(), angles.sin()], -1).float()
    qkv = torch.randn(2, s, 3 * heads * head_dim)
    q = qkv[..., : heads * head_dim].view(2, s, heads, head_dim)
    for x in (q, q.contiguous()):
        y = torch.ops.llamarun.rope(x, rope)
        assert y.is_contiguous() and y.shape == x.shape
        torch.testing.assert_close(y, apply_rope(x, rope), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="rope must be"):
        torch.ops.llamarun.rope(q, rope[:-1])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.llamarun.rope(q.double(), rope)


@needs_kernels
@pytest.mark.parametrize("b,s,h,k,d,start,dtype", [
    (1, 512, 9, 3, 64, 0, torch.float16),  # SmolLM2's prefill
    (2, 37, 4, 2, 48, 5, torch.float32),   # a chunk after cached tokens, two rows, head_dim not a multiple of 32
    (1, 1, 2, 1, 8, 3, torch.float32),
    (3, 70, 6, 6, 128, 20, torch.float16),  # no GQA
    (1, 33, 3, 1, 16, 0, torch.float32),   # an odd number of query vectors per task
    (1, 300, 9, 3, 64, 0, torch.int8),     # an int8 cache: rows and their scales
    (2, 37, 4, 2, 48, 5, torch.int8),
])
def test_attn_prefill_matches_causal_sdpa(b, s, h, k, d, start, dtype):
    """attn_prefill: query i of each head attends to cache positions 0..start+i of its key/value head, as
    torch's attention with the same mask does (float32 math over a float16, float32 or int8 cache, the
    last with a scale per row); the cache may hold more rows and positions than the call uses."""
    import torch.nn.functional as F

    from llamarun.model import quantize_rows

    g = torch.Generator().manual_seed(s)
    t = start + s + 7
    q = torch.randn(b, s, h, d, generator=g)
    kc = torch.randn(b + 1, k, t, d, generator=g)
    vc = torch.randn(b + 1, k, t, d, generator=g) * 3
    scales = {}
    if dtype == torch.int8:
        (kc, ks), (vc, vs) = quantize_rows(kc), quantize_rows(vc)
        scales = dict(k_scale=ks, v_scale=vs)
        kf, vf = kc.float() * ks[..., None], vc.float() * vs[..., None]  # what the cache holds
    else:
        kc, vc = kc.to(dtype), vc.to(dtype)
        kf, vf = kc.float(), vc.float()
    out = torch.ops.llamarun.attn_prefill(q, kc, vc, start, **scales)
    mask = torch.ones(s, start + s, dtype=torch.bool).tril(diagonal=start)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kf[:b, :, : start + s], vf[:b, :, : start + s],
                                         attn_mask=mask, enable_gqa=True)
    assert out.shape == (b, s, h * d)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(b, s, h * d), rtol=1e-5, atol=1e-5)
    view = {n: x[:b, :, : start + s] for n, x in scales.items()}
    view = torch.ops.llamarun.attn_prefill(q, kc[:b, :, : start + s], vc[:b, :, : start + s], start, **view)  # strided
    assert torch.equal(view, out)
    with pytest.raises(RuntimeError, match="cache shape mismatch"):
        short = {n: x[:, :, : start + s - 1] for n, x in scales.items()}
        torch.ops.llamarun.attn_prefill(q, kc[:, :, : start + s - 1], vc[:, :, : start + s - 1], start, **short)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_kv_store_writes_as_the_cache_does(dtype):
    """kv_store (prefill's cache write) leaves the cache as model.KVCache.update does: the same float16
    roundings, the same int8 codes and scales; from k and v views of a fused projection (strided rows),
    into a cache with more rows and positions, nothing else touched."""
    from llamarun.model import KVCache

    torch.manual_seed(0)
    b, s, k, d, start = 2, 37, 3, 64, 5
    qkv = torch.randn(b, s, (3 + 2 * k) * d) * 4
    qkv[0, 3, 3 * d : 4 * d] = 0  # a row of zeros: scale 0
    kx = qkv[..., 3 * d : (3 + k) * d].unflatten(-1, (k, d))  # [B, S, K, D] views
    vx = qkv[..., (3 + k) * d :].unflatten(-1, (k, d))
    want, got = KVCache(b + 1, k, 64, d, dtype), KVCache(b + 1, k, 64, d, dtype)
    want.update(start, kx.transpose(1, 2), vx.transpose(1, 2))
    torch.ops.llamarun.kv_store(kx, vx, got.k, got.v, start, got.k_scale, got.v_scale)
    for name, t in want.named_buffers():
        assert torch.equal(getattr(got, name), t), name
    if dtype == torch.int8:
        assert got.k_scale[0, 0, start + 3] == 0 and not got.k[0, 0, start + 3].any()
    with pytest.raises(RuntimeError, match="cache shape mismatch"):
        torch.ops.llamarun.kv_store(kx, vx, got.k, got.v, 64 - s + 1, got.k_scale, got.v_scale)


@needs_kernels
def test_attention_ops_check_an_int8_caches_scales():
    """An int8 cache comes with both scales, shaped [B, K, T] like it; a float cache with none."""
    q = torch.zeros(1, 4, 4, 16)
    kc = torch.zeros(1, 2, 8, 16, dtype=torch.int8)
    s = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="needs k_scale and v_scale"):
        torch.ops.llamarun.attn_prefill(q, kc, kc.clone(), 0)
    with pytest.raises(RuntimeError, match="needs k_scale and v_scale"):
        torch.ops.llamarun.attn_prefill(q, kc.float(), kc.float(), 0, s, s.clone())
    with pytest.raises(RuntimeError, match=r"must be \[B, K, T\]"):
        torch.ops.llamarun.attn_prefill(q, kc, kc.clone(), 0, s[:, :1], s[:, :1].clone())
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.llamarun.attn_prefill(q, kc, kc.clone(), 0, s.half(), s.half())
    qkv = torch.zeros(1, 1, (4 + 4) * 16)
    with pytest.raises(RuntimeError, match="needs k_scale and v_scale"):
        torch.ops.llamarun.attn_decode(qkv, kc, kc.clone(), torch.zeros(1, 8, 2), 0, 4, 2, s, None)


@needs_int8
@pytest.mark.parametrize("m", [6, 16, 40])
def test_int8_batches_take_weights_of_minus_128(m):
    """An int8 weight of -128 (a GGUF Q8_0 file may hold one; llamarun's quantizer stops at -127): the AVX2
    sign trick multiplies |w| = 128 as an unsigned byte, and VNNI's products take it as it is; the sums
    match the int8 reference of the rounding."""
    _skip_without_int8()
    qt = Q.quantize_tensor(_random_weight(24, 96, 7), "int8", 32)
    qt.qweight[::3, ::5] = -128
    qt.qweight[1::3, 1::7] = 127
    op, args = Q.make_linear(qt)._kernel_args()
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m)) * 3
    y = op(x, *args[:-1], 1)
    ref = _int8_reference(x, qt)
    assert (y.double() - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
