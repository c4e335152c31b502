"""Registration: torch.library.opcheck on every op, torch.compile(fullgraph=True), autograd
refusal, and what the build reports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import zfkernels
from zfkernels import reference


def sample_args(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 11, 13, generator=gen).to(device)
    out, switches = zfkernels.maxpool_switches(x, 3, 2, 1, ceil_mode=True)
    y = torch.randn(out.shape, generator=gen).to(device)
    weight = torch.randn(4, 3, 3, 3, generator=gen).to(device)
    maps = torch.randn(5, 1, 6, 7, generator=gen).to(device)
    channels = torch.tensor([0, 3, 3, 1, 2], device=device)
    rows = torch.tensor([1, 0, 1], device=device)
    y_rows = torch.randn((3,) + tuple(y.shape[1:]), generator=gen).to(device)
    dilated_out, dilated_switches = zfkernels.maxpool_switches(x, 3, 2, 1, 2, False)
    dilated_y = torch.randn(dilated_out.shape, generator=gen).to(device)
    grouped = torch.randn(4, 3, 3, 3, generator=gen).to(device)  # groups=2: C_in = 6
    depthwise = torch.randn(4, 1, 3, 3, generator=gen).to(device)
    ops = torch.ops.zfkernels
    return {
        "maxpool": (ops.maxpool_switches.default, (x, [3, 3], [2, 2], [1, 1], True)),
        "maxpool-channels-last": (ops.maxpool_switches.default, (x.contiguous(memory_format=torch.channels_last), [2, 3], [1, 2], [0, 1], False)),
        "maxpool-bf16-empty": (ops.maxpool_switches.default, (x[:0].bfloat16(), [3, 3], [2, 2], [0, 0], True)),
        "maxpool-one-channel-channels-last": (ops.maxpool_switches.default, (x[:, :1].contiguous(memory_format=torch.channels_last), [3, 3], [2, 2], [0, 0], True)),
        "maxpool-sliced": (ops.maxpool_switches.default, (x[..., ::2], [2, 2], [1, 1], [1, 1], False)),
        "switches_to_indices": (ops.switches_to_indices.default, (switches, [11, 13], [3, 3], [2, 2], [1, 1])),
        "unpool-rectify": (ops.unpool.default, (y, switches, [11, 13], [3, 3], [2, 2], [1, 1], None, True)),
        "unpool-rows": (ops.unpool.default, (y_rows, switches, [11, 13], [3, 3], [2, 2], [1, 1], rows, False)),
        "unpool-half-channels-last": (ops.unpool.default, (y.half().contiguous(memory_format=torch.channels_last), switches, [11, 13], [3, 3], [2, 2], [1, 1], None, True)),
        "project-channels": (ops.project.default, (maps, weight, [2, 2], [1, 1], [1, 0], channels)),
        "project-dense": (ops.project.default, (torch.randn(2, 4, 6, 7, generator=gen).to(device), weight, [1, 1], [1, 1], [0, 0], None)),
        "project-dense-channels-last-half": (ops.project.default, (torch.randn(2, 4, 6, 7, generator=gen).to(device, torch.float16).contiguous(memory_format=torch.channels_last), weight.half(), [3, 3], [0, 0], [2, 1], None)),
        # dilation, groups and unbatched input
        "maxpool-dilated": (ops.maxpool_switches.default, (x, [3, 2], [2, 1], [1, 1], True, [2, 3])),
        "maxpool-unbatched": (ops.maxpool_switches.default, (x[0], [3, 3], [2, 2], [1, 1], False, [2, 2])),
        "switches_to_indices-dilated-unbatched": (ops.switches_to_indices.default, (dilated_switches[0], [11, 13], [3, 3], [2, 2], [1, 1], [2, 2])),
        "unpool-dilated-rows": (ops.unpool.default, (dilated_y[[1, 0, 1]], dilated_switches, [11, 13], [3, 3], [2, 2], [1, 1], rows, True, [2, 2])),
        "unpool-unbatched": (ops.unpool.default, (dilated_y[0], dilated_switches[0], [11, 13], [3, 3], [2, 2], [1, 1], None, False, [2, 2])),
        "project-channels-grouped-dilated": (ops.project.default, (maps, grouped, [2, 2], [1, 1], [1, 0], channels, 2, [2, 2])),
        "project-channels-depthwise": (ops.project.default, (maps, depthwise, [2, 2], [1, 1], [0, 0], channels, 4, [1, 1])),
        "project-dense-grouped-unbatched": (ops.project.default, (torch.randn(4, 6, 7, generator=gen).to(device), grouped, [1, 2], [1, 0], [0, 1], None, 2, [3, 1])),
    }


SAMPLE_NAMES = list(sample_args("cpu"))


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_opcheck(device, name):
    """Schema, fake kernel, autograd registration and AOT dispatch, all default test_utils."""
    op, args = sample_args(device)[name]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    """maxpool_switches -> unpool(rectify, rows) -> project(channels) and dense project, plus
    switches_to_indices, traced in one graph (aot_eager: no C compiler needed)."""
    weight = torch.randn(8, 3, 5, 5, device=device)

    def deconv_step(x: torch.Tensor, channels: torch.Tensor, rows: torch.Tensor):
        pooled, switches = zfkernels.maxpool_switches(x, 3, 2, 0, ceil_mode=True)
        up = zfkernels.unpool(pooled[rows], switches, x.shape[-2:], 3, 2, 0, rows=rows, rectify=True)
        single = zfkernels.project(up[:, :1], weight, 2, 0, channels=channels)
        dense = zfkernels.project(up, weight, 2, 2, output_size=(30, 30))
        return single, dense, zfkernels.switches_to_indices(switches, x.shape[-2:], 3, 2, 0)

    compiled = torch.compile(deconv_step, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 8, 15, 15, device=device)
    channels = torch.tensor([1, 7, 1, 0], device=device)
    rows = torch.tensor([2, 0, 2, 1], device=device)
    got, want = compiled(x, channels, rows), deconv_step(x, channels, rows)
    assert got[1].shape == (4, 3, 30, 30)
    for a, b in zip(got, want):
        assert torch.equal(a, b)

    # and the same pipeline through the reference
    pooled, switches = reference.maxpool_switches(x, 3, 2, 0, ceil_mode=True)
    up = reference.unpool(pooled[rows], switches, (15, 15), 3, 2, 0, rows=rows, rectify=True)
    torch.testing.assert_close(got[0], reference.project(up[:, :1], weight, 2, 0, channels=channels))
    torch.testing.assert_close(got[1], reference.project(up, weight, 2, 2, output_size=(30, 30)))

    grouped = torch.randn(8, 2, 3, 3, device=device)  # 4 groups: C_in = 8
    depthwise = torch.randn(8, 1, 3, 3, device=device)

    def dilated_grouped_step(x: torch.Tensor, channels: torch.Tensor):
        pooled, switches = zfkernels.maxpool_switches(x, 3, 2, 1, 2, True)
        up = zfkernels.unpool(pooled, switches, x.shape[-2:], 3, 2, 1, 2, rectify=True)
        single = zfkernels.project(up[:, :1], grouped, 2, 1, groups=4, dilation=2, channels=channels)
        dense = zfkernels.project(up, depthwise, 1, 1, groups=8)
        unbatched = zfkernels.maxpool_switches(x[0], 2, 1, 0, 3)
        return single, dense, unbatched[0], unbatched[1]

    compiled = torch.compile(dilated_grouped_step, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 8, 15, 15, device=device)
    traced, eager = compiled(x, channels), dilated_grouped_step(x, channels)
    assert traced[0].shape == (4, 8, 31, 31) and traced[2].shape == (8, 12, 12)
    for a, b in zip(traced, eager):
        assert torch.equal(a, b)
    pooled, switches = reference.maxpool_switches(x, 3, 2, 1, 2, True)
    up = reference.unpool(pooled, switches, (15, 15), 3, 2, 1, 2, rectify=True)
    torch.testing.assert_close(traced[0], reference.project(up[:, :1], grouped, 2, 1, groups=4, dilation=2, channels=channels))
    torch.testing.assert_close(traced[1], reference.project(up, depthwise, 1, 1, groups=8))


def test_backward_through_an_op_raises(device):
    """What torch does here: each op has an autograd formula that raises (zfkernels/ops/autograd.py),
    so outputs computed from a tensor that requires grad do require grad, and backward raises a
    RuntimeError naming the op; no gradient is ever produced. The uint8/int64 outputs never
    require grad."""
    x = torch.randn(1, 2, 6, 6, device=device, requires_grad=True)
    out, _ = zfkernels.maxpool_switches(x, 2)
    with pytest.raises(RuntimeError, match=r"zfkernels.maxpool_switches: this op is inference-only"):
        out.sum().backward()
    weight = torch.nn.Conv2d(3, 2, 3).weight.to(device)  # a Parameter: requires grad
    projected = zfkernels.project(torch.randn(1, 2, 4, 4, device=device), weight)
    with pytest.raises(RuntimeError, match=r"zfkernels.project: this op is inference-only"):
        projected.sum().backward()
    with torch.no_grad():
        assert not zfkernels.maxpool_switches(x, 2)[0].requires_grad
    assert x.grad is None and weight.grad is None


def test_backward_through_unpool_raises(device):
    x = torch.randn(1, 2, 6, 6, device=device)
    _, switches = zfkernels.maxpool_switches(x, 2)
    assert not switches.requires_grad
    assert not zfkernels.switches_to_indices(switches, (6, 6), 2).requires_grad
    y = torch.randn(1, 2, 3, 3, device=device, requires_grad=True)
    up = zfkernels.unpool(y, switches, (6, 6), 2, rectify=True)
    assert up.requires_grad
    with pytest.raises(RuntimeError, match=r"zfkernels.unpool: this op is inference-only"):
        up.sum().backward()
    with pytest.raises(RuntimeError, match=r"zfkernels.unpool: this op is inference-only"):
        torch.autograd.grad(up.sum(), y)
    assert y.grad is None
    # Detached inputs: an ordinary inference result.
    assert not zfkernels.unpool(y.detach(), switches, (6, 6), 2).requires_grad


def test_reference_and_ops_share_signatures():
    import inspect

    for name in ("maxpool_switches", "switches_to_indices", "unpool", "project"):
        ours = inspect.signature(getattr(zfkernels, name))
        ref = inspect.signature(getattr(reference, name))
        assert list(ours.parameters) == list(ref.parameters), name


def release(version: str) -> tuple:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def test_build_info_reports_what_was_compiled():
    info = zfkernels.build_info()
    assert info["cpu"] is True and isinstance(info["cuda"], bool)
    # One build serves every torch from its stable-ABI target on (the CI runs it under two).
    assert info["torch_runtime"] == torch.__version__
    assert release(info["stable_abi"]) <= release(info["torch"])
    assert release(info["stable_abi"]) <= release(torch.__version__)
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_archs"]
    assert zfkernels.has_cuda() == (info["cuda"] and torch.cuda.is_available())
    assert hasattr(torch.ops.zfkernels, "unpool")


def test_the_library_uses_only_the_stable_abi():
    """Every torch symbol the library imports is a C function of the stable ABI's shims
    (aoti_torch_*, torch_*): no C++ symbol of libtorch, c10 or libtorch_python, whose ABI changes
    from one torch release to the next."""
    import shutil

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed")
    library = zfkernels._C.__file__
    undefined = subprocess.run([nm, "-D", "-C", "--undefined-only", library], capture_output=True, text=True,
                               check=True).stdout
    names = [line.split(None, 1)[-1].split("@")[0] for line in undefined.splitlines() if line.strip()]
    cxx_torch = [n for n in names if any(k in n for k in ("c10::", "at::", "torch::", "caffe2::", "pybind11::"))]
    assert not cxx_torch, cxx_torch
    c_torch = [n for n in names if "torch" in n]
    assert c_torch and all(n.startswith(("aoti_torch_", "torch_")) for n in c_torch), c_torch


def test_a_refusal_thrown_in_cpp_reaches_python_as_an_exception(device):
    """In a fresh process, so that a crash is reported rather than ending the test run: a library
    linked against another C++ runtime than torch's (libstdc++ linked statically) segfaults on
    every refusal. setup.py refuses such a build; this checks the library that was built."""
    code = (
        "import torch, zfkernels\n"
        "try:\n"
        f"    torch.ops.zfkernels.maxpool_switches(torch.randn(8, 8, device='{device}'), [2, 2], [2, 2], [0, 0], False)\n"
        "except ValueError as error:\n"
        "    print('raised:', error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.startswith("raised: maxpool_switches:") and "4-D" in done.stdout, done.stdout


def refusals(device):
    """One call per shape refusal of every op (value refusals need the data and are eager-only)."""
    ops = torch.ops.zfkernels
    x = torch.randn(2, 3, 11, 13, device=device)
    sw = torch.zeros(2, 3, 5, 6, dtype=torch.uint8, device=device)
    y = torch.randn(2, 3, 5, 6, device=device)
    w = torch.randn(8, 5, 3, 3, device=device)
    maps = torch.randn(2, 1, 6, 6, device=device)
    ch = torch.tensor([0, 1], device=device)
    dense = torch.randn(2, 8, 6, 6, device=device)
    return {
        "maxpool-rank": (ops.maxpool_switches, (x[0, 0], [2, 2], [2, 2], [0, 0], False)),
        "maxpool-dtype": (ops.maxpool_switches, (x.int(), [2, 2], [2, 2], [0, 0], False)),
        "maxpool-kernel-pair": (ops.maxpool_switches, (x, [2, 2, 2], [2, 2], [0, 0], False)),
        "maxpool-kernel": (ops.maxpool_switches, (x, [0, 2], [2, 2], [0, 0], False)),
        "maxpool-stride": (ops.maxpool_switches, (x, [2, 2], [2, -1], [0, 0], False)),
        "maxpool-dilation": (ops.maxpool_switches, (x, [2, 2], [2, 2], [0, 0], False, [0, 1])),
        "maxpool-padding": (ops.maxpool_switches, (x, [3, 3], [2, 2], [2, 0], False)),
        "maxpool-taps": (ops.maxpool_switches, (torch.randn(1, 1, 20, 20, device=device), [17, 17], [1, 1], [0, 0], False)),
        "maxpool-span": (ops.maxpool_switches, (x, [3, 3], [1, 1], [0, 0], False, [6, 1])),
        "maxpool-empty-window": (ops.maxpool_switches, (x[..., :2, :], [2, 2], [1, 1], [1, 0], False, [3, 1])),
        "indices-rank": (ops.switches_to_indices, (sw[0, 0], [11, 13], [3, 3], [2, 2], [0, 0])),
        "indices-dtype": (ops.switches_to_indices, (sw.int(), [11, 13], [3, 3], [2, 2], [0, 0])),
        "indices-input-size": (ops.switches_to_indices, (sw, [0, 13], [3, 3], [2, 2], [0, 0])),
        "indices-fit": (ops.switches_to_indices, (sw, [20, 13], [3, 3], [2, 2], [0, 0])),
        "indices-dilation": (ops.switches_to_indices, (sw, [11, 13], [3, 3], [2, 2], [0, 0], [1, -1])),
        "unpool-rank": (ops.unpool, (y[0, 0], sw, [11, 13], [3, 3], [2, 2], [0, 0], None, False)),
        "unpool-dtype": (ops.unpool, (y.int(), sw, [11, 13], [3, 3], [2, 2], [0, 0], None, False)),
        "unpool-shape": (ops.unpool, (y, sw[:, :2], [11, 13], [3, 3], [2, 2], [0, 0], None, False)),
        "unpool-rows-shape": (ops.unpool, (y, sw[:, :2], [11, 13], [3, 3], [2, 2], [0, 0], ch, False)),
        "unpool-rows-dtype": (ops.unpool, (y, sw, [11, 13], [3, 3], [2, 2], [0, 0], ch.int(), False)),
        "unpool-rows-length": (ops.unpool, (y, sw, [11, 13], [3, 3], [2, 2], [0, 0], ch[:1], False)),
        "unpool-rows-unbatched": (ops.unpool, (y[0], sw, [11, 13], [3, 3], [2, 2], [0, 0], ch, False)),
        "unpool-fit": (ops.unpool, (y, sw, [11, 13], [3, 3], [2, 2], [0, 0], None, False, [2, 2])),
        "unpool-span": (ops.unpool, (y, sw, [11, 13], [3, 3], [2, 2], [0, 0], None, False, [7, 7])),
        "project-rank": (ops.project, (dense[0, 0], w, [1, 1], [0, 0], [0, 0], None)),
        "project-channels-rank": (ops.project, (maps[0], w, [1, 1], [0, 0], [0, 0], ch[:1])),
        "project-weight-rank": (ops.project, (dense, w[0], [1, 1], [0, 0], [0, 0], None)),
        "project-weight-dtype": (ops.project, (dense, w.double(), [1, 1], [0, 0], [0, 0], None)),
        "project-weight-empty": (ops.project, (dense, w[:, :0], [1, 1], [0, 0], [0, 0], None)),
        "project-stride": (ops.project, (dense, w, [0, 1], [0, 0], [0, 0], None)),
        "project-padding": (ops.project, (dense, w, [1, 1], [-1, 0], [0, 0], None)),
        "project-output-padding": (ops.project, (dense, w, [2, 2], [0, 0], [2, 0], None)),
        "project-dilation": (ops.project, (dense, w, [1, 1], [0, 0], [0, 0], None, 1, [1, 0])),
        "project-span": (ops.project, (dense, w, [1, 1], [0, 0], [0, 0], None, 1, [2**29, 1])),
        "project-groups": (ops.project, (dense, w, [1, 1], [0, 0], [0, 0], None, 0)),
        "project-groups-divide": (ops.project, (dense, w, [1, 1], [0, 0], [0, 0], None, 3)),
        "project-channels-maps": (ops.project, (dense, w, [1, 1], [0, 0], [0, 0], ch)),
        "project-channels-dtype": (ops.project, (maps, w, [1, 1], [0, 0], [0, 0], ch.int())),
        "project-channels-length": (ops.project, (maps, w, [1, 1], [0, 0], [0, 0], ch[:1])),
        "project-c-out": (ops.project, (dense[:, :7], w, [1, 1], [0, 0], [0, 0], None)),
        "project-output-size": (ops.project, (dense, w, [1, 1], [5, 5], [0, 0], None)),
        "project-output-limit": (ops.project, (maps, w, [2**29 + 1, 1], [0, 0], [0, 0], ch)),
    }


@pytest.mark.parametrize("name", list(refusals("cpu")))
def test_a_refusal_reads_the_same_under_fake_tensors(device, name):
    """The fake kernels make every shape check of the C++ kernels, with the same message: a
    refusal under torch.compile / FakeTensor reads as it does eagerly."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op, args = refusals(device)[name]
    with pytest.raises((ValueError, TypeError)) as eager:
        op(*args)
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode, pytest.raises((ValueError, TypeError)) as traced:
        op(*fake_args)
    assert type(traced.value) is type(eager.value)
    assert str(traced.value).splitlines()[0] == str(eager.value).splitlines()[0]
    assert str(eager.value).startswith(op._qualified_op_name.split("::")[1] + ":")
