"""A self-contained HTML page: inline CSS, images as base64 ``data:`` URIs, no script.

The report of ``moescope analyze`` is one file that opens anywhere (a laptop without
network, a CI artefact viewer, an e-mail attachment). Everything it shows is inside it:
PNGs are embedded as ``data:image/png;base64,...``, the style sheet is inline, and a
Content-Security-Policy ``<meta>`` forbids every other source (``default-src 'none'``),
so a stray external reference would not load silently but fail visibly in the browser
console (which ``tests/test_report_html_chromium.py`` checks is empty).

Building blocks: :func:`image` (PNG bytes or a file -> ``<figure>``), :func:`table`
(escaped cells), :class:`Section` and :func:`page`. Every text argument is HTML-escaped;
only ``Section.blocks`` / ``raw`` fragments are trusted HTML.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CSP",
    "Section",
    "escape",
    "image",
    "key_values",
    "page",
    "paragraph",
    "table",
    "write_page",
]

#: Content-Security-Policy of the page: nothing but inline styles and data: images.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

_STYLE = """
:root { --fg: #1d1d1f; --muted: #5f6368; --line: #dadce0; --bg2: #f6f8fa; --accent: #1a73e8;
        --warn: #b06000; --crit: #c5221f; --ok: #188038; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); margin: 0 auto; padding: 1.5rem 2rem 4rem; max-width: 1200px; }
h1 { font-size: 1.7rem; margin: 0 0 .2rem; }
h2 { font-size: 1.3rem; border-bottom: 1px solid var(--line); padding-bottom: .3rem;
     margin-top: 2.2rem; }
h3 { font-size: 1.05rem; margin-top: 1.4rem; }
p.sub { color: var(--muted); margin-top: 0; }
nav.toc { background: var(--bg2); border: 1px solid var(--line); border-radius: 6px;
          padding: .6rem 1rem; margin: 1rem 0; display: flex; flex-wrap: wrap; gap: .2rem 1.2rem; }
nav.toc a { color: var(--accent); text-decoration: none; white-space: nowrap; }
.moe-tokens { overflow-wrap: anywhere; border: 1px solid var(--line); padding: .5rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: .9rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .88rem; }
th, td { border: 1px solid var(--line); padding: .25rem .55rem; text-align: right; }
th { background: var(--bg2); }
td.l, th.l { text-align: left; }
div.scroll { overflow-x: auto; max-width: 100%; }
dl.kv { display: grid; grid-template-columns: max-content auto; gap: .15rem 1.2rem; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; }
.banner { border-radius: 6px; padding: .6rem 1rem; margin: 1rem 0; font-weight: 600; }
.banner.random { background: #fef7e0; border: 1px solid #f9ab00; }
.banner.partial { background: #fce8e6; border: 1px solid var(--crit); }
span.tok { white-space: nowrap; margin-right: .7em; }
span.tok code { background: var(--bg2); border: 1px solid var(--line); border-radius: 3px;
                padding: 0 .25em; }
.banner.note { background: var(--bg2); border: 1px solid var(--line); font-weight: 400; }
.alert-warning { color: var(--warn); }
.alert-critical { color: var(--crit); font-weight: 600; }
.alert-resolved { color: var(--muted); }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9em; }
section.verdict { border: 1px solid var(--line); border-left: 6px solid var(--ok);
                  border-radius: 6px; padding: .2rem 1.2rem .6rem; margin: 1rem 0; }
section.verdict.warning { border-left-color: var(--warn); }
section.verdict.critical { border-left-color: var(--crit); }
section.verdict h2 { border: 0; margin-top: .6rem; }
section.verdict p.headline { font-size: 1.1rem; font-weight: 600; margin: .2rem 0 .6rem; }
div.finding { border-top: 1px solid var(--line); padding: .3rem 0; }
div.finding h3 { margin: .4rem 0 .2rem; }
div.finding dl.kv { grid-template-columns: 5.5rem auto; }
div.finding dd code { white-space: nowrap; }
footer { color: var(--muted); font-size: .85rem; margin-top: 3rem; border-top: 1px solid var(--line);
         padding-top: .5rem; }
"""


def escape(text: object) -> str:
    """HTML-escape ``str(text)`` (quotes included)."""
    return html.escape(str(text), quote=True)


def image(png: bytes | str | os.PathLike[str], alt: str, caption: str | None = None) -> str:
    """A ``<figure>`` with the PNG embedded as a base64 data URI.

    Args:
        png: the PNG bytes, or a path to a PNG file (read now).
        alt: alternative text (also the hover title).
        caption: optional caption under the image.
    """
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"image {alt!r} is not a PNG (bad signature); embed PNG files only")
    b64 = base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return (
        f'<figure><img src="data:image/png;base64,{b64}" alt="{escape(alt)}" '
        f'title="{escape(alt)}">{cap}</figure>'
    )


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    left: int = 1,
    raw_columns: Sequence[int] = (),
) -> str:
    """An HTML table; cells are escaped (except columns in ``raw_columns``, trusted HTML).

    ``left``: how many leading columns are left-aligned (names), the rest right-aligned
    (numbers).
    """
    raw = set(raw_columns)

    def cls(i: int) -> str:
        return ' class="l"' if i < left else ""

    head = "".join(f"<th{cls(i)}>{escape(h)}</th>" for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = "".join(
            f"<td{cls(i)}>{c if i in raw else escape(c)}</td>" for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def key_values(items: Iterable[tuple[str, object]]) -> str:
    """A definition list of (label, value) pairs, both escaped."""
    inner = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)
    return f'<dl class="kv">{inner}</dl>'


def paragraph(text: str, cls: str | None = None) -> str:
    """``<p>`` with escaped text (``cls``: ``banner random`` / ``banner note`` ...)."""
    if cls:
        return f'<p class="{escape(cls)}">{escape(text)}</p>'
    return f"<p>{escape(text)}</p>"


@dataclass
class Section:
    """One ``<section>`` of the page: an anchor id, a title and trusted HTML blocks."""

    id: str
    title: str
    blocks: list[str] = field(default_factory=list)

    def add(self, *fragments: str) -> Section:
        self.blocks.extend(fragments)
        return self

    #: extra CSS classes of the ``<section>`` (e.g. ``"verdict warning"``).
    cls: str = ""

    def render(self) -> str:
        body = "\n".join(self.blocks)
        c = f' class="{escape(self.cls)}"' if self.cls else ""
        return (
            f'<section id="{escape(self.id)}"{c}>\n<h2>{escape(self.title)}</h2>\n{body}\n'
            "</section>"
        )


def page(
    title: str,
    sections: Sequence[Section],
    subtitle: str | None = None,
    preamble: Sequence[str] = (),
    footer: str | None = None,
    lead: Sequence[Section] = (),
) -> str:
    """The whole HTML document: head (charset, CSP, inline CSS), title, ``preamble``
    fragments (banners), the ``lead`` sections (the verdict: first screen, before the
    table of contents), a table of contents, the sections, an optional footer."""
    toc = "".join(f'<a href="#{escape(s.id)}">{escape(s.title)}</a>' for s in [*lead, *sections])
    sub = f'<p class="sub">{escape(subtitle)}</p>' if subtitle else ""
    foot = f"<footer>{escape(footer)}</footer>" if footer else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n{sub}\n"
        + "\n".join(preamble)
        + "\n".join(s.render() for s in lead)
        + f'\n<nav class="toc">{toc}</nav>\n'
        + "\n".join(s.render() for s in sections)
        + f"\n{foot}\n</body>\n</html>\n"
    )


def write_page(path: str | os.PathLike[str], document: str) -> Path:
    """Write ``document`` as UTF-8 (parent folders created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(document, encoding="utf-8")
    return p
