"""The HTML pages of the gallery and the diagnostics, rendered from the Jinja2 templates in
``zfkernels/templates/`` (package data).

Callers pass plain values (numbers, names, relative paths); the templates decide the markup.
Autoescaping is on for every template, so a file name holding ``<``, ``&`` or quotes is shown as
text and never becomes markup. Every page is self-contained and opens offline from disk: the
styles are inline in ``base.html``, there are no scripts, and every link is a relative URL to a
file of the output folder. Rendering is deterministic: the same values give the same bytes.
"""

from __future__ import annotations

import functools
import math
import urllib.parse

import jinja2
import markupsafe

__all__ = ["render", "shown", "url", "number"]


def shown(value: object) -> object:
    """A string as it can be shown and written as UTF-8: bytes of a file name that are not UTF-8
    (surrogate-escaped by Python), and any other lone surrogate, become U+FFFD. Markup stays markup (the replacement cannot
    create a tag); anything else is returned as is."""
    if not isinstance(value, str):
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate from elsewhere (JSON's "\ud800" in parts.json)
        raw = value.encode("utf-8", "surrogatepass")
    text = raw.decode("utf-8", "replace")
    return markupsafe.Markup(text) if isinstance(value, markupsafe.Markup) else text


def url(path: str) -> str:
    """A relative URL to one of the output folder's own files: every character that is not safe
    in a URL path percent-encoded (``#``, ``?``, ``%``, spaces, quotes, non-ASCII), ``/`` kept.
    Bytes of a name that are not UTF-8 are encoded as they are on disk. (Autoescaping then makes
    the URL safe inside an attribute.)"""
    return urllib.parse.quote(str(path), errors="surrogateescape")


def number(value: float, spec: str = ".4g") -> str:
    """An activation as shown on a page: finite values by ``spec``, and ``NaN``, ``+inf``,
    ``-inf`` as what they are (``format`` would write ``nan``, and a NaN ranked as -inf must not be
    shown as -inf)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return format(value, spec)


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The one Jinja2 environment: the package's templates, autoescape on, an undefined name an
    error (a template never silently prints nothing), and every printed value passed through
    :func:`shown`."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("zfkernels", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=shown,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["url"] = url
    env.filters["number"] = number
    return env


def render(template: str, **context: object) -> str:
    """The page ``template`` (a file of ``zfkernels/templates/``) filled with ``context``."""
    return environment().get_template(template).render(**context)
