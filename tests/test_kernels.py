"""Sparse CPU kernels: the packed format, every compiled ISA path and the torch fallback against
dense references, and bad inputs. Correctness only (no timings); tiny shapes.

The extension is built once per session (module fixture; ~45 s the first time, cached after).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import pytest
import torch

from sparsify.inference.kernels import (
    PackedWeight,
    dequantize,
    kernel_isa,
    load_extension,
    loader,
    ops,
    pack,
    sparse_linear,
    torch_sparse_linear,
    unpack,
)
from sparsify.inference.kernels.loader import ISA_NAMES
from sparsify.quant.quantization import fake_quantize_per_token

SHAPES = [(37, 100), (100, 129), (129, 37), (64, 128), (3, 1)]  # (out, in): odd sizes hit every tail
SPARSITIES = [0.0, 0.5, 0.7, 0.95, 1.0]
# Every batch 1..17 (each kernel's token blocking and its remainders: AVX-512 in-register ≤ 4 then
# scratch rows, W4A16 outer products from 12; AVX2 expanded ≤ 7 then 16-row outer-product passes)
# and one large batch.
BATCHES = [*range(1, 18), 64]


@pytest.fixture(scope="module")
def compiled_isas() -> list[str]:
    """The ISA paths this machine can run (built once); empty when no compiler is available."""
    if load_extension() is None:
        return []
    best = kernel_isa()
    return list(ISA_NAMES[: ISA_NAMES.index(best) + 1])


def sparse_weight(out: int, inn: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """Random weight with ~``sparsity`` zeros, row 0 all zero and row 1 (if any) fully dense."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    w[torch.rand(out, inn, generator=g) < sparsity] = 0
    w[0] = 0
    if out > 1:
        w[1] = torch.randn(inn, generator=g)
    return w


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x · wᵀ + b and a per-output error scale (Σ|x||w|, what rounding errors are relative to)."""
    y = x.float() @ w.float().T
    scale = x.float().abs() @ w.float().abs().T
    if bias is not None:
        y = y + bias
        scale = scale + bias.abs()
    return y, scale


def assert_close(y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, rel: float) -> None:
    tol = rel * scale + 1e-6
    if y.dtype == torch.bfloat16:  # output rounding
        tol = tol + ref.abs() * 2**-8
    err = (y.float() - ref).abs()
    assert bool((err <= tol).all()), f"max error {float(err.max()):.3g} (tolerance ~{float(tol.max()):.3g})"


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_pack_unpack_round_trip(dtype, shape, sparsity):
    w = sparse_weight(*shape, sparsity)
    if dtype == torch.int8:
        codes = torch.randint(-127, 128, shape, dtype=torch.int8) * (w != 0)
        scales = torch.rand(shape[0]) + 0.1
        p = pack(codes, dtype=torch.int8, scales=scales)
        assert torch.equal(unpack(p), codes)
        assert torch.equal(dequantize(p), codes.float() * scales[:, None])
        again = pack(unpack(p), p.mask(), torch.int8, scales=p.scales)
        w = codes
    else:
        w = w.to(dtype)
        p = pack(w, dtype=dtype)
        assert torch.equal(unpack(p), w)
        again = pack(unpack(p), p.mask(), dtype)
    p.validate()
    assert torch.equal(p.mask(), w != 0)
    assert p.nnz == int((w != 0).sum())
    for name in ("bitmask", "offsets", "values", "scales", "row_sums"):
        a, b = getattr(p, name), getattr(again, name)
        assert (a is None and b is None) or torch.equal(a, b), name


def test_pack_layout():
    w = torch.zeros(2, 70)
    w[0, [0, 9, 64, 69]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w[1, 1] = 5.0
    p = pack(w, dtype=torch.float32)
    assert p.bitmask.shape == (2, 16)  # two 64-bit words per row
    # column j: bit j % 8 of byte j // 8; columns 64 and 69 are bits 0 and 5 of byte 8
    assert p.bitmask[0].tolist() == [0b1, 0b10, 0, 0, 0, 0, 0, 0, 0b100001, 0, 0, 0, 0, 0, 0, 0]
    assert p.bitmask[1].tolist() == [0b10] + [0] * 15
    assert p.offsets.tolist() == [0, 4, 5]
    assert p.values[:5].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert p.values.numel() == 5 + 16 and not p.values[5:].any()  # 64 bytes of padding
    assert p.sparsity == pytest.approx(1 - 5 / 140)


def test_pack_keeps_masked_zeros_and_quantizes():
    w = torch.tensor([[0.0, 1.0, -2.0, 0.5]])
    mask = torch.tensor([[True, True, True, False]])
    with pytest.raises(ValueError, match="nonzero entries where the mask prunes"):
        pack(w, mask)
    w[0, 3] = 0
    p = pack(w, mask, torch.int8)
    assert p.nnz == 3  # a kept zero stays stored
    assert p.scales.tolist() == pytest.approx([2.0 / 127])
    assert unpack(p).tolist() == [[0, 64, -127, 0]]
    assert p.row_sums.tolist() == [64 - 127]


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(3),), "2-D"),
        ((torch.zeros(2, 2, dtype=torch.int32),), "floating point"),
        ((torch.zeros(2, 2), torch.ones(2, 2)), "mask must be bool"),
        ((torch.zeros(2, 2), torch.ones(3, 2, dtype=torch.bool)), "mask must be bool"),
        ((torch.zeros(2, 2, dtype=torch.int8),), "dtype=torch.int8"),
        ((torch.zeros(2, 2, dtype=torch.int8), None, torch.int8), "scales"),
        ((torch.zeros(2, 2), None, torch.float16), "dtype must be one of"),
    ],
)
def test_pack_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        pack(*args)
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        pack(torch.full((1, 2), -128, dtype=torch.int8), dtype=torch.int8, scales=torch.ones(1))


def test_validate_catches_corrupt_tensors():
    p = pack(sparse_weight(8, 70, 0.5))
    bad_offsets = p.offsets.clone()
    bad_offsets[3] += 1
    with pytest.raises(ValueError, match="offsets"):
        PackedWeight(p.shape, p.bitmask, bad_offsets, p.values).validate()
    with pytest.raises(ValueError, match="padding"):
        PackedWeight(p.shape, p.bitmask, p.offsets, p.values[: p.nnz]).validate()
    bits = p.bitmask.clone()
    bits[0, -1] = 0x80  # column 127 > in_features
    with pytest.raises(ValueError):
        PackedWeight(p.shape, bits, p.offsets, p.values).validate()


# --------------------------------------------------------------------------- kernels vs dense


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("isa", ["torch", *ISA_NAMES])
def test_float_kernels_match_dense(compiled_isas, isa, w_dtype, x_dtype):
    if isa != "torch" and isa not in compiled_isas:
        pytest.skip(f"{isa} kernels not available here")
    # fp32 x on the AVX-512 bf16 kernel is split into bf16 hi + lo: ~2^-17 relative per product.
    rel = 3e-5 if (x_dtype == torch.float32 and w_dtype == torch.bfloat16) else 1e-5
    for i, (shape, sparsity) in enumerate((s, p) for s in SHAPES for p in SPARSITIES):
        w = sparse_weight(*shape, sparsity, seed=i).to(w_dtype)  # the kernels' stored weights
        p = pack(w, dtype=w_dtype)
        bias = torch.randn(shape[0]) if i % 2 else None
        for batch in BATCHES:
            x = torch.randn(batch, shape[1]).to(x_dtype)
            y = sparse_linear(x, p, bias, isa=isa)
            assert y.dtype == x_dtype and y.shape == (batch, shape[0])
            assert_close(y, *reference(x, w, bias), rel)


@pytest.mark.parametrize("act_int8", [True, False], ids=["w8a8", "w8a16"])
@pytest.mark.parametrize("isa", ["torch", *ISA_NAMES])
def test_int8_kernels_match_dequantized_reference(compiled_isas, isa, act_int8):
    if isa != "torch" and isa not in compiled_isas:
        pytest.skip(f"{isa} kernels not available here")
    for i, (shape, sparsity) in enumerate((s, p) for s in SHAPES for p in SPARSITIES):
        w = sparse_weight(*shape, sparsity, seed=i)
        p = pack(w, dtype=torch.int8, act_int8=act_int8)
        bias = torch.randn(shape[0]) if i % 2 else None
        for batch in BATCHES:
            x = torch.randn(batch, shape[1])
            # Independent reference: the activation grid sparsify.quant.quantization fakes, dequantized weights.
            xq = fake_quantize_per_token(x) if act_int8 else x
            y = sparse_linear(x, p, bias, isa=isa)
            assert_close(y, *reference(xq, dequantize(p), bias), 1e-5)
            yb = sparse_linear(x.bfloat16(), p, bias, isa=isa)  # bf16 in → bf16 out, same codes path
            xqb = fake_quantize_per_token(x.bfloat16().float()) if act_int8 else x.bfloat16()
            assert_close(yb, *reference(xqb, dequantize(p), bias), 1e-5)


@pytest.mark.parametrize("isa", ISA_NAMES)
def test_w8a8_integer_sums_are_exact(compiled_isas, isa):
    """W8A8 on every path gives the reference's exact integer sums (the same fp32 result bit for bit),
    including worst-case magnitudes: every code ±127 against activations at ±128, long rows (the
    AVX2 kernels move partial sums out of fp32/int16-scaled accumulators every few mask words)."""
    if isa not in compiled_isas:
        pytest.skip(f"{isa} kernels not available here")
    for p, x in _w8a8_cases():
        for batch in (1, 2, 3, 4, 5, 8, 16, 17):
            assert torch.equal(sparse_linear(x[:batch], p, isa=isa), torch_sparse_linear(x[:batch], p)), batch


def _w8a8_cases() -> list[tuple[PackedWeight, torch.Tensor]]:
    """W8A8 weights and 17 rows of x: odd widths, dense and empty rows, long rows, and the worst case."""
    g = torch.Generator().manual_seed(3)
    cases = []
    for shape, sparsity in [((37, 100), 0.7), ((129, 37), 0.0), ((5, 4160), 0.0), ((9, 5000), 0.5), ((40, 700), 0.9)]:
        w = sparse_weight(*shape, sparsity, seed=shape[0])
        cases.append((pack(w, dtype=torch.int8), torch.randn(17, shape[1], generator=g)))
    # Worst case: all codes +127 (row 1: −127) and x = −amax everywhere (q = −128) but one +amax.
    codes = torch.full((3, 4160), 127, dtype=torch.int8)
    codes[1] = -127
    x = -torch.ones(17, 4160)
    x[:, 0] = 1.0
    cases.append((pack(codes, dtype=torch.int8, scales=torch.ones(3)), x))
    return cases


@pytest.mark.parametrize("pad_odd", [False, True], ids=["int8", "int4"])
def test_gather_index_lists_each_words_columns(compiled_isas, pad_odd):
    """format.gather_index (built by the binding) against a written-out loop: per row and 64-column word,
    the count, then the in-word columns of the kept entries in storage order (int4: a zero byte after an
    odd count); 64 zero bytes at the end; and each row starts where the kernels look for it."""
    from sparsify.inference.kernels.format import gather_index

    if not compiled_isas:
        pytest.skip("no compiled kernels here: they build the index")

    for shape, sparsity in [((37, 100), 0.7), ((3, 1), 0.0), ((5, 130), 1.0), ((64, 128), 0.5), ((129, 37), 0.95)]:
        w = sparse_weight(*shape, sparsity, seed=shape[1])
        p = pack(w, dtype=torch.int4, group_size=None) if pad_odd else pack(w, dtype=torch.int8)
        mask, words = p.mask(), -(-shape[1] // 64)
        expected, starts = [], []
        for r in range(shape[0]):
            starts.append(len(expected))
            for k in range(words):
                cols = [c - 64 * k for c in range(64 * k, min(64 * k + 64, shape[1])) if mask[r, c]]
                expected += [len(cols), *cols] + [0] * (pad_odd and len(cols) % 2)
        assert gather_index(p.bitmask, pad_odd).tolist() == expected + [0] * 64, shape
        assert starts == [(2 if pad_odd else 1) * int(p.offsets[r]) + r * words for r in range(shape[0])]
    strided = torch.cat([p.bitmask, p.bitmask], 1)[:, : p.bitmask.shape[1]]  # a non-contiguous view
    assert gather_index(strided, pad_odd).equal(gather_index(p.bitmask, pad_odd))
    for bad in (
        torch.zeros(2, 7, dtype=torch.uint8),
        torch.zeros(2, 8, dtype=torch.int8),
        torch.zeros(16, dtype=torch.uint8),
    ):
        with pytest.raises(RuntimeError, match=r"gather_index: bitmask must be contiguous uint8 \[out, 8"):
            gather_index(bad, pad_odd)


def test_avx2_gather_kernel_is_exact_and_reads_the_index(compiled_isas):
    """The AVX2 W8A8 and W4A8 kernels with the gather index (ops.for_isa builds it on AVX2) give the
    reference's exact sums on every case of the W8A8 and W4A8 exactness tests, and really read the index:
    a corrupted index changes the results below kOuterMin rows of x, not from there on (outer.h keeps
    the bitmask)."""
    if "avx2" not in compiled_isas:
        pytest.skip("no AVX2 kernels on this CPU")
    from sparsify.inference.kernels.format import with_gather_index

    for p, x in _w8a8_cases():
        g = with_gather_index(p)
        g.validate()
        for batch in (1, 2, 5, 17):
            assert torch.equal(sparse_linear(x[:batch], g, isa="avx2"), torch_sparse_linear(x[:batch], p)), batch
    # W4A8: the exact group sums of test_w4a8_group_sums_are_exact (unit scales: bit for bit), then
    # real scales and odd widths (fp32 rounding of the per-group folds only).
    codes = torch.full((4, 4096), 7, dtype=torch.int8)
    codes[1] = -7
    codes[2, 64:1024] = 0
    codes[3, ::3] = 0
    x = -torch.ones(3, 4096)
    x[:, 0] = 1.0
    x[2] = torch.randn(4096)
    for group in (64, 128, None):
        groups = 1 if group is None else 4096 // group
        p = pack(codes, dtype=torch.int4, scales=torch.ones(4, groups), group_size=group)
        g = with_gather_index(p)
        g.validate()
        for batch in (1, 2, 3):
            assert torch.equal(sparse_linear(x[:batch], g, isa="avx2"), torch_sparse_linear(x[:batch], p)), group
    for shape, sparsity, group in [((37, 128), 0.7, 64), ((129, 192), 0.9, None), ((20, 640), 0.0, 128)]:
        w = sparse_weight(*shape, sparsity, seed=shape[0])
        p = pack(w, dtype=torch.int4, group_size=group)
        x = torch.randn(5, shape[1])
        assert_close(
            sparse_linear(x, with_gather_index(p), isa="avx2"),
            torch_sparse_linear(x, p),
            x.abs() @ dequantize(p).abs().T,
            1e-6,
        )
    p, x = _w8a8_cases()[0]
    g = with_gather_index(p)
    columns = g.columns.clone()
    columns[1] = (int(columns[1]) + 1) % 64  # row 0's first stored code now meets the next column of x
    bad = dataclasses.replace(g, columns=columns)
    most = ops.GATHER_MAX_BATCH
    for batch in (1, 2, most):  # the gather kernel
        assert not torch.equal(sparse_linear(x[:batch], bad, isa="avx2"), sparse_linear(x[:batch], g, isa="avx2"))
    for batch in (most + 1, 16):  # outer.h
        assert torch.equal(sparse_linear(x[:batch], bad, isa="avx2"), sparse_linear(x[:batch], g, isa="avx2"))
    with pytest.raises(ValueError, match="columns do not match the bitmask"):
        bad.validate()


def test_gather_index_goes_with_w8a8_only(compiled_isas):
    """ops.for_isa adds the index only on AVX2, to W8A8 weights of ≥ GATHER_MIN_SPARSITY; elsewhere the
    weight is returned as is, and a misplaced or mis-sized index is refused with a message."""
    from sparsify.inference.kernels.format import with_gather_index
    from sparsify.inference.kernels.ops import GATHER_MIN_SPARSITY, for_isa

    sparse = sparse_weight(40, 704, GATHER_MIN_SPARSITY + 0.1)
    half = sparse_weight(40, 704, GATHER_MIN_SPARSITY - 0.2)
    w4a8 = {"dtype": torch.int4, "group_size": 64}
    assert for_isa(pack(sparse, dtype=torch.int8), "avx2").columns is not None
    assert for_isa(pack(sparse, **w4a8), "avx2").columns is not None
    assert for_isa(pack(half, dtype=torch.int8), "avx2").columns is None
    for isa in ("avx512", "generic", "torch"):
        assert for_isa(pack(sparse, dtype=torch.int8), isa).columns is None
    for kwargs in (
        {"dtype": torch.int8, "act_int8": False},
        {"dtype": torch.int4, "act_int8": False, "group_size": 64},
        {"dtype": torch.bfloat16},
    ):
        assert for_isa(pack(sparse, **kwargs), "avx2").columns is None
        with pytest.raises(ValueError, match="W8A8 and W4A8"):
            with_gather_index(pack(sparse, **kwargs))
    if not compiled_isas:
        return
    ext, x = load_extension(), torch.randn(1, 704)
    g = with_gather_index(pack(sparse, dtype=torch.int8))
    bf16 = pack(sparse)
    with pytest.raises(RuntimeError, match="go with W8A8 and W4A8 weights only"):
        ext.sparse_linear(x, bf16.bitmask, bf16.offsets, bf16.values, None, None, None, True, 0, 0, columns=g.columns)
    with pytest.raises(RuntimeError, match="columns must be contiguous uint8"):
        ops.call_extension(ext, x, dataclasses.replace(g, columns=g.columns[:-1].clone()), None, compiled_isas[-1])


def test_avx2_code_has_no_avx512_instructions(compiled_isas):
    """The AVX2 kernels run on CPUs without AVX-512: not one zmm register or mask-register operand."""
    import shutil
    import subprocess

    if "avx2" not in compiled_isas or shutil.which("objdump") is None:
        pytest.skip("needs the AVX2 kernels and objdump")
    obj = loader.build_directory() / "sparse_gemv_avx2.o"
    if not obj.is_file():
        pytest.skip("no object file in the build directory")
    text = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", str(obj)], capture_output=True, text=True, check=True
    ).stdout
    functions = [f for f in text.split("\n\n") if "sparsellama::avx2::" in f.split("\n", 1)[0]]
    assert functions
    for f in functions:
        bad = [line for line in f.splitlines()[1:] if "zmm" in line or "{%k" in line]
        assert not bad, f.split("\n", 1)[0] + "\n" + "\n".join(bad[:5])


@pytest.mark.parametrize("fmt", ["bf16", "fp32", "w8a8", "w8a16"])
def test_fallback_equals_compiled(compiled_isas, fmt):
    if not compiled_isas:
        pytest.skip("no compiled kernels")
    w = sparse_weight(129, 100, 0.7)
    p = {
        "bf16": lambda: pack(w),
        "fp32": lambda: pack(w, dtype=torch.float32),
        "w8a8": lambda: pack(w, dtype=torch.int8),
        "w8a16": lambda: pack(w, dtype=torch.int8, act_int8=False),
    }[fmt]()
    bias = torch.randn(129)
    for batch in BATCHES:
        x = torch.randn(batch, 100)
        fallback = torch_sparse_linear(x, p, bias)
        scale = x.abs() @ dequantize(p).abs().T + bias.abs()
        for isa in compiled_isas:
            assert_close(sparse_linear(x, p, bias, isa=isa), fallback, scale, 3e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dtype": torch.bfloat16},
        {"dtype": torch.float32},
        {"dtype": torch.int8},
        {"dtype": torch.int8, "act_int8": False},
        {"dtype": torch.int4, "group_size": 64},
        {"dtype": torch.int4, "act_int8": False, "group_size": 64},
    ],
    ids=["bf16", "fp32", "w8a8", "w8a16", "w4a8", "w4a16"],
)
def test_outer_product_override_gives_the_same_results(compiled_isas, kwargs):
    """benchmarks/kernel_ab.py --tree-outer-from sends every format through outer.h on AVX2 and AVX-512,
    also where the built-in choice never does (AVX-512 outside W4A16, batches below kOuterMin): those
    calls must still compute the layer (exactly, for the integer-activation formats)."""
    vector_isas = [isa for isa in compiled_isas if isa != "generic"]
    if not vector_isas:
        pytest.skip("no vector kernels on this CPU")
    ext = load_extension()
    w = sparse_weight(70, 192, 0.7)
    p = pack(w, **kwargs)
    bias = torch.randn(70)
    xs = [torch.randn(batch, 192) for batch in (1, 3, 16, 21)]
    expected = {isa: [sparse_linear(x, p, bias, isa=isa) for x in xs] for isa in vector_isas}
    ext.set_outer_from(1)
    try:
        got = {isa: [sparse_linear(x, p, bias, isa=isa) for x in xs] for isa in vector_isas}
    finally:
        ext.set_outer_from(0)
    exact = kwargs.get("act_int8", True) and kwargs["dtype"] in (torch.int8, torch.int4)
    for isa in vector_isas:
        for x, e, g in zip(xs, expected[isa], got[isa], strict=True):
            if exact:  # the same integer sums, met by the same fp32 scales
                torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-5, msg=f"{isa} batch {len(x)}")
            else:
                scale = x.abs() @ dequantize(p).abs().T + bias.abs()
                assert_close(g, torch_sparse_linear(x, p, bias), scale, 3e-5)


@pytest.mark.parametrize("threads", [2, 3])
def test_rows_split_across_threads(compiled_isas, threads):
    """Large enough to use several threads; rows of very uneven sparsity test the byte-balanced split."""
    if not compiled_isas:
        pytest.skip("no compiled kernels")
    w = sparse_weight(301, 1000, 0.7)
    w[:150, :900] = 0  # first half of the rows much sparser
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for p in (pack(w), pack(w, dtype=torch.int8)):
            for batch in (1, 3, 7):
                x = torch.randn(batch, 1000)
                ref = torch_sparse_linear(x, p)
                scale = x.abs() @ dequantize(p).abs().T
                for isa in compiled_isas:
                    assert_close(sparse_linear(x, p, isa=isa), ref, scale, 3e-5)
    finally:
        torch.set_num_threads(old)


def test_all_zero_and_empty(compiled_isas):
    p = pack(torch.zeros(5, 70))
    for isa in ["torch", *compiled_isas]:
        assert torch.equal(sparse_linear(torch.randn(3, 70), p, isa=isa), torch.zeros(3, 5))
        bias = torch.randn(5)
        assert torch.equal(sparse_linear(torch.randn(2, 70), p, bias, isa=isa), bias.expand(2, 5))
        assert sparse_linear(torch.randn(0, 70), p, isa=isa).shape == (0, 5)


def test_int8_nonfinite_input_gives_nan_not_numbers(compiled_isas):
    p = pack(sparse_weight(8, 70, 0.5), dtype=torch.int8)
    x = torch.randn(3, 70)
    x[1, 3] = float("inf")
    x[2, 69] = float("nan")  # in the vector tail
    for isa in ["torch", *compiled_isas]:
        y = sparse_linear(x, p, isa=isa)
        assert torch.isfinite(y[0]).all() and torch.isnan(y[1:]).all()


# --------------------------------------------------------------------------- shapes, dtypes, bad input


def test_leading_dims_non_contiguous_and_float16(compiled_isas):
    w = sparse_weight(37, 100, 0.7)
    p = pack(w, dtype=torch.float32)
    x = torch.randn(2, 3, 100)
    y = sparse_linear(x, p)
    assert y.shape == (2, 3, 37)
    ref, scale = reference(x.reshape(-1, 100), w, None)
    assert_close(y.reshape(-1, 37), ref, scale, 1e-5)
    xt = torch.randn(100, 6).T  # non-contiguous view
    assert_close(sparse_linear(xt, p), *reference(xt, w, None), 1e-5)
    yh = sparse_linear(x.half(), p)
    assert yh.dtype == torch.float16
    assert_close(yh.float().reshape(-1, 37), *reference(x.half().reshape(-1, 100), w, None), 1e-3)


def test_gradients_flow_through_fallback():
    w = sparse_weight(37, 100, 0.7)
    p = pack(w, dtype=torch.float32)
    x = torch.randn(3, 100, requires_grad=True)
    sparse_linear(x, p).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(3, 100), atol=1e-5)


def test_bad_inputs(compiled_isas):
    p = pack(sparse_weight(8, 70, 0.5))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        sparse_linear(torch.ones(2, 70, dtype=torch.int64), p)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        sparse_linear(torch.ones(2, 70, dtype=torch.float64), p)
    with pytest.raises(ValueError, match="in_features=70"):
        sparse_linear(torch.ones(2, 71), p)
    with pytest.raises(ValueError, match="in_features=70"):
        sparse_linear(torch.tensor(1.0), p)
    with pytest.raises(ValueError, match="on the CPU"):
        sparse_linear(torch.ones(2, 70, device="meta"), p)
    with pytest.raises(ValueError, match="bias must be float32"):
        sparse_linear(torch.ones(2, 70), p, torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="isa"):
        sparse_linear(torch.ones(2, 70), p, isa="sse9")
    if not compiled_isas:
        return
    ext = load_extension()
    x = torch.ones(2, 70)
    good = (p.bitmask, p.offsets, p.values, None, None, None, True, 0)
    ext.sparse_linear(x, *good)
    for i, bad in [
        (0, p.bitmask[:, :8].contiguous()),
        (1, p.offsets.int()),
        (2, p.values[: p.nnz]),
        (2, p.values.half()),
        (7, 9),
    ]:
        args = list(good)
        args[i] = bad
        with pytest.raises(RuntimeError, match="sparse_linear"):
            ext.sparse_linear(x, *args)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.sparse_linear(torch.ones(70, 2).T, *good)
    p8 = pack(sparse_weight(8, 70, 0.5), dtype=torch.int8)
    with pytest.raises(RuntimeError, match="scales"):
        ext.sparse_linear(x, p8.bitmask, p8.offsets, p8.values, None, p8.row_sums, None, True, 0)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def broken(verbose):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(loader, "_build", broken)
    monkeypatch.setattr(loader, "_state", {})
    monkeypatch.setattr(ops, "_isa_cache", {})
    with pytest.warns(RuntimeWarning, match="pure-torch path"):
        assert load_extension() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_extension() is None
        assert kernel_isa() == "torch"
        w = sparse_weight(37, 100, 0.7)
        x = torch.randn(3, 100)
        assert_close(sparse_linear(x, pack(w, dtype=torch.float32)), *reference(x, w, None), 1e-5)


# --------------------------------------------------------------------------- int4

INT4_SHAPES = [(37, 128, 64), (9, 256, 128), (100, 129, None), (5, 130, None), (64, 384, 128), (3, 1, None)]


def int4_weight(out: int, inn: int, group: int | None, sparsity: float, seed: int) -> PackedWeight:
    """A packed INT4 weight (row 0 empty, row 1 dense) and, past column 64, runs of empty mask words."""
    w = sparse_weight(out, inn, sparsity, seed=seed)
    if inn > 128 and out > 2:
        w[2:, 64:128] = 0  # whole mask words without a stored code
    return pack(w, dtype=torch.int4, group_size=group, act_int8=seed % 2 == 0)


@pytest.mark.parametrize("shape", INT4_SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_int4_pack_round_trip_and_layout(shape, sparsity):
    """Codes and scales are sparsify.quant.quantization's INT4 grid; unpack(pack(w)) returns them exactly;
    the bytes follow the documented layout (per mask word, ceil(p/2) bytes, code + 8, low nibble first)."""
    from sparsify.quant.quantization import quantize_codes, weight_scales

    out, inn, group = shape
    w = sparse_weight(out, inn, sparsity, seed=out + inn)
    p = pack(w, dtype=torch.int4, group_size=group)
    p.validate()
    assert p.dtype == torch.int4 and p.values.dtype == torch.uint8
    scales = weight_scales(w, 4, group, keep=w != 0, dtype=torch.float32)
    codes = quantize_codes(w, scales, 4, group)
    assert torch.equal(unpack(p), codes) and torch.equal(p.scales, scales)
    assert torch.equal(p.mask(), w != 0)
    # Brute-force layout check: walk each row's mask words and nibbles in Python.
    values, offsets = p.values.tolist(), p.offsets.tolist()
    for r in range(out):
        pos = offsets[r]
        for word in range(-(-inn // 64)):
            cols = [c for c in range(word * 64, min(inn, word * 64 + 64)) if w[r, c] != 0]
            for k, c in enumerate(cols):
                nibble = values[pos + k // 2] >> (4 * (k % 2)) & 0xF
                assert nibble - 8 == codes[r, c]
            pos += (len(cols) + 1) // 2
        assert pos == offsets[r + 1]
    deq = dequantize(p)
    assert torch.allclose(deq, codes.float() * scales.repeat_interleave(group or inn, 1)[:, :inn])


@pytest.mark.parametrize("isa", ["torch", *ISA_NAMES])
def test_int4_kernels_match_dequantized_reference(compiled_isas, isa):
    """W4A8 and W4A16 on every path against an independent reference: x (fake-quantized per token for
    W4A8) times the dequantized weight, in float64 — every batch size, odd widths, empty words."""
    if isa != "torch" and isa not in compiled_isas:
        pytest.skip(f"{isa} kernels not available here")
    for i, ((out, inn, group), sparsity) in enumerate((s, p) for s in INT4_SHAPES for p in (0.0, 0.7, 0.95)):
        p = int4_weight(out, inn, group, sparsity, seed=i)
        bias = torch.randn(out) if i % 3 else None
        for batch in BATCHES:
            x = torch.randn(batch, inn)
            xq = fake_quantize_per_token(x) if p.act_int8 else x
            assert_close(sparse_linear(x, p, bias, isa=isa), *reference(xq, dequantize(p), bias), 1e-5)


@pytest.mark.parametrize("isa", ISA_NAMES)
def test_w4a8_group_sums_are_exact(compiled_isas, isa):
    """W4A8: every path computes each group's exact integer sum — worst-case magnitudes (codes ±7
    against q = −128) and words with no stored code (the AVX-512 kernel's 8·Σq correction must count
    those columns too). With unit scales the result is that integer times the token's scale, so
    kernel and float64 reference agree bit for bit."""
    if isa not in compiled_isas:
        pytest.skip(f"{isa} kernels not available here")
    codes = torch.full((4, 4096), 7, dtype=torch.int8)
    codes[1] = -7
    codes[2, 64:1024] = 0  # empty mask words inside groups
    codes[3, ::3] = 0
    x = -torch.ones(17, 4096)
    x[:, 0] = 1.0
    x[5:] = torch.randn(12, 4096)
    for group in (64, 128, None):
        groups = 1 if group is None else 4096 // group
        p = pack(codes, dtype=torch.int4, scales=torch.ones(4, groups), group_size=group)
        for batch in (1, 2, 3, 4, 5, 8, 9, 16, 17):
            assert torch.equal(sparse_linear(x[:batch], p, isa=isa), torch_sparse_linear(x[:batch], p)), (group, batch)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(group_size=96), "multiple of 64"),
        (dict(group_size=100), "multiple of 64"),
        (dict(group_size=64, dtype=torch.int8), "group_size applies to dtype=torch.int4"),
    ],
)
def test_int4_pack_rejects_bad_groups(kwargs, match):
    w = sparse_weight(4, 192, 0.5)
    with pytest.raises(ValueError, match=match):
        pack(w, **({"dtype": torch.int4} | kwargs))


def test_int4_rejects_codes_off_the_grid_and_corrupt_tensors(compiled_isas):
    codes = torch.zeros(2, 128, dtype=torch.int8)
    codes[0, 0] = 8
    with pytest.raises(ValueError, match=r"\[-7, 7\]"):
        pack(codes, dtype=torch.int4, scales=torch.ones(2, 1))
    p = pack(sparse_weight(3, 128, 0.5), dtype=torch.int4, group_size=64)
    import dataclasses

    with pytest.raises(ValueError, match="scales"):
        dataclasses.replace(p, scales=p.scales[:, :1].contiguous()).validate()
    bad = p.values.clone()
    bad[0] = 0  # nibble 0 = code −8: off the symmetric grid
    with pytest.raises(ValueError, match=r"\[-7, 7\]"):
        dataclasses.replace(p, values=bad).validate()
    # Each word's codes fill its bytes low nibble first; an odd count leaves the last high nibble as padding.
    counts = p.mask().view(3, 2, 64).sum(-1).flatten().tolist()
    ends = list(itertools.accumulate((c + 1) // 2 for c in counts))
    odd = next(i for i, c in enumerate(counts) if c % 2 and c > 1)
    pad, code = ends[odd] - 1, ends[odd] - 2  # the padding's byte; the byte before holds two codes
    assert p.values[pad] >> 4 == 0
    dataclasses.replace(p, values=p.values.clone()).validate()  # zero padding is fine
    for byte, nibble in ((code, 0xF0), (code, 0x0F), (pad, 0x0F)):
        bad = p.values.clone()
        bad[byte] &= ~nibble & 0xFF  # a code's nibble to 0
        with pytest.raises(ValueError, match=r"\[-7, 7\]"):
            dataclasses.replace(p, values=bad).validate()
    padded = p.values.clone()
    padded[pad] |= 0x30  # the padding nibble is not a code: anything goes
    dataclasses.replace(p, values=padded).validate()
    with pytest.raises(ValueError, match="offsets"):
        dataclasses.replace(p, offsets=p.offsets + torch.arange(4)).validate()
    if compiled_isas:
        with pytest.raises(RuntimeError, match="group_size"):
            load_extension().sparse_linear(
                torch.randn(1, 128), p.bitmask, p.offsets, p.values, p.scales, None, None, True, 0, 96
            )


# --------------------------------------------------------------------------- decode attention

# (heads, kv_heads, head_dim, length, capacity): one key; lengths off the 4-key blocks; head_dim off
# every vector width; grouped-query (2x, 4x, and 72 query heads on one kv head); and one big enough
# for two threads (kv·length·dim ≥ 2^16).
ATTENTION_CASES = [
    (4, 4, 24, 1, 3),
    (8, 2, 72, 33, 40),
    (6, 3, 16, 7, 7),
    (8, 8, 128, 5, 64),
    (72, 1, 16, 9, 10),
    (32, 8, 32, 300, 301),
]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, scale: float) -> torch.Tensor:
    """softmax(scale · q kᵀ) v in float64, written out: query head i reads kv head i // (heads / kv_heads)."""
    group = q.shape[0] // k.shape[0]
    kk = k[:, :length].double().repeat_interleave(group, 0)  # [heads, length, dim]
    vv = v[:, :length].double().repeat_interleave(group, 0)
    s = torch.einsum("hd,hld->hl", q.double(), kk) * scale
    p = torch.exp(s - s.max(-1, keepdim=True).values)
    return torch.einsum("hl,hld->hd", p / p.sum(-1, keepdim=True), vv)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["torch", *ISA_NAMES])
