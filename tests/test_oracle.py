"""The float64 autograd oracle (``_oracle.graph_oracle``) checked against references derived by
hand, so that the engine is tested against something that is itself tested (docs/engine.md,
"Semantics: one rule per operation"; issue #18).

- a pointwise activation between two 1x1 convolutions, in every mode, module and functional
  (in place too): relu(signal), relu(signal) * g(x), signal * phi'(x), from closed forms;
- squeeze-excitation gates (torchvision's, hand-written, self-gated): the signal times s, and
  nothing down the branch (a change of the branch's weights that keeps s changes the true
  gradient, not the projection);
- LayerNorm, LayerNorm2d, GroupNorm, RMSNorm: g - mean(g) with g = gamma * signal / sigma;
- attention (nn.MultiheadAttention with one and two heads, scaled_dot_product_attention called
  in the graph, einsum with softmax): values receive A^T * signal; a change of the query and key
  weights that keeps A changes the true gradient, not the projection;
- backprop mode is plain autograd on the unpatched model; float32 follows float64;
- token grids (ViT, Swin): a selection's seed sits at token 1 + y*W + x or at [y, x, c];
- after a run (a failing one too) the model, torch.nn.functional and torch are as before.
The nine families of issue #18 run through the oracle at random init (slow).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.models as tvm
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.feature_extraction import create_feature_extractor

from _oracle import GraphOracle, graph_oracle, present, presented_output, relative_error

TIGHT = 1e-12
MODES = ("deconvnet", "guided", "backprop")


def selections(x: torch.Tensor, channels=(1, 3), position=(1, 2)):
    """Two selections per image: the given channels, at ``position`` or the whole map."""
    rows = torch.arange(x.shape[0]).repeat_interleave(len(channels))
    chans = torch.tensor(channels).repeat(x.shape[0])
    return rows, chans, torch.tensor([position]).repeat(rows.shape[0], 1)


def seed_of(out: torch.Tensor, rows, channels, positions) -> torch.Tensor:
    """The seed as the oracle defines it, built here on a presented (B', C, H, W) map whose row i
    is selection i's image: the selected activation, everything else zero."""
    seed = torch.zeros_like(out)
    i = torch.arange(rows.shape[0])
    if positions is None:
        seed[i, channels] = out[i, channels]
    else:
        seed[i, channels, positions[:, 0], positions[:, 1]] = out[i, channels, positions[:, 0], positions[:, 1]]
    return seed


def autograd_projection(model: nn.Module, x: torch.Tensor, rows, channels, positions, layer=None, layout="NCHW",
                        grid=None) -> torch.Tensor:
    """Plain float64 autograd on an unpatched copy: the true gradient (backprop mode)."""
    model = copy.deepcopy(model).double().eval()
    if layer is not None:
        model = create_feature_extractor(model, return_nodes={layer: "out"}).eval()
    xd = x[rows].double().requires_grad_(True)
    out = model(xd)
    out = present(out["out"] if isinstance(out, dict) else out, layout, grid)
    (grad,) = torch.autograd.grad(out, xd, seed_of(out.detach(), rows, channels, positions))
    return grad


# -- pointwise activations ----------------------------------------------------------------------

def _sigma(u):
    return 1 / (1 + torch.exp(-u))


def _normal_cdf(u):
    return 0.5 * (1 + torch.erf(u / math.sqrt(2)))


def _gelu_tanh_gain(u):
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))


def _gelu_tanh_slope(u):
    t = torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3))
    return 0.5 * (1 + t) + 0.5 * u * (1 - t ** 2) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * u ** 2)


def _mish_slope(u):
    t = torch.tanh(torch.log1p(torch.exp(u)))
    return t + u * (1 - t ** 2) * _sigma(u)


def _ratio(num, u, at_zero):
    """num(u)/u, ``at_zero`` where u == 0."""
    safe = torch.where(u == 0, torch.ones_like(u), u)
    return torch.where(u == 0, torch.full_like(u, at_zero), num / safe)


