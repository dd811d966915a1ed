"""A report as a small tree of blocks, rendered to one self-contained HTML page (figures as
PNG files beside it, referenced by relative paths) or to Markdown.

Blocks: ``Text`` (a paragraph; ``kind`` "note" or "warning" for a highlighted one),
``Items`` (a bullet list), ``Table``, ``Figure``, ``Figures`` (a grid of figures), ``Code``,
``Details`` (collapsed in HTML) and ``Section`` (a heading with blocks and subsections).
Everything is escaped: nothing a store holds can inject markup into the page.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Text:
    text: str
    kind: str = "p"  # p | note | warning


@dataclass
class Items:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[Any]]
    caption: str | None = None


@dataclass
class Figure:
    src: str  # relative to the report's folder
    caption: str
    alt: str = ""
    wide: bool = False  # spans the whole width of a grid


@dataclass
class Figures:
    figures: list[Figure]


@dataclass
class Code:
    text: str


@dataclass
class Details:
    summary: str
    blocks: list[Block]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    anchor: str | None = None
    level: int = 2

    def add(self, *blocks: Block | None) -> Section:
        self.blocks += [b for b in blocks if b is not None]
        return self


Block = Text | Items | Table | Figure | Figures | Code | Details | Section


@dataclass
class Document:
    title: str
    subtitle: str = ""
    meta: list[tuple[str, str]] = field(default_factory=list)  # the heading's facts
    sections: list[Section] = field(default_factory=list)

    def figures(self) -> list[Figure]:
        """Every figure of the document, in order."""
        found: list[Figure] = []

        def walk(blocks: Sequence[Block]) -> None:
            for block in blocks:
                if isinstance(block, Figure):
                    found.append(block)
                elif isinstance(block, Figures):
                    found.extend(block.figures)
                elif isinstance(block, (Section, Details)):
                    walk(block.blocks)

        walk(self.sections)
        return found

    def write(self, path: Path, fmt: str = "html") -> Path:
        if fmt not in ("html", "md"):
            raise ValueError(f"report format must be html or md, not {fmt!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_html(self) if fmt == "html" else render_markdown(self))
        return path


def cell(value: Any) -> str:
    """A table cell's text: numbers with a sensible number of digits, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.3g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.3f}"
    return str(value)


# -- HTML ---------------------------------------------------------------------------------

CSS = """
:root{--fg:#1d2329;--muted:#5b6670;--line:#d5dbe1;--bg-alt:#f5f7f9;--accent:#1f5fa8}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 color:var(--fg);margin:0;background:#fff}
header.top{background:#15324f;color:#fff;padding:18px 32px}
header.top h1{margin:0 0 4px;font-size:24px}
header.top .subtitle{color:#c9d7e6;margin:0 0 10px}
header.top dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0;
 font-size:13px}
header.top dt{color:#9fb6cc}header.top dd{margin:0;word-break:break-word}
nav.toc{padding:10px 32px;border-bottom:1px solid var(--line);background:var(--bg-alt);
 font-size:13px}
nav.toc a{margin-right:14px;color:var(--accent);text-decoration:none;white-space:nowrap}
main{padding:8px 32px 40px;max-width:1400px}
h2{border-bottom:2px solid var(--line);padding-bottom:4px;margin-top:34px}
h3{margin-top:24px}h4{margin:18px 0 6px}
p.note{background:#eef4fb;border-left:4px solid var(--accent);padding:6px 10px}
p.warning{background:#fff4e5;border-left:4px solid #d9822b;padding:6px 10px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
caption{caption-side:top;text-align:left;color:var(--muted);padding-bottom:4px}
th,td{border:1px solid var(--line);padding:3px 8px;vertical-align:top}
th{background:var(--bg-alt);text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:nth-child(even) td{background:#fbfcfd}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:14px 18px}
figure{margin:6px 0 10px}figure.wide{grid-column:1/-1}
figure img{max-width:100%;height:auto;border:1px solid var(--line);display:block}
figcaption{font-size:13px;color:var(--muted);margin-top:3px}
pre{background:var(--bg-alt);padding:8px;overflow:auto;font-size:12px}
details{margin:6px 0}summary{cursor:pointer;color:var(--accent)}
"""


def _numeric(text: str) -> bool:
    stripped = text.replace(",", "").replace("%", "").strip()
    if not stripped:
        return False
    head = stripped.split(" ")[0].lstrip("+-−")
    try:
        float(head)
    except ValueError:
        return False
    return True


