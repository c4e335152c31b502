"""PyTorch's own OpInfo sample inputs (the samples PyTorch tests itself with) through our ops.

``nn.functional.max_pool2d`` -> ``maxpool_switches``, ``max_pool2d_with_indices_backward`` ->
``unpool`` and ``nn.functional.conv_transpose2d`` -> ``project``, in float32, float64, float16 and
bfloat16, on the CPU and (when visible) CUDA, through the ops and the reference. Every sample must
be accepted. Pooled values and indices match exactly; the adjoint matches aten's backward (or, in
half precision, is no further from the float64 result than aten's own); the projection is no
further from the float64 result than PyTorch's own ``F.conv_transpose2d``. Each test prints how
many samples it ran (``pytest -s``), and asserts there were some. Needs ``expecttest`` (which
``torch.testing._internal`` imports).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import zfkernels
from zfkernels import reference

from conftest import assert_same_values

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@functools.lru_cache(maxsize=None)
def _opinfo(name: str):
    from torch.testing._internal.common_methods_invocations import op_db

    (info,) = [op for op in op_db if op.name == name and op.variant_test_name == ""]
    return info


def samples(name: str, device: str, dtype: torch.dtype) -> list:
    return list(_opinfo(name).sample_inputs(device, dtype, requires_grad=False))


def distinct_pool_samples(name: str, device: str, dtype: torch.dtype) -> tuple:
    """The max-pooling samples, and how many there were: each comes with return_indices True
    and False, the same input for ops that always return switches, so each runs once."""
    everything = samples(name, device, dtype)
    seen, kept = set(), []
    for sample in everything:
        kw = {k: v for k, v in sample.kwargs.items() if k != "return_indices"}
        key = (sample.input.data_ptr(), repr(sorted(kw.items())))
        if key not in seen:
            seen.add(key)
            kept.append(sample)
    return kept, len(everything)


def pool_arguments(sample):
    """(kernel, stride, padding, dilation, ceil_mode) of a max_pool2d sample, as pairs."""
    kw = dict(sample.kwargs)
    kernel = kw["kernel_size"]
    stride = kw.get("stride") or kernel  # max_pool2d's default stride is the kernel
    return zfkernels.ops.geometry("opinfo", kernel, stride, kw.get("padding", 0), kw.get("dilation", 1)) + (
        bool(kw.get("ceil_mode", False)),
    )


def report(op: str, name: str, dtype: torch.dtype, device: str, count: int, total: int) -> None:
    assert count > 0, f"no OpInfo samples of {name}"
    print(f"{op}: {total} OpInfo samples of {name} in {dtype} on {device} ({count} distinct inputs): "
          "all accepted and matching")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_pool2d_samples(device, dtype):
    count = 0
    distinct, total = distinct_pool_samples("nn.functional.max_pool2d", device, dtype)
    for sample in distinct:
        x = sample.input
        kernel, stride, padding, dilation, ceil = pool_arguments(sample)
        expected, indices = F.max_pool2d(x, kernel, stride, padding, dilation, ceil, return_indices=True)
        out, switches = zfkernels.maxpool_switches(x, kernel, stride, padding, dilation, ceil)
        assert_same_values(out, expected)
        assert torch.equal(zfkernels.switches_to_indices(switches, x.shape[-2:], kernel, stride, padding, dilation), indices)
        ref_out, ref_switches = reference.maxpool_switches(x, kernel, stride, padding, dilation, ceil)
        assert_same_values(ref_out, expected)
        assert torch.equal(ref_switches, switches), sample
        count += 1
    report("maxpool_switches", "nn.functional.max_pool2d", dtype, device, count, total)


def no_further_from(exact: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """``ours`` is at most as far from the float64 ``exact`` as ``theirs``, elementwise, up to
    one rounding of the element in ``ours``' dtype."""
    ulp = torch.finfo(ours.dtype).eps * exact.abs()
    err_ours, err_theirs = (ours.double() - exact).abs(), (theirs.double() - exact).abs()
    worse = err_ours > err_theirs + ulp
    assert not worse.any(), f"{int(worse.sum())} elements further from float64 than PyTorch's own"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_pool2d_with_indices_backward_samples(device, dtype):
    gen = torch.Generator().manual_seed(0)
    count = 0
    distinct, total = distinct_pool_samples("max_pool2d_with_indices_backward", device, dtype)
    for sample in distinct:
        x = sample.input
        kernel, stride, padding, dilation, ceil = pool_arguments(sample)
        pooled, indices = F.max_pool2d(x, kernel, stride, padding, dilation, ceil, return_indices=True)
        y = torch.randn(pooled.shape, generator=gen).to(device, dtype)
        aten = torch.ops.aten.max_pool2d_with_indices_backward(y, x, kernel, stride, padding, dilation, ceil, indices)
        _, switches = zfkernels.maxpool_switches(x, kernel, stride, padding, dilation, ceil)
        for fn in (zfkernels.unpool, reference.unpool):
            ours = fn(y, switches, x.shape[-2:], kernel, stride, padding, dilation)
            assert ours.shape == aten.shape and ours.dtype == aten.dtype
            if dtype in (torch.float32, torch.float64):
                assert torch.equal(ours, aten), sample  # the same sums in the same order
            else:  # aten adds in half precision; ours rounds the float sum once
                exact = torch.ops.aten.max_pool2d_with_indices_backward(
                    y.double(), x.double(), kernel, stride, padding, dilation, ceil, indices)
                no_further_from(exact, ours, aten)
        count += 1
    report("unpool", "max_pool2d_with_indices_backward", dtype, device, count, total)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_transpose2d_samples(device, dtype):
    count = 0
    for sample in samples("nn.functional.conv_transpose2d", device, dtype):
        x, weight = sample.input, sample.args[0]  # the bias (args[1]) is not the projection's: dropped
        kw = dict(sample.kwargs)
        stride = zfkernels.ops.pair(kw.get("stride", 1), "opinfo", "stride")
        padding = zfkernels.ops.pair(kw.get("padding", 0), "opinfo", "padding")
        out_pad = zfkernels.ops.pair(kw.get("output_padding", 0), "opinfo", "output_padding")
        dilation = zfkernels.ops.pair(kw.get("dilation", 1), "opinfo", "dilation")
        groups = kw.get("groups", 1)
        args = (stride, padding, out_pad, groups, dilation)
        theirs = F.conv_transpose2d(x, weight, None, *args)
        exact = F.conv_transpose2d(x.double(), weight.double(), None, *args)
        for fn in (zfkernels.project, reference.project):
            ours = fn(x, weight, stride, padding, tuple(theirs.shape[-2:]), groups=groups, dilation=dilation)
            assert ours.shape == theirs.shape and ours.dtype == dtype
            no_further_from(exact, ours, theirs)
        count += 1
    report("project", "nn.functional.conv_transpose2d", dtype, device, count, count)
