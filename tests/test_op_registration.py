"""Registration: torch.library.opcheck on every op, torch.compile(fullgraph=True), autograd
refusal, and what the build reports."""

from __future__ import annotations

import pytest
import torch

import zfkernels
from zfkernels import reference


def sample_args(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 11, 13, generator=gen).to(device)
    out, switches = zfkernels.maxpool_switches(x, 3, 2, 1, True)
    y = torch.randn(out.shape, generator=gen).to(device)
    weight = torch.randn(4, 3, 3, 3, generator=gen).to(device)
    maps = torch.randn(5, 1, 6, 7, generator=gen).to(device)
    channels = torch.tensor([0, 3, 3, 1, 2], device=device)
    rows = torch.tensor([1, 0, 1], device=device)
    y_rows = torch.randn((3,) + tuple(y.shape[1:]), generator=gen).to(device)
    ops = torch.ops.zfkernels
    return [
        (ops.maxpool_switches.default, (x, [3, 3], [2, 2], [1, 1], True)),
        (ops.maxpool_switches.default, (x.contiguous(memory_format=torch.channels_last), [2, 3], [1, 2], [0, 1], False)),
        (ops.switches_to_indices.default, (switches, [11, 13], [3, 3], [2, 2], [1, 1])),
        (ops.unpool.default, (y, switches, [11, 13], [3, 3], [2, 2], [1, 1], None, True)),
        (ops.unpool.default, (y_rows, switches, [11, 13], [3, 3], [2, 2], [1, 1], rows, False)),
        (ops.project.default, (maps, weight, [2, 2], [1, 1], [1, 0], channels)),
        (ops.project.default, (torch.randn(2, 4, 6, 7, generator=gen).to(device), weight, [1, 1], [1, 1], [0, 0], None)),
    ]


def test_opcheck(device):
    for op, args in sample_args(device):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    weight = torch.randn(8, 3, 5, 5, device=device)

    def deconv_step(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        pooled, switches = zfkernels.maxpool_switches(x, 3, 2, 0, True)
        up = zfkernels.unpool(pooled, switches, x.shape[-2:], 3, 2, 0, rectify=True)
        return zfkernels.project(up[:, :1], weight, 2, 0, channels=channels)

    compiled = torch.compile(deconv_step, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 8, 15, 15, device=device)
    channels = torch.tensor([1, 7, 1], device=device)
    assert torch.equal(compiled(x, channels), deconv_step(x, channels))


def test_backward_through_an_op_raises(device):
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


def test_reference_and_ops_share_signatures():
    import inspect

    for name in ("maxpool_switches", "switches_to_indices", "unpool", "project"):
        ours = inspect.signature(getattr(zfkernels, name))
        ref = inspect.signature(getattr(reference, name))
        assert list(ours.parameters) == list(ref.parameters), name


def test_build_info_reports_what_was_compiled():
    info = zfkernels.build_info()
    assert info["cpu"] is True and isinstance(info["cuda"], bool)
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_archs"]
    assert zfkernels.has_cuda() == (info["cuda"] and torch.cuda.is_available())
    assert hasattr(torch.ops.zfkernels, "unpool")
