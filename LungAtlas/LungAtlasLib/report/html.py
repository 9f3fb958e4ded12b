"""The HTML report: one self-contained page next to its PNG figures and tables.

Tables are written from the same DataFrames as the CSV/Parquet files, and every
number is shown with :func:`format_value` (4 significant digits), so a reader
(or a test) can check the page against the tables: each table carries
``data-table="<name>"``, each cell ``data-column="<column>"``. A small inline
script writes how many figures loaded into ``#figure-status`` (and per figure
into ``data-natural-width``), so a headless browser can confirm that the
figures really display.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from ..paths import write_text_atomic

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.88em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; } .note { color: #555; font-size: 0.92em; }
#figure-status { color: #777; font-size: 0.85em; }
"""

FIGURE_CHECK = """
<script>
window.addEventListener('load', function () {
  var images = document.querySelectorAll('figure img');
  var loaded = 0;
  images.forEach(function (img) {
    img.setAttribute('data-natural-width', img.naturalWidth);
    if (img.complete && img.naturalWidth > 0) { loaded += 1; }
  });
  var status = document.getElementById('figure-status');
  status.setAttribute('data-loaded', loaded);
  status.setAttribute('data-total', images.length);
  status.textContent = 'Figures displayed: ' + loaded + ' of ' + images.length + '.';
});
</script>
"""


def format_value(value) -> str:
    """How a table cell is shown: numbers to 4 significant digits, NaN as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4g}"
    try:
        if pd.isna(value):
            return "–"
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item"):  # numpy scalars
        return format_value(value.item())
    return str(value)


def table_html(name: str, table: pd.DataFrame, max_rows: int = 200) -> str:
    """A DataFrame as an HTML table with ``data-table``/``data-column`` attributes."""
    shown = table.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = []
    for _, row in shown.iterrows():
        cells = []
        for column in shown.columns:
            value = row[column]
            is_text = isinstance(value, str)
            cells.append(f'<td data-column="{html.escape(str(column))}"{" class=text" if is_text else ""}>'
                         f"{html.escape(format_value(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = (f'<p class="note">First {max_rows} of {len(table)} rows; the full table is in the CSV.</p>'
            if len(table) > max_rows else "")
    return (f'<table data-table="{html.escape(name)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>{more}")


def figure_html(path: Path, out_dir: Path, caption: str) -> str:
    relative = Path(path).resolve().relative_to(Path(out_dir).resolve()).as_posix()
    return (f'<figure><img src="{html.escape(relative)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def build_report(out_dir, sections: list[dict], *, title: str = "LungAtlas nodule atlas report",
                 intro: str = "", filename: str = "report.html") -> Path:
    """Write ``out_dir/filename`` from sections.

    Each section is a dict: ``title``; optional ``text`` (plain text, escaped);
    ``figures``: list of (png path under out_dir, caption); ``tables``: list of
    (name, DataFrame, caption). Returns the report path."""
    out_dir = Path(out_dir)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    parts.append('<p id="figure-status"></p>')
    for section in sections:
        parts.append(f"<h2>{html.escape(section['title'])}</h2>")
        if section.get("text"):
            for paragraph in str(section["text"]).split("\n\n"):
                parts.append(f'<p class="note">{html.escape(paragraph)}</p>')
        for path, caption in section.get("figures", []):
            parts.append(figure_html(path, out_dir, caption))
        for name, table, caption in section.get("tables", []):
            if caption:
                parts.append(f"<p><b>{html.escape(caption)}</b></p>")
            parts.append(table_html(name, table))
    parts.append(FIGURE_CHECK + "</body></html>")
    return write_text_atomic(out_dir / filename, "\n".join(parts))