# name: (module, functional form, g, phi'): g and phi' are closed forms written here
ACTIVATIONS: Dict[str, Tuple[nn.Module, Callable, Callable, Callable]] = {
    "silu": (nn.SiLU(inplace=True), lambda t: F.silu(t, inplace=True), _sigma,
             lambda u: _sigma(u) * (1 + u * (1 - _sigma(u)))),
    "gelu": (nn.GELU(), F.gelu, _normal_cdf,
             lambda u: _normal_cdf(u) + u * torch.exp(-u ** 2 / 2) / math.sqrt(2 * math.pi)),
    "gelu_tanh": (nn.GELU(approximate="tanh"), lambda t: F.gelu(t, approximate="tanh"), _gelu_tanh_gain,
                  _gelu_tanh_slope),
    "hardswish": (nn.Hardswish(), lambda t: F.hardswish(t, inplace=True), lambda u: ((u + 3) / 6).clamp(0, 1),
                  lambda u: torch.where(u < -3, 0.0, torch.where(u > 3, 1.0, (2 * u + 3) / 6))),
    "mish": (nn.Mish(), F.mish, lambda u: torch.tanh(torch.log1p(torch.exp(u))), _mish_slope),
    "elu": (nn.ELU(alpha=0.7), lambda t: F.elu(t, 0.7),
            lambda u: torch.where(u > 0, 1.0, _ratio(0.7 * torch.expm1(u), u, 0.7)),  # alpha at 0: phi'(0)
            lambda u: torch.where(u > 0, 1.0, 0.7 * torch.exp(u))),
    "leaky_relu": (nn.LeakyReLU(0.1), lambda t: F.leaky_relu(t, 0.1, inplace=True),
                   lambda u: torch.where(u > 0, 1.0, torch.full_like(u, 0.1)),
                   lambda u: torch.where(u > 0, 1.0, torch.full_like(u, 0.1))),  # a float64 0.1, not float32's
    "tanh": (nn.Tanh(), lambda t: t.tanh(), lambda u: _ratio(torch.tanh(u), u, 1.0), lambda u: 1 - torch.tanh(u) ** 2),
    "relu": (nn.ReLU(), torch.relu, lambda u: (u > 0).double(), lambda u: (u > 0).double()),
}


class Sandwich(nn.Module):
    """A 1x1 convolution, the activation, a 1x1 convolution: the signal at the activation is any
    mix of signs, and both transposes are matrix products."""

    def __init__(self, act: Callable) -> None:
        super().__init__()
        self.pre = nn.Conv2d(3, 5, 1, bias=False)
        self.act = act
        self.post = nn.Conv2d(5, 4, 1)  # a bias: a non-zero seed where the activation is 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.act(self.pre(x)))


def sandwich_images() -> torch.Tensor:
    x = 2.5 * torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(3))
    x[:, :, 0, 0] = 0  # an exact zero before the activation: g(0)
    return x


