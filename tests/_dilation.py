"""Pooling geometries with dilation, for the op tests: conftest's geometries times dilations
1-3 (square and not), keeping the combinations PyTorch's max_pool2d accepts and whose every
window reads a pixel (checked here by brute force, independently of the ops)."""

from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

DILATIONS = (1, 2, 3, (1, 2), (3, 1))


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _axis_ok(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> bool:
    span = (k - 1) * d + 1
    if n + 2 * p < span:
        return False
    out = (n + 2 * p - span + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    # every window has a tap on a real pixel
    return all(any(0 <= o * s - p + t * d < n for t in range(k)) for o in range(out))


def valid(geometry: Sequence, dilation) -> bool:
    size, k, s, p, ceil = geometry
    k, s, p, d = _pair(k), _pair(s), _pair(p), _pair(dilation)
    return all(_axis_ok(size[a], k[a], s[a], p[a], d[a], ceil) for a in range(2))


def with_dilations(geometries: Iterable[Sequence], dilations=DILATIONS) -> List[tuple]:
    """(size, kernel, stride, padding, ceil_mode, dilation) for every valid combination."""
    return [tuple(g) + (d,) for g in geometries for d in dilations if valid(g, d)]


def dilated_id(g) -> str:
    d = g[5] if isinstance(g[5], int) else "x".join(map(str, g[5]))
    return "x".join(map(str, g[0])) + f"-k{g[1]}s{g[2]}p{g[3]}{'c' if g[4] else ''}d{d}"
