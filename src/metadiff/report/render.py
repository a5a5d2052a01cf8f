"""The tables and plots as one Markdown page and one self-contained HTML page (embedded CSS, relative image paths).

Both pages show the same thing: per stage, a main table (headline columns, one row per run, a seed-aggregate row
per set of seeds), every other metric in a second table (a collapsible block in HTML) with runs as columns, and the
runs' plots. HTML is written by hand, every value escaped, every element closed, so it parses as well-formed.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from metadiff.report.plots import Plot
from metadiff.report.tables import Cell, Family, Row, StageTable

LEGEND = (
    "Values: mean ± 95% CI over the evaluation tasks of one run. Rows *mean over n seeds*: mean, sample sd "
    "and [min, max] over the runs above them, which differ only in their seed. Paired differences "
    "(`a_minus_b`) are signed. *config*: the settings that set a run apart from the other runs of its task."
)


@dataclass(frozen=True)
class Page:
    families: list[Family]
    plots: dict[Path, list[Plot]]  # artifact path -> its plots, as copied into the report
    sources: list[Path]
    problems: list[str]
    generated: str

    @property
    def n_runs(self) -> int:
        return sum(len(t.runs) for f in self.families for t in f.stages)


def _has_config(table: StageTable) -> bool:
    return any(row.overrides for row in table.rows)


def _run_title(row: Row) -> str:
    """A row's name as a column header of the second table or a plot caption."""
    if row.is_aggregate:
        return f"{row.label}: {row.aggregate_note}"
    extra = f", {row.config_text(1)}" if row.overrides else ""
    return f"{row.label} (seed {row.seed}{extra})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _blank(cells: dict[str, Cell], key: str) -> Cell:
    return cells.get(key, Cell("–"))


# ------------------------------------------------------------------------------------------------- Markdown
def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]


def _md_stage(table: StageTable, page: Page) -> list[str]:
    columns = f"; columns are `{table.prefix}…`" if table.prefix else ""
    lines = [f"### {table.stage}", "", f"{_count(len(table.runs), 'run')}{columns}", ""]
    config = _has_config(table)
    header = ["run", "seed", *(["config"] if config else []), *map(table.header, table.columns), "artifact"]
    align = ["---", "---", *(["---"] if config else []), *["---:"] * len(table.columns), "---"]
    body = []
    for row in table.rows:
        name = f"**{_run_title(row)}**" if row.is_aggregate else row.label
        cells = [_blank(row.cells, k).plain() for k in table.columns]
        body.append(
            [
                name,
                row.seed,
                *([row.config_text()] if config else []),
                *cells,
                "" if row.run is None else f"`{row.run.fingerprint}`",
            ]
        )
    lines += [*_md_table(header, align, body), ""]
    if table.more:
        lines += [f"#### {table.stage}: all other metrics", ""]
        header = ["metric", *(_run_title(r) for r in table.rows)]
        body = [[f"`{k}`", *(_blank(r.cells, k).plain() for r in table.rows)] for k in table.more]
        lines += [*_md_table(header, ["---", *["---:"] * len(table.rows)], body), ""]
    shown = [(row, plot) for row in table.rows if row.run for plot in page.plots.get(row.run.path, [])]
    if shown:
        lines += [f"#### {table.stage}: plots", ""]
        for row, plot in shown:
            lines += [f"![{plot.name}]({quote(plot.relpath)})", f"*{_run_title(row)}: {plot.name}*", ""]
    return lines