def _html_blocks(blocks: Sequence[Block], out: list[str]) -> None:
    for block in blocks:
        if isinstance(block, Section):
            anchor = f" id='{html.escape(block.anchor)}'" if block.anchor else ""
            level = min(max(block.level, 2), 4)
            out.append(f"<section{anchor}><h{level}>{html.escape(block.title)}</h{level}>")
            _html_blocks(block.blocks, out)
            out.append("</section>")
        elif isinstance(block, Text):
            kind = "" if block.kind == "p" else f" class='{block.kind}'"
            out.append(f"<p{kind}>{html.escape(block.text)}</p>")
        elif isinstance(block, Items):
            out.append(
                "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block.items) + "</ul>"
            )
        elif isinstance(block, Table):
            out.append("<table>")
            if block.caption:
                out.append(f"<caption>{html.escape(block.caption)}</caption>")
            out.append(
                "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.header) + "</tr>"
            )
            for row in block.rows:
                cells = []
                for value in row:
                    text = cell(value)
                    kind = " class='num'" if _numeric(text) else ""
                    cells.append(f"<td{kind}>{html.escape(text)}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</table>")
        elif isinstance(block, Figure):
            out.append(_html_figure(block))
        elif isinstance(block, Figures):
            out.append("<div class='grid'>" + "".join(_html_figure(f) for f in block.figures)
                       + "</div>")  # fmt: skip
        elif isinstance(block, Code):
            out.append(f"<pre>{html.escape(block.text)}</pre>")
        elif isinstance(block, Details):
            out.append(f"<details><summary>{html.escape(block.summary)}</summary>")
            _html_blocks(block.blocks, out)
            out.append("</details>")
        else:  # pragma: no cover - a programming error
            raise TypeError(f"not a report block: {block!r}")


def _html_figure(figure: Figure) -> str:
    src = html.escape(figure.src, quote=True)
    alt = html.escape(figure.alt or figure.caption, quote=True)
    wide = " class='wide'" if figure.wide else ""
    return (
        f"<figure{wide}><a href='{src}'><img src='{src}' alt='{alt}'></a>"
        f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>"
    )


def render_html(doc: Document) -> str:
    out = [
        "<!doctype html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(doc.title)}</title><style>{CSS}</style></head><body>",
        f"<header class='top'><h1>{html.escape(doc.title)}</h1>",
    ]
    if doc.subtitle:
        out.append(f"<p class='subtitle'>{html.escape(doc.subtitle)}</p>")
    if doc.meta:
        out.append("<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                                    for k, v in doc.meta) + "</dl>")  # fmt: skip
    out.append("</header>")
    linked = [s for s in doc.sections if s.anchor]
    if linked:
        out.append("<nav class='toc'>" + "".join(
            f"<a href='#{html.escape(s.anchor or '')}'>{html.escape(s.title)}</a>" for s in linked
        ) + "</nav>")  # fmt: skip
    out.append("<main>")
    _html_blocks(doc.sections, out)
    out.append("</main></body></html>")
    return "\n".join(out)


# -- Markdown -------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_blocks(blocks: Sequence[Block], out: list[str], level: int) -> None:
    for block in blocks:
        if isinstance(block, Section):
            out += ["#" * min(block.level, 6) + " " + block.title, ""]
            _md_blocks(block.blocks, out, block.level)
        elif isinstance(block, Text):
            prefix = {"note": "> ", "warning": "> **Warning:** "}.get(block.kind, "")
            out += [prefix + block.text, ""]
        elif isinstance(block, Items):
            out += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            if block.caption:
                out += [f"*{block.caption}*", ""]
            out.append("| " + " | ".join(_md_escape(h) for h in block.header) + " |")
            out.append("|" + "---|" * len(block.header))
            out += [
                "| " + " | ".join(_md_escape(cell(v)) for v in row) + " |" for row in block.rows
            ]
            out.append("")
        elif isinstance(block, Figure):
            alt = block.alt or block.caption.split(":")[0][:80]
            out += [f"![{alt}]({block.src})", "", f"*{block.caption}*", ""]
        elif isinstance(block, Figures):
            _md_blocks(block.figures, out, level)
        elif isinstance(block, Code):
            out += ["```", block.text, "```", ""]
        elif isinstance(block, Details):
            out += [f"**{block.summary}**", ""]
            _md_blocks(block.blocks, out, level)
        else:  # pragma: no cover
            raise TypeError(f"not a report block: {block!r}")


def render_markdown(doc: Document) -> str:
    out = [f"# {doc.title}", ""]
    if doc.subtitle:
        out += [doc.subtitle, ""]
    out += [f"- **{key}**: {value}" for key, value in doc.meta] + [""]
    _md_blocks(doc.sections, out, 1)
    return "\n".join(out)