def test_decode_attention_matches_float64_reference(compiled_isas, isa, cache_dtype):
    """Every path against the written-out softmax, with nan in the cache slots past `length` (never read)."""
    if isa != "torch" and isa not in compiled_isas:
        pytest.skip(f"{isa} kernels not available here")
    g = torch.Generator().manual_seed(0)
    for heads, kv_heads, dim, length, capacity in ATTENTION_CASES:
        q = torch.randn(heads, dim, generator=g) * 2
        k, v = (torch.randn(kv_heads, capacity, dim, generator=g).to(cache_dtype) for _ in range(2))
        k[:, length:], v[:, length:] = float("nan"), float("nan")
        scale = 0.7 / dim**0.5
        out = ops.decode_attention(q, k, v, length, scale, isa=isa)
        assert out.dtype == torch.float32 and out.shape == (heads, dim)
        ref = attention_reference(q, k, v, length, scale)
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-5, msg=f"{(heads, kv_heads, dim, length)}")
        # bf16 queries: the same computation from the rounded q, the output rounded to bf16
        qb = q.bfloat16()
        outb = ops.decode_attention(qb, k, v, length, scale, isa=isa)
        assert outb.dtype == torch.bfloat16
        torch.testing.assert_close(outb.double(), attention_reference(qb, k, v, length, scale), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("isa", ["torch", *ISA_NAMES])
def test_decode_attention_nan_query_gives_nan_head(compiled_isas, isa):
    """A non-finite query makes its own head's output nan, never a made-up number (torch's CPU SDPA
    returns finite numbers here, so the torch path writes the softmax out)."""
    if isa != "torch" and isa not in compiled_isas:
        pytest.skip(f"{isa} kernels not available here")
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(4, 16, generator=g), torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    q[1, 3] = float("nan")
    out = ops.decode_attention(q, k, v, 9, isa=isa)
    assert out[1].isnan().all() and out[[0, 2, 3]].isfinite().all()


def test_decode_attention_default_scale_and_threads_agree(compiled_isas):
    """The default scale is head_dim^-0.5; one thread and two give the same numbers."""
    if not compiled_isas:
        pytest.skip("no compiled kernels")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(16, 64, generator=g)
    k, v = torch.randn(4, 400, 64, generator=g), torch.randn(4, 400, 64, generator=g)
    ref = attention_reference(q, k, v, 400, 64**-0.5)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.testing.assert_close(ops.decode_attention(q, k, v, 400).double(), ref, atol=2e-6, rtol=2e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("shapes", "length", "match"),
    [
        (((8, 16), (3, 4, 16), (3, 4, 16)), 2, "multiple of kv_heads"),
        (((8, 16), (2, 4, 16), (2, 4, 8)), 2, "one shape"),
        (((8, 16), (2, 4, 32), (2, 4, 32)), 2, "one shape"),
        (((8, 16), (2, 4, 16), (2, 4, 16)), 5, r"length must be in \[1, 4\]"),
        (((8, 16), (2, 4, 16), (2, 4, 16)), 0, r"length must be in \[1, 4\]"),
    ],
)
def test_decode_attention_rejects_bad_shapes(shapes, length, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        ops.decode_attention(q, k, v, length)


def test_decode_attention_rejects_other_dtypes():
    q, k = torch.zeros(4, 8), torch.zeros(2, 3, 8)
    with pytest.raises(TypeError, match="k must be a float32 or bfloat16"):
        ops.decode_attention(q, k.half(), k.half(), 1)
    with pytest.raises(ValueError, match="one shape and dtype"):
        ops.decode_attention(q, k, k.bfloat16(), 1)