def render_markdown(page: Page) -> str:
    sources = ", ".join(f"`{s}`" for s in page.sources)
    lines = [
        "# metadiff results",
        "",
        f"{_count(page.n_runs, 'run')} from {sources}; generated {page.generated}.",
        "",
        LEGEND,
        "",
    ]
    for family in page.families:
        lines.append(f"- {family.name}: " + ", ".join(f"[{t.stage}](#{t.stage})" for t in family.stages))
    lines.append("")
    for family in page.families:
        lines += [f"## {family.name}", ""]
        for table in family.stages:
            lines += _md_stage(table, page)
    if page.problems:
        lines += ["## Skipped artifacts", "", *(f"- {_md(p)}" for p in page.problems), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- HTML
CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       margin: 0 auto; padding: 1.5rem 2rem 4rem; max-width: 1700px; }
h1 { margin: 0 0 .3rem; }
h2 { border-bottom: 2px solid #d0d7de; padding-bottom: .25rem; margin-top: 2.5rem; }
h3 { margin: 2rem 0 .3rem; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
h4 { margin: 1rem 0 .4rem; font-size: 1em; }
.meta, .note { color: #57606a; font-size: .9em; margin: .2rem 0 .5rem; }
nav ul { margin: .4rem 0; padding-left: 1.2rem; }
a { color: #0969da; text-decoration: none; } a:hover { text-decoration: underline; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .88em; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: .85em; margin: .3rem 0 .6rem; }
th, td { border: 1px solid #d0d7de; padding: .28rem .45rem; vertical-align: top; text-align: left; }
thead th { background: #f6f8fa; font-weight: 600; vertical-align: bottom; }
tbody tr:nth-child(even) td, tbody tr:nth-child(even) th { background: #fbfcfd; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums;
         font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
th.num { text-align: right; min-width: 5.5em; max-width: 10em; }
td.run { white-space: nowrap; }
td.cfg { max-width: 28em; font-size: .92em; color: #3d444d; }
tr.agg td, td.agg { background: #fff8c5 !important; font-weight: 600; }
.range { display: block; color: #57606a; font-weight: normal; font-size: .88em; }
table.more th[scope=row] { font-weight: normal; white-space: nowrap;
                           font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
details { margin: .3rem 0 .8rem; } summary { cursor: pointer; color: #0969da; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: .9rem;
         align-items: start; }
figure { margin: 0; border: 1px solid #d0d7de; border-radius: 6px; padding: .5rem; background: #fff; }
figure img { display: block; max-width: 100%; max-height: 420px; width: auto; height: auto; margin: 0 auto; }
figcaption { font-size: .82em; color: #57606a; margin-top: .35rem; overflow-wrap: anywhere; }
ul.problems li { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .88em; }
"""


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _breakable(name: str) -> str:
    """A long metric name that may wrap after `_` or `/` in a narrow header."""
    return "".join(_e(part) + ("<wbr>" if part in "_/" else "") for part in re.split(r"([_/])", name) if part)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _td(cell: Cell, aggregate: bool = False) -> str:
    detail = f'<span class="range">{_e(cell.detail)}</span>' if cell.detail else ""
    return f'<td class="num{" agg" if aggregate else ""}">{_e(cell.text)}{detail}</td>'


def _html_main(table: StageTable) -> list[str]:
    config = _has_config(table)
    head = [
        "<th>run</th>",
        "<th>seed</th>",
        *(["<th>config</th>"] if config else []),
        *(f'<th class="num" title="{_e(k)}">{_breakable(table.header(k))}</th>' for k in table.columns),
        "<th>artifact</th>",
    ]
    out = ['<div class="scroll"><table class="runs">', f"<thead><tr>{''.join(head)}</tr></thead>", "<tbody>"]
    for row in table.rows:
        cfg = f'<td class="cfg" title="{_e(", ".join(row.overrides))}">{_e(row.config_text())}</td>' if config else ""
        artifact = "" if row.run is None else f'<code title="{_e(str(row.run.path))}">{_e(row.run.fingerprint)}</code>'
        cells = "".join(_td(row.cells.get(k, Cell("–"))) for k in table.columns)
        tr = '<tr class="agg">' if row.is_aggregate else "<tr>"
        note = f'<span class="range">{_e(row.aggregate_note)}</span>' if row.is_aggregate else ""
        out.append(
            f'{tr}<td class="run">{_e(row.label)}{note}</td><td>{_e(row.seed)}</td>{cfg}{cells}<td>{artifact}</td></tr>'
        )
    return [*out, "</tbody></table></div>"]


def _html_more(table: StageTable) -> list[str]:
    head = "".join(f"<th>{_e(_run_title(r))}</th>" for r in table.rows)
    out = [
        f"<details><summary>All other metrics ({len(table.more)})</summary>",
        '<div class="scroll"><table class="more">',
        f"<thead><tr><th>metric</th>{head}</tr></thead>",
        "<tbody>",
    ]
    for key in table.more:
        cells = "".join(_td(_blank(r.cells, key), r.is_aggregate) for r in table.rows)
        out.append(f'<tr><th scope="row">{_e(key)}</th>{cells}</tr>')
    return [*out, "</tbody></table></div>", "</details>"]


def _html_plots(table: StageTable, page: Page) -> list[str]:
    figures = []
    for row in table.rows:
        for plot in page.plots.get(row.run.path, []) if row.run else []:
            src = _e(quote(plot.relpath))
            figures.append(
                f'<figure><a href="{src}"><img src="{src}" alt="{_e(plot.name)}" loading="lazy"></a>'
                f"<figcaption>{_e(_run_title(row))}: <code>{_e(plot.name)}</code></figcaption></figure>"
            )
    return ["<h4>Plots</h4>", '<div class="plots">', *figures, "</div>"] if figures else []


def render_html(page: Page) -> str:
    nav = "".join(
        f"<li>{_e(f.name)}: "
        + ", ".join(f'<a href="#stage-{_slug(t.stage)}">{_e(t.stage)}</a>' for t in f.stages)
        + "</li>"
        for f in page.families
    )
    sources = ", ".join(f"<code>{_e(str(s))}</code>" for s in page.sources)
    legend = re.sub(r"`([^`]+)`", r"<code>\1</code>", re.sub(r"\*([^*]+)\*", r"<em>\1</em>", _e(LEGEND)))
    body = [
        "<header>",
        "<h1>metadiff results</h1>",
        f'<p class="meta">{_count(page.n_runs, "run")} from {sources}; generated {_e(page.generated)}.</p>',
        f'<p class="note">{legend}</p>',
        f"<nav><ul>{nav}</ul></nav>",
        "</header>",
    ]
    for family in page.families:
        body += [f'<section id="family-{_slug(family.name)}">', f"<h2>{_e(family.name)}</h2>"]
        for table in family.stages:
            prefix = f"; columns are <code>{_e(table.prefix)}…</code>" if table.prefix else ""
            body += [
                f'<section id="stage-{_slug(table.stage)}">',
                f"<h3>{_e(table.stage)}</h3>",
                f'<p class="meta">{_count(len(table.runs), "run")}{prefix}</p>',
                *_html_main(table),
            ]
            body += [*(_html_more(table) if table.more else []), *_html_plots(table, page), "</section>"]
        body.append("</section>")
    if page.problems:
        body += [
            '<section id="skipped">',
            "<h2>Skipped artifacts</h2>",
            '<ul class="problems">',
            *(f"<li>{_e(p)}</li>" for p in page.problems),
            "</ul>",
            "</section>",
        ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>metadiff results</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            *body,
            "</body>",
            "</html>",
            "",
        ]
    )
