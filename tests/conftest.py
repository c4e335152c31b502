"""Shared fixtures: devices (CPU always, CUDA when a GPU is visible), dtypes, layouts, data.
Photographs come from ``_images``; under ``CI=true`` a skip for any reason but CUDA fails
(``_skips``)."""

from __future__ import annotations

from typing import Callable, Dict

import signal

import pytest
import torch

import zfkernels

from _skips import pytest_runtest_makereport  # noqa: F401 (a hook: pytest finds it in this module)


def pytest_configure(config: pytest.Config) -> None:
    """Tests send SIGINT to runs (Ctrl-C) and check the default handler is put back. A test
    runner started in the background by a shell inherits SIGINT *ignored*, which its
    subprocesses would inherit too: give the runner Python's default handler (children then
    start with the system default)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


CUDA_REASON = "no CUDA GPU visible, or the CUDA kernels were not compiled"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not zfkernels.has_cuda(), reason=CUDA_REASON)]),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (input H, W), kernel, stride, padding, ceil_mode: kernels 1-7 (square and not), strides 1-3,
# padding up to half the kernel, odd and tiny maps.
POOL_GEOMETRIES = [
    ((11, 13), 3, 2, 0, True),
    ((11, 13), 3, 2, 1, False),
    ((110, 110), 3, 2, 0, True),  # ZFNet pool1
    ((26, 26), 3, 2, 0, True),  # ZFNet pool2
    ((13, 13), 3, 2, 0, False),  # ZFNet pool5
    ((14, 14), 2, 2, 0, False),  # VGG
    ((7, 5), 2, 2, 1, True),
    ((9, 9), (3, 2), (1, 3), (1, 1), True),
    ((8, 10), 1, 1, 0, False),
    ((8, 10), 1, 3, 0, True),
    ((9, 12), 4, 3, 2, True),
    ((9, 9), 3, 1, 1, False),
    ((10, 11), 5, 2, 2, False),
    ((12, 9), 7, 3, 3, True),
    ((7, 7), 7, 1, 0, False),
    ((1, 1), 1, 1, 0, False),
    ((2, 3), 2, 1, 1, True),
    ((3, 2), 3, 3, 1, True),
    ((16, 16), 16, 16, 0, False),  # a 256-element window: the largest a switch addresses
    ((13, 11), 6, 3, 3, False),
    ((6, 6), 6, 1, 0, True),  # one window covering the whole map
    ((10, 12), (6, 2), (2, 3), (3, 1), True),
    ((5, 9), (1, 5), (1, 2), (0, 2), True),
    ((8, 8), (2, 7), (3, 1), (1, 3), False),
    ((5, 7), (7, 1), (2, 1), (3, 0), True),
    ((7, 5), 3, 3, 1, False),
]
# A handful of the above, for tests that multiply them by dtypes and layouts.
SMALL_GEOMETRIES = [
    ((11, 13), 3, 2, 1, True),
    ((2, 3), 2, 1, 1, True),
    ((12, 9), 7, 3, 3, True),
    ((10, 12), (6, 2), (2, 3), (3, 1), True),
    ((8, 10), 1, 3, 0, True),
]
HOSTILE_KINDS = ["normal", "ties", "relu", "nonfinite", "neg_inf"]


def geometry_id(g) -> str:
    return "x".join(map(str, g[0])) + f"-k{g[1]}s{g[2]}p{g[3]}{'c' if g[4] else ''}"


if torch.cuda.is_available():
    # Compare against references in true float32: no TF32 in cuDNN or cuBLAS.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


def sliced(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view: every other column of a wider tensor."""
    wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1] + 1,), dtype=t.dtype, device=t.device)
    wide[..., 1::2] = t
    view = wide[..., 1::2]
    if t.numel() > 0:  # (an empty tensor counts as contiguous whatever its strides)
        assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
    return view


LAYOUTS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "nchw": lambda t: t.contiguous(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "sliced": sliced,
}


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> Callable[[torch.Tensor], torch.Tensor]:
    return LAYOUTS[request.param]


def hostile(shape, kind: str, generator: torch.Generator) -> torch.Tensor:
    """float32 values of ``shape`` (on the CPU) that stress argmax selection."""
    x = torch.randn(shape, generator=generator)
    if kind == "ties":  # heavy ties: values from {0, 1}
        x = (x > 0).float()
    elif kind == "relu":  # many all-zero windows, as after a ReLU
        x = torch.relu(x - 1.0)
    elif kind == "nonfinite":  # NaN, +inf and -inf sprinkled over the map
        flat = x.view(-1)
        picks = torch.randperm(flat.numel(), generator=generator)[: max(3, flat.numel() // 7)]
        values = torch.tensor([float("nan"), float("inf"), float("-inf")])
        flat[picks] = values[torch.arange(picks.numel()) % 3]
    elif kind == "neg_inf":  # windows holding nothing but -inf
        x.fill_(float("-inf"))
        x.view(-1)[::5] = 1.0
    else:
        assert kind == "normal", kind
    return x


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exactly equal, with NaN where the other has NaN (and infinities compared as such)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan = torch.isnan(actual)
    assert torch.equal(nan, torch.isnan(expected))
    assert torch.equal(torch.where(nan, 0, actual), torch.where(nan, 0, expected))


def tolerance(dtype: torch.dtype) -> Dict[str, float]:
    """Sums of a few terms in float, rounded once to dtype."""
    return {
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    }[dtype]