@pytest.mark.parametrize("form", ["module", "functional"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_a_pointwise_activation_follows_its_closed_form(name, form):
    module, functional, gain, slope = ACTIVATIONS[name]
    torch.manual_seed(0)
    model = Sandwich(copy.deepcopy(module) if form == "module" else functional).eval()
    x = sandwich_images()
    pre, post = model.pre.weight.double()[:, :, 0, 0], model.post.weight.double()[:, :, 0, 0]
    u = torch.einsum("jk,bkyx->bjyx", pre, x.double())
    if name == "hardswish":
        assert bool((u < -3).any() and (u > 3).any() and (u.abs() < 3).any())  # all three pieces occur
    rows, channels, positions = selections(x)
    with torch.no_grad():
        out = copy.deepcopy(model).double()(x.double())[rows]
    layer = "post"
    for pos in (positions, None):
        seed = seed_of(out, rows, channels, pos)
        signal = torch.einsum("cj,bcyx->bjyx", post, seed)  # at the activation's output
        ui = u[rows]
        below = {"deconvnet": torch.relu(signal), "guided": torch.relu(signal) * gain(ui),
                 "backprop": signal * slope(ui)}
        for mode in MODES:
            want = torch.einsum("jk,bjyx->bkyx", pre, below[mode])
            got = graph_oracle(model, x, layer, rows, channels, pos, mode=mode)
            assert got.dtype == torch.float64
            assert relative_error(got, want) < TIGHT, (mode, pos is None)


class Encoder(nn.Module):
    """A class token and nn.TransformerEncoderLayer: a leaf for the tracer, which holds its
    activation function as an attribute and calls layer_norm and attention inside (or, without
    gradients, a native kernel that the oracle turns off: its ReLU would miss the tape)."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.class_token = nn.Parameter(torch.randn(1, 1, 6))
        self.layer = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, activation=activation, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.cat([self.class_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1))


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_the_oracle_reaches_functions_inside_a_leaf_module(activation):
    torch.manual_seed(0)
    model = Encoder(activation).eval()
    x = torch.randn(2, 6, 2, 3)
    oracle = GraphOracle(model, "layer")
    rows, channels, positions = selections(x)
    got = oracle(x, rows, channels, positions, layout="tokens", grid=(2, 3))
    assert dict(oracle.rules.calls) == {"layer_norm": 2, "scaled_dot_product_attention": 1, activation: 1}
    true = autograd_projection(model, x, rows, channels, positions, "layer", "tokens", (2, 3))
    assert relative_error(got, true) > 1e-2
    backprop = oracle(x, rows, channels, positions, mode="backprop", layout="tokens", grid=(2, 3))
    assert relative_error(backprop, true) < TIGHT


# -- gates --------------------------------------------------------------------------------------

class HandGate(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 4, 1)
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        if self.form == "self-gated":  # a * sigmoid(a), a swish by hand: a gate, not an activation
            return a * torch.sigmoid(a)
        branch = self.fc(a.mean((2, 3), keepdim=True))
        if self.form == "method":
            return a * branch.sigmoid()
        return F.hardsigmoid(branch) * a


class SEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.se = torchvision.ops.SqueezeExcitation(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.conv(x))


def gate_of(model: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """s, from the model's weights, written out."""
    if isinstance(model, SEBlock):
        se = model.se
        hidden = torch.relu(F.conv2d(a.mean((2, 3), keepdim=True), se.fc1.weight.double(), se.fc1.bias.double()))
        return _sigma(F.conv2d(hidden, se.fc2.weight.double(), se.fc2.bias.double()))
    if model.form == "self-gated":
        return _sigma(a)
    branch = F.conv2d(a.mean((2, 3), keepdim=True), model.fc.weight.double(), model.fc.bias.double())
    return _sigma(branch) if model.form == "method" else ((branch + 3) / 6).clamp(0, 1)


@pytest.mark.parametrize("make", [SEBlock, lambda: HandGate("method"), lambda: HandGate("hard"),
                                  lambda: HandGate("self-gated")], ids=["torchvision", "sigmoid", "hardsigmoid",
                                                                        "self-gated"])
def test_a_gate_passes_the_signal_times_s_and_nothing_down_its_branch(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 5, 5)
    layer = "se" if isinstance(model, SEBlock) else "mul"
    rows, channels, positions = selections(x)
    xd = x.double()[rows]
    a = F.conv2d(xd, model.conv.weight.double(), model.conv.bias.double(), padding=1)
    s = gate_of(model, a)
    for pos in (positions, None):
        seed = seed_of(s * a, rows, channels, pos)
        want = torch.nn.grad.conv2d_input(xd.shape, model.conv.weight.double(), seed * s, padding=1)
        for mode in ("deconvnet", "guided"):
            assert relative_error(graph_oracle(model, x, layer, rows, channels, pos, mode=mode), want) < TIGHT
        true = graph_oracle(model, x, layer, rows, channels, pos, mode="backprop")
        assert relative_error(true, want) > 1e-3  # the branch does carry a gradient in backprop


def test_branch_weights_that_keep_s_leave_the_projection_unchanged():
    """fc2's weight changed and its bias compensated so that s (and the forward) stay as they
    are for this image: the branch's Jacobian changes, the true gradient with it, the deconvnet
    projection does not."""
    torch.manual_seed(0)
    model = SEBlock().eval()
    x = torch.randn(1, 3, 6, 6)
    rows, channels, positions = selections(x, channels=(0, 2, 3))
    other = copy.deepcopy(model)
    with torch.no_grad():
        se = other.se
        hidden = torch.relu(se.fc1(se.avgpool(other.conv(x))))[0, :, 0, 0]
        change = torch.randn_like(se.fc2.weight)
        se.fc2.weight += change
        se.fc2.bias -= change[:, :, 0, 0] @ hidden
        assert torch.allclose(other(x), model(x), atol=1e-6)
    for pos in (positions, None):
        kept = graph_oracle(model, x, "se", rows, channels, pos)
        assert relative_error(graph_oracle(other, x, "se", rows, channels, pos), kept) < 1e-6  # float32 weights
        assert relative_error(graph_oracle(other, x, "se", rows, channels, pos, mode="backprop"),
                              graph_oracle(model, x, "se", rows, channels, pos, mode="backprop")) > 1e-2


# -- normalisations -----------------------------------------------------------------------------

class ChannelsLast(nn.Module):
    """An NCHW image made NHWC, then normalised over its channels (Swin's and ConvNeXt's layout)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1))


class FunctionalRMS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.permute(0, 2, 3, 1), (4,), self.weight, 1e-3)


NORMS = {
    # name: (model, layer, layout, what the statistics run over in the (B, C, H, W) map)
    "layer_norm": (lambda: ChannelsLast(nn.LayerNorm(4)), "norm", "NHWC", "channels"),
    "layer_norm_2d": (lambda: nn.Sequential(LayerNorm2d(4, eps=1e-6)), "0.permute_1", "NCHW", "channels"),
    "group_norm": (lambda: nn.Sequential(nn.GroupNorm(2, 4)), "0", "NCHW", "groups"),
    "rms_norm": (lambda: ChannelsLast(nn.RMSNorm(4, eps=1e-3)), "norm", "NHWC", "rms"),
    "rms_norm_functional": (FunctionalRMS, "rms_norm", "NHWC", "rms"),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_a_normalisation_keeps_its_mean_subtraction_and_freezes_sigma(name):
    make, layer, layout, stats = NORMS[name]
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():  # random affine parameters (fresh ones are the identity)
        for key, p in model.named_parameters():
            p.uniform_(0.5, 2.0) if key.endswith("weight") else p.normal_()
    norm = next(m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, FunctionalRMS)))
    x = 1.5 * torch.randn(2, 4, 3, 5) + 0.7
    rows, channels, positions = selections(x)
    xd = x.double()[rows]
    gamma = norm.weight.double().view(1, 4, 1, 1)
    if stats == "groups":  # per image and group of two channels, over channels and pixels
        grouped = xd.view(xd.shape[0], 2, -1)
        mean = grouped.mean(-1, keepdim=True)
        sigma = (grouped.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        y = ((grouped - mean) / sigma).view_as(xd) * gamma + norm.bias.double().view(1, 4, 1, 1)
    elif stats == "channels":
        mean = xd.mean(1, keepdim=True)
        sigma = (xd.var(1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        y = (xd - mean) / sigma * gamma + norm.bias.double().view(1, 4, 1, 1)
    else:
        sigma = (xd.pow(2).mean(1, keepdim=True) + 1e-3).sqrt()
        y = xd / sigma * gamma
    for pos in (positions, None):
        g = gamma * seed_of(y, rows, channels, pos) / (sigma if stats != "groups" else 1)
        if stats == "groups":
            g = (g.view(g.shape[0], 2, -1) / sigma)
            want = (g - g.mean(-1, keepdim=True)).view_as(xd)
        elif stats == "channels":
            want = g - g.mean(1, keepdim=True)
        else:
            want = g
        for mode in ("deconvnet", "guided"):
            got = graph_oracle(model, x, layer, rows, channels, pos, mode=mode, layout=layout)
            assert relative_error(got, want) < TIGHT, (mode, pos is None)
        true = graph_oracle(model, x, layer, rows, channels, pos, mode="backprop", layout=layout)
        assert relative_error(true, want) > 1e-3  # sigma's own gradient is not negligible here


# -- attention ----------------------------------------------------------------------------------

class Tokens(nn.Module):
    """(B, C, H, W) -> class token + H*W patch tokens -> attention -> (B, 1 + H*W, C)."""

    def __init__(self, form: str, heads: int = 2, dim: int = 4, tokens: int = 7) -> None:
        super().__init__()
        self.form, self.heads, self.dim = form, heads, dim
        self.class_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.bias = nn.Parameter(torch.randn(tokens, tokens))  # an additive mask (a relative position bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + self.pos
        if self.form in ("mha", "mha_weights"):
            return self.attn(t, t, t, need_weights=self.form == "mha_weights")[0]
        d = self.dim // self.heads
        qkv = F.linear(t, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (qkv[i].reshape(x.shape[0], -1, self.heads, d).transpose(1, 2) for i in range(3))
        if self.form == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.form == "sdpa_causal":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.form == "sdpa_bias":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        else:  # MaxViT's way: einsum and a softmax method
            a = torch.einsum("bhid,bhjd->bhij", q, k * d ** -0.5).softmax(dim=-1)
            o = torch.einsum("bhij,bhjd->bhid", a, v)
        return self.attn.out_proj(o.transpose(1, 2).reshape(x.shape[0], -1, self.dim))


ATTENTION_LAYERS = {"mha": "getitem_1", "mha_weights": "getitem_1", "sdpa": "attn.out_proj",
                    "sdpa_causal": "attn.out_proj", "sdpa_bias": "attn.out_proj", "einsum": "attn.out_proj"}


def frozen_attention_projection(model: Tokens, xd: torch.Tensor, seed_tokens: torch.Tensor) -> torch.Tensor:
    """A^T * signal per head through W_v and W_out, written out; the class token's gradient
    dropped; back onto the (B, C, H, W) image."""
    attn, heads = model.attn, model.heads
    b, c, h, w = xd.shape
    e = c
    d = e // heads
    t = torch.cat([model.class_token.double().expand(b, -1, -1), xd.flatten(2).transpose(1, 2)], 1) \
        + model.pos.double()
    wq, wk, wv = attn.in_proj_weight.double().chunk(3)
    bq, bk, _ = attn.in_proj_bias.double().chunk(3)
    grad_t = torch.zeros_like(t)
    signal = seed_tokens @ attn.out_proj.weight.double()  # at the heads' concatenated outputs
    for i in range(heads):
        part = slice(i * d, (i + 1) * d)
        q, k = t @ wq[part].T + bq[part], t @ wk[part].T + bk[part]
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        if model.form == "sdpa_causal":  # token i attends to tokens j <= i
            scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
        elif model.form == "sdpa_bias":
            scores = scores + model.bias.double()
        a = torch.softmax(scores, dim=-1)
        grad_t += (a.transpose(1, 2) @ signal[:, :, part]) @ wv[part]
    return grad_t[:, 1:].transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("form", list(ATTENTION_LAYERS))
def test_attention_sends_a_transpose_signal_to_the_values_only(form, heads):
    torch.manual_seed(0)
    model = Tokens(form, heads).eval()
    x = torch.randn(2, 4, 2, 3)
    rows, channels, positions = selections(x, position=(1, 0))
    xd = x.double()[rows]
    with torch.no_grad():
        out = present(copy.deepcopy(model).double()(xd), "tokens", (2, 3))
    for pos in (positions, None):
        seed = seed_of(out, rows, channels, pos)
        seed_tokens = torch.cat([torch.zeros_like(seed[:, :, :1, 0]), seed.flatten(2)], 2).transpose(1, 2)
        want = frozen_attention_projection(model, xd, seed_tokens)
        for mode in ("deconvnet", "guided"):
            got = graph_oracle(model, x, ATTENTION_LAYERS[form], rows, channels, pos, mode=mode, layout="tokens",
                               grid=(2, 3))
            assert relative_error(got, want) < TIGHT, (mode, pos is None)


def test_query_weights_that_keep_the_attention_weights_leave_the_projection_unchanged():
    """W_q changed by P R (and b_q by P r), P the projection away from the differences of this
    image's keys: every query moves orthogonally to them, so each row of scores shifts by a
    constant and A stays as it is at this image; A's derivative does not (a key's change now
    meets a changed query). The true gradient changes, the projection does not."""
    torch.manual_seed(0)
    model = Tokens("mha", heads=1, dim=8, tokens=3).eval()
    x = torch.randn(1, 8, 1, 2)
    other = copy.deepcopy(model)
    with torch.no_grad():
        t = torch.cat([model.class_token, x.flatten(2).transpose(1, 2)], 1)[0] + model.pos[0]
        weight, bias = other.attn.in_proj_weight, other.attn.in_proj_bias
        keys = t @ weight[8:16].T + bias[8:16]
        apart = keys[1:] - keys[:1]
        away = torch.eye(8) - apart.T @ torch.linalg.solve(apart @ apart.T, apart)
        weight[:8] += away @ torch.randn(8, 8)
        bias[:8] += away @ torch.randn(8)
        assert torch.allclose(other(x), model(x), atol=1e-5)
    rows, channels, positions = selections(x, channels=(2, 5), position=(0, 1))
    for pos in (positions, None):
        args = (x, "getitem_1", rows, channels, pos)
        assert relative_error(graph_oracle(other, *args, layout="tokens", grid=(1, 2)),
                              graph_oracle(model, *args, layout="tokens", grid=(1, 2))) < 1e-5  # float32 weights
        assert relative_error(graph_oracle(other, *args, mode="backprop", layout="tokens", grid=(1, 2)),
                              graph_oracle(model, *args, mode="backprop", layout="tokens", grid=(1, 2))) > 1e-2


# -- backprop, dtypes, restoring ------------------------------------------------------------------

class Everything(nn.Module):
    """Every rule in one small network: conv, BN, ReLU, max pool, SE with SiLU, GELU,
    Hardswish, Mish, ELU, LeakyReLU, Tanh, LayerNorm2d, GroupNorm, attention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.se = torchvision.ops.SqueezeExcitation(8, 4, activation=nn.SiLU)
        self.mix = nn.Conv2d(8, 8, 1)
        self.ln = LayerNorm2d(8)
        self.gn = nn.GroupNorm(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.acts = nn.ModuleList([nn.GELU(), nn.Mish(), nn.ELU(), nn.Tanh()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        y = F.hardswish(self.se(y)) + F.leaky_relu(self.mix(y), 0.2)
        y = self.gn(self.acts[0](self.ln(y)))
        for act in self.acts[1:]:
            y = act(y)
        t = y.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t)[0]
        return t.transpose(1, 2).reshape(y.shape)


def everything() -> nn.Module:
    torch.manual_seed(0)
    model = Everything().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_(0, 0.2)
        model.bn.running_var.uniform_(0.3, 3.0)
    return model


def test_backprop_mode_is_plain_autograd_on_the_unpatched_model():
    model = everything()
    x = torch.randn(2, 3, 8, 8)
    rows, channels, positions = selections(x)
    for pos in (positions, None):
        want = autograd_projection(model, x, rows, channels, pos)
        assert relative_error(graph_oracle(model, x, "reshape", rows, channels, pos, mode="backprop"), want) < TIGHT
        for mode in ("deconvnet", "guided"):  # and the rules do change it
            assert relative_error(graph_oracle(model, x, "reshape", rows, channels, pos, mode=mode), want) > 1e-2


def test_backprop_mode_on_a_real_family_is_plain_autograd():
    torch.manual_seed(0)
    model = tvm.mobilenet_v3_small(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    rows, channels, positions = selections(x, channels=(2, 5))
    layer = "features.4.block.2"  # Hardswish, a hard-sigmoid gate, ReLUs
    want = autograd_projection(model, x, rows, channels, positions, layer=layer)
    assert relative_error(graph_oracle(model, x, layer, rows, channels, positions, mode="backprop"), want) < TIGHT


def test_float32_follows_float64():
    """The benchmark's batched reference: the same rules, one backward in float32."""
    model = everything()
    x = torch.randn(2, 3, 8, 8)
    rows, channels, positions = selections(x)
    for mode in MODES:
        for pos in (positions, None):
            want = graph_oracle(model, x, "reshape", rows, channels, pos, mode=mode)
            got = graph_oracle(model, x, "reshape", rows, channels, pos, mode=mode, dtype=torch.float32)
            assert got.dtype == torch.float32
            assert relative_error(got, want) < 1e-4, (mode, pos is None)


PATCHED_NAMES = [(F, n) for n in ("relu", "relu6", "silu", "gelu", "hardswish", "mish", "elu", "leaky_relu", "tanh",
                                  "sigmoid", "hardsigmoid", "softmax", "layer_norm", "group_norm", "rms_norm",
                                  "scaled_dot_product_attention", "multi_head_attention_forward")] + \
                [(torch, n) for n in ("sigmoid", "tanh", "softmax", "relu")]


def fails_in_float64(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float64:
        raise FloatingPointError("the second pass")
    return x


torch.fx.wrap("fails_in_float64")  # a leaf for the tracer: it sees real tensors


class Explodes(nn.Module):
    """Fails in the oracle's second pass, after a leaf module's F.layer_norm ran patched."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fails_in_float64(self.ln(x))


def test_after_a_run_the_model_and_torch_are_as_before():
    before = {(ns.__name__, n): getattr(ns, n) for ns, n in PATCHED_NAMES}
    assert before["torch.nn.functional", "gelu"] is torch._C._nn.gelu  # the builtins, not a patch
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model = everything()
    kinds = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x)
    graph_oracle(model, x, "reshape", *selections(x))
    with pytest.raises(FloatingPointError, match="the second pass"):
        graph_oracle(Explodes().eval(), torch.randn(1, 3, 4, 5), "fails_in_float64",
                     *selections(torch.zeros(1, 3, 1, 1), channels=(1, 2)))
    assert {(ns.__name__, n): getattr(ns, n) for ns, n in PATCHED_NAMES} == before
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    assert [type(m) for m in model.modules()] == kinds and not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), out)


# -- token grids --------------------------------------------------------------------------------

def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return tvm.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8,
                                 mlp_dim=16).eval()


def small_swin() -> nn.Module:
    torch.manual_seed(0)
    return tvm.SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[2, 2],
                               window_size=[2, 2]).eval()


TOKEN_MODELS = {
    # name: (model, layer, layout, input size, the rules its layer's forward reaches)
    "vit": (small_vit, "encoder.layers.encoder_layer_1.add_1", "tokens", 16,
            {"layer_norm", "scaled_dot_product_attention", "gelu"}),
    "swin": (small_swin, "features.1.1.add_1", "NHWC", 8, {"layer_norm", "softmax", "gelu"}),
}


def raw_index(layout: str, c: int, y: int, x: int, w: int) -> tuple:
    """Where selection (c, y, x) lies in the raw output, written out."""
    return (1 + y * w + x, c) if layout == "tokens" else (y, x, c)


@pytest.mark.parametrize("name", list(TOKEN_MODELS))
def test_token_grid_selections_seed_their_patch(name):
    make, layer, layout, size, reached = TOKEN_MODELS[name]
    model = make()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        raw = create_feature_extractor(model, return_nodes={layer: "out"})(x)["out"]
    shown = presented_output(model, x, layer, layout)
    b, c, h, w = shown.shape
    assert (h, w) == (4, 4) and c == 8 and raw.shape == ((2, 17, 8) if layout == "tokens" else (2, 4, 4, 8))
    for yy in range(h):
        for xx in range(w):
            assert torch.equal(shown[:, 3, yy, xx], raw[(slice(None),) + raw_index(layout, 3, yy, xx, w)])

    rows, channels = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 7])
    positions = torch.tensor([[0, 3], [2, 1], [3, 3]])
    xd = x.double()[rows].requires_grad_(True)
    out = create_feature_extractor(copy.deepcopy(model).double(), return_nodes={layer: "out"}).eval()(xd)["out"]
    for pos in (positions, None):
        seed = torch.zeros_like(out)  # on the raw output, from the index formula alone
        for i, ch in enumerate(channels.tolist()):
            cells = [(p, q) for p in range(h) for q in range(w)] if pos is None else [(int(pos[i, 0]), int(pos[i, 1]))]
            for yy, xx in cells:
                where = (i,) + raw_index(layout, ch, yy, xx, w)
                seed[where] = out[where].detach()
        if layout == "tokens":
            assert not seed[:, 0].any()  # never the class token
        (want,) = torch.autograd.grad(out, xd, seed, retain_graph=True)
        oracle = GraphOracle(model, layer)
        got = oracle(x, rows, channels, pos, mode="backprop", layout=layout)
        assert relative_error(got, want) < TIGHT
        oracle(x, rows, channels, pos, mode="deconvnet", layout=layout)
        assert set(oracle.rules.calls) == reached


def test_present_takes_a_grid_or_a_square():
    tokens = torch.arange(2 * 7 * 3).view(2, 7, 3)
    shown = present(tokens, "tokens", grid=(2, 3))
    assert shown.shape == (2, 3, 2, 3) and int(shown[1, 2, 1, 0]) == int(tokens[1, 1 + 3, 2])
    assert present(torch.zeros(1, 10, 4), "tokens").shape == (1, 4, 3, 3)
    with pytest.raises(ValueError, match="6 patch tokens are not a square: give the grid"):
        present(tokens, "tokens")
    with pytest.raises(ValueError, match=r"grid \(3, 3\) does not hold 6 patch tokens"):
        present(tokens, "tokens", grid=(3, 3))
    with pytest.raises(ValueError, match="unknown layout 'NWHC'"):
        present(tokens, "NWHC")


# -- the nine families of issue #18 ---------------------------------------------------------------

# family -> (input size, two layers with their layouts, the rules the deeper layer's forward reaches)
FAMILIES = {
    "efficientnet_b0": (64, (("features.3.0.block.2", "NCHW"), ("features.4.1.add", "NCHW")), {"silu", "sigmoid"}),
    "efficientnet_v2_s": (64, (("features.2.1.add", "NCHW"), ("features.4.1.add", "NCHW")), {"silu", "sigmoid"}),
    "mobilenet_v3_small": (64, (("features.4.block.2", "NCHW"), ("features.5.add", "NCHW")),
                           {"hardswish", "relu", "hardsigmoid"}),
    "regnet_y_400mf": (64, (("trunk_output.block1.block1-0.activation", "NCHW"),
                            ("trunk_output.block2.block2-1.activation", "NCHW")), {"relu", "sigmoid"}),
    "convnext_tiny": (64, (("features.1.0.block.5", "NHWC"), ("features.3.0.add", "NCHW")), {"layer_norm", "gelu"}),
    "vit_b_16": (224, (("encoder.layers.encoder_layer_1.add_1", "tokens"),
                       ("encoder.layers.encoder_layer_5.add_1", "tokens")),
                 {"layer_norm", "scaled_dot_product_attention", "gelu"}),
    "swin_t": (64, (("features.1.0.add_1", "NHWC"), ("features.3.0.add_1", "NHWC")), {"layer_norm", "softmax", "gelu"}),
    "swin_v2_t": (64, (("features.1.1.add_1", "NHWC"), ("features.3.0.add_1", "NHWC")),
                  {"layer_norm", "softmax", "gelu", "relu", "sigmoid"}),  # relu, sigmoid: the position-bias MLP
    "maxvit_t": (224, (("blocks.0.layers.0.layers.MBconv.add", "NCHW"),
                       ("blocks.1.layers.0.layers.grid_attention.departition_op.reshape_1", "NCHW")),
                 {"gelu", "silu", "sigmoid", "softmax", "layer_norm"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_new_families_run_through_the_oracle(name):
    """At random init (BatchNorm statistics drawn too), two layers, all three modes, single
    activations and whole maps: finite and non-zero; backprop is plain autograd; the rules the
    family needs are reached."""
    size, layers, reached = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(tvm, name)(weights=None).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.3, 3.0)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    for layer, layout in layers:
        act = presented_output(model, x, layer, layout)
        peak, where = act.flatten(2).max(dim=2)
        rows = torch.arange(2)
        channels = peak.argmax(dim=1)
        flat = where[rows, channels]
        positions = torch.stack([flat // act.shape[-1], flat % act.shape[-1]], dim=1)
        oracle = GraphOracle(model, layer)
        results = {}
        for mode in MODES:
            for pos in (positions, None):
                got = oracle(x, rows, channels, pos, mode=mode, layout=layout)
                assert bool(torch.isfinite(got).all()) and float(got.abs().sum()) > 0, (layer, mode)
                results[mode, pos is None] = got
        assert relative_error(results["backprop", False],
                              autograd_projection(model, x, rows, channels, positions, layer, layout)) < 1e-10
        assert relative_error(results["deconvnet", False], results["backprop", False]) > 1e-3
    assert set(oracle.rules.calls) == reached
    print(f"{name} at {size}x{size}: {time.perf_counter() - start:.1f} s")
