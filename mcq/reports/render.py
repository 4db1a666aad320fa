"""Sections → report.md and report.html. Every string from a results file passes through one escaping function per
format here, so a variant name can never become markup."""

from __future__ import annotations

import base64
import html
import re

from mcq.reports.content import Bullets, Plot, Section, Table

# Every ASCII punctuation character that can start Markdown syntax or inline HTML; CommonMark renders a
# backslash-escaped one as itself.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|&#!~])")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
ul { padding-left: 1.4em; } li { margin: 0.15em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; }
"""


def _one_line(text: str) -> str:
    # A newline inside a results string would end a table row or list item.
    return " ".join(str(text).split())


def md_escape(text: str) -> str:
    return _MARKDOWN_SPECIAL.sub(r"\\\1", _one_line(text))


def render_markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {md_escape(title)}", ""]
    for section in sections:
        lines += [f"## {md_escape(section.title)}", ""]
        for block in section.blocks:
            if isinstance(block, Plot):
                continue  # the plots are in report.html; Markdown has no self-contained way to carry them
            if isinstance(block, Table):
                lines += _md_table(block)
            elif isinstance(block, Bullets):
                lines += [f"- {md_escape(item)}" for item in block.items]
            else:
                lines.append(md_escape(block))
            lines.append("")
    return "\n".join(lines)


def _md_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(md_escape(cell) for cell in table.header) + " |",
             "| " + " | ".join("---:" if numeric else "---" for numeric in table.numeric) + " |"]
    lines += ["| " + " | ".join(md_escape(cell) for cell in row) + " |" for row in table.rows]
    return lines


def html_escape(text: str) -> str:
    # Collapsed to one line like the Markdown, so both files say the same; quote=True escapes attribute values too.
    return html.escape(_one_line(text), quote=True)


def render_html(title: str, sections: list[Section], plots: dict[str, str]) -> str:
    esc = html_escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             # Nothing may load or run: the report is self-contained, and even a string that escaped escaping could
             # not fetch or execute anything.
             "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
             "style-src 'unsafe-inline'\">",
             f"<title>{esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>", f"<h1>{esc(title)}</h1>"]
    for section in sections:
        parts.append(f"<section>\n<h2>{esc(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Plot):
                parts.append(_html_plot(block, plots[block.name]))
            elif isinstance(block, Table):
                parts.append(_html_table(block))
            elif isinstance(block, Bullets):
                parts.append("<ul>\n" + "\n".join(f"<li>{esc(item)}</li>" for item in block.items) + "\n</ul>")
            else:
                parts.append(f"<p>{esc(block)}</p>")
        parts.append("</section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _html_table(table: Table) -> str:
    esc = html_escape
    rows = ["<tr>" + "".join(f"<th>{esc(cell)}</th>" for cell in table.header) + "</tr>"]
    for row in table.rows:
        rows.append("<tr>" + "".join(f'<td class="num">{esc(cell)}</td>' if numeric else f"<td>{esc(cell)}</td>"
                                     for cell, numeric in zip(row, table.numeric)) + "</tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _html_plot(plot: Plot, svg: str) -> str:
    # An <img> with a data: URI rather than inline <svg>: each plot stays its own document (matplotlib's glyph
    # ids would otherwise repeat across plots) and an image never runs script, whatever its text says. The
    # width and height in CSS pixels reserve the plot's space before it decodes.
    width, height = (round(float(v) * 96 / 72) for v in
                     re.search(r'<svg[^>]*?width="([\d.]+)pt" height="([\d.]+)pt"', svg).groups())
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return (f'<figure id="plot-{plot.name}"><img width="{width}" height="{height}" alt="{html_escape(plot.caption)}" '
            f'src="data:image/svg+xml;base64,{data}">\n<figcaption>{html_escape(plot.caption)}</figcaption></figure>')
