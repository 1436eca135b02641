"""``index.html``: every case of an output folder in one table, with its QC picture.

A static page (no scripts, no external resources) that opens from the file system in any browser.
Every text taken from the data is escaped, every link URL-quoted.
"""

from __future__ import annotations

import datetime
import html
from pathlib import Path
from typing import Iterable, Union
from urllib.parse import quote

from pipeline.batch.report.outputs import QC_FOLDER
from pipeline.io.atomic import atomic_path

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: middle; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.done { color: #1a7f37; } .failed { color: #cf222e; font-weight: bold; } .skipped { color: #9a6700; }
img { width: 330px; background: black; }
.error { max-width: 40em; font-size: 90%; }
"""


def write_index_html(rows: Iterable[dict], output_dir: Union[str, Path], title: str = "medseg results") -> Path:
    """Write ``output_dir/index.html`` (atomically) for manifest ``rows``; QC links are relative."""
    output_dir = Path(output_dir)
    rows = list(rows)
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("done", "skipped", "failed")}
    lesions = sum(int(r.get("lesion_count") or 0) for r in rows)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(rows)} cases: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"{lesions} lesions. Updated {html.escape(now)}.</p>",
        "<table><thead><tr><th>QC</th><th>case</th><th>status</th><th>lesions</th><th>volume (mL)</th>"
        "<th>error</th><th>source</th></tr></thead><tbody>",
    ]
    for row in rows:
        parts.append(_row(row))
    parts.append("</tbody></table></body></html>")
    path = output_dir / "index.html"
    with atomic_path(path, suffix=".tmp.html") as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return path


def _row(row: dict) -> str:
    case_id = str(row.get("case_id") or "")
    status = str(row.get("status") or "")
    picture = ""
    if case_id and row.get("qc_png"):  # set only when the picture was written (no file check per row)
        href = html.escape(f"{QC_FOLDER}/{quote(case_id)}.png", quote=True)
        alt = html.escape(f"QC {case_id}", quote=True)
        picture = f'<a href="{href}"><img src="{href}" alt="{alt}" loading="lazy"></a>'
    count = row.get("lesion_count")
    volume = row.get("lesion_volume_ml")
    cells = [
        ("", picture),
        ("", html.escape(case_id)),
        ("", f'<span class="{html.escape(status, quote=True)}">{html.escape(status)}</span>'),
        ("num", "" if count is None else str(int(count))),
        ("num", "" if volume is None else f"{float(volume):.2f}"),
        ("error", html.escape(str(row.get("error") or ""))),
        ("", html.escape(str(row.get("source") or ""))),
    ]
    tds = (f'<td class="{cls}">{c}</td>' if cls else f"<td>{c}</td>" for cls, c in cells)
    return "<tr>" + "".join(tds) + "</tr>"
