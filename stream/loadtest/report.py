"""Load-test report: JSON for machines, one self-contained HTML page for people, a table for the terminal.

Why self-contained: the page is mailed around and archived next to a deployment's acceptance
record, so it carries its plots as inline SVG and loads nothing from anywhere. No secrets are in
any of them: the token's variable name is not even recorded, and URLs of local relays only.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _leak_rate(p: dict[str, Any]) -> str:
    lk = p.get("leaks")
    if not lk:
        return "n/a"
    return f"{lk['visible']}/{lk['checked']}"


def workers_of(entry: dict[str, Any]) -> int:
    """The worker processes a run or point was measured with; reports from before the field: 1."""
    w = entry.get("workers")
    if w is None:
        w = (entry.get("spec") or {}).get("workers")
    return int(w) if w is not None else 1


def overload_points(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``--overload`` points, one per size; reports from before the list held one point."""
    over = report.get("overload") or []
    return [over] if isinstance(over, dict) else list(over)


def _points(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for r in report.get("runs", []) for p in r["points"]] + overload_points(report)


def table(report: dict[str, Any]) -> str:
    """A short Markdown table: one row per point, then the ramp results and ratios."""
    lines = ["| size | mode | workers | K | held | fps min/sent | p50/p99 ms | dropped | blanked | leaks | "
             "events | pipeline CPU | harness CPU | other load |", "|" + "---|" * 14]
    for p in _points(report):
        if "latency_ms" not in p:
            lines.append(f"| {p['size']} | {p['mode']} | {workers_of(p)} | {p['k']} | error |" + " |" * 9)
            continue
        ev = p.get("events") or {}
        lines.append(
            f"| {p['size']} | {p['mode']} | {workers_of(p)} | {p['k']} | {'yes' if p['held'] else 'no'} | "
            f"{_fmt(p['delivered_fps_min'])}/{_fmt(p['fps'], 0)} | "
            f"{_fmt(p['latency_ms']['p50'], 0)}/{_fmt(p['latency_ms']['p99'], 0)} | "
            f"{p['pipeline']['dropped']:.0f} | {max(p['pipeline']['blanked'], p['blanked_seen']):.0f} | "
            f"{_leak_rate(p)} | {_fmt(ev.get('completeness'), 2) if ev else '-'} | "
            f"{_fmt(p['pipeline']['cpu_cores'], 2)} | {_fmt(p['harness_cpu_cores'], 2)} | "
            f"{_fmt(p.get('other_load_cores'), 2)} |")
    if report.get("runs"):
        lines += ["", "| size | mode | workers | largest K held |", "|---|---|---|---|"]
        lines += [f"| {r['size']} | {r['mode']} | {workers_of(r)} | {r['largest_k_held']} |"
                  for r in report["runs"]]
    for size, row in (report.get("ratios") or {}).items():
        for name, r in row.items():
            lines.append(f"{size} {name}: largest K {r['largest_k']}, throughput {r['throughput_fps']} fps "
                         f"(ratio {_fmt(r['throughput_ratio'], 2)})")
    return "\n".join(lines)


# -- inline SVG ---------------------------------------------------------------------------------------
def _axes(w: int, h: int, x0: float, x1: float, y0: float, y1: float, title: str, xl: str, yl: str,
          pad: int = 52, xticks: bool = True) -> tuple[list[str], Any, Any]:
    def sx(x: float) -> float:
        return pad + (x - x0) / ((x1 - x0) or 1) * (w - pad - 12)

    def sy(y: float) -> float:
        return h - pad + 8 - (y - y0) / ((y1 - y0) or 1) * (h - pad - 28)

    e = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
         f'font-size="11">', f'<text x="{w / 2}" y="14" text-anchor="middle" font-weight="bold">'
         f'{html.escape(title)}</text>',
         f'<line x1="{pad}" y1="{sy(y0)}" x2="{w - 12}" y2="{sy(y0)}" stroke="#333"/>',
         f'<line x1="{pad}" y1="{sy(y0)}" x2="{pad}" y2="{sy(y1)}" stroke="#333"/>',
         f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle">{html.escape(xl)}</text>',
         f'<text x="12" y="{h / 2}" text-anchor="middle" transform="rotate(-90 12 {h / 2})">'
         f'{html.escape(yl)}</text>']
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        e.append(f'<text x="{pad - 4}" y="{sy(yv) + 4}" text-anchor="end">{yv:.4g}</text>')
        e.append(f'<line x1="{pad}" y1="{sy(yv)}" x2="{w - 12}" y2="{sy(yv)}" stroke="#eee"/>')
        xv = x0 + (x1 - x0) * i / 4
        if xticks:
            e.append(f'<text x="{sx(xv)}" y="{sy(y0) + 14}" text-anchor="middle">{xv:.3g}</text>')
    return e, sx, sy


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xl: str, yl: str,
               w: int = 460, h: int = 260, y_min: float = 0.0) -> str:
    """Lines with markers, one per series, and a legend."""
    pts = [pt for s in series.values() for pt in s]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y1 = max(max(p[1] for p in pts) * 1.1, y_min + 1e-6)
    e, sx, sy = _axes(w, h, x0 if x1 > x0 else x0 - 1, x1 if x1 > x0 else x1 + 1, y_min, y1, title, xl, yl)
    for i, (name, s) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        if len(s) > 1:
            e.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                     + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s) + '"/>')
        e += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for x, y in s]
        e.append(f'<text x="{w - 16}" y="{30 + 13 * i}" text-anchor="end" fill="{c}">'
                 f'{html.escape(name)}</text>')
    return "\n".join([*e, "</svg>"])


def bar_chart(labels: list[str], values: list[float], title: str, yl: str, ref: float | None = None,
              w: int = 460, h: int = 220) -> str:
    """Vertical bars, with an optional dashed reference line (e.g. the camera frame rate)."""
    if not values:
        return ""
    y1 = max(max(values), ref or 0) * 1.15 or 1.0
    e, sx, sy = _axes(w, h, 0, len(values), 0, y1, title, "", yl, xticks=False)
    bw = (sx(1) - sx(0)) * 0.8
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        e.append(f'<rect x="{sx(i) + bw * 0.1:.1f}" y="{sy(v):.1f}" width="{bw:.1f}" '
                 f'height="{sy(0) - sy(v):.1f}" fill="{COLOURS[0]}">'
                 f'<title>{html.escape(lab)}: {v:.2f}</title></rect>')
        if len(values) <= 16:
            e.append(f'<text x="{sx(i) + bw * 0.6:.1f}" y="{sy(0) + 26}" text-anchor="middle" font-size="9">'
                     f'{html.escape(lab)}</text>')
    if ref is not None:
        e.append(f'<line x1="{sx(0)}" y1="{sy(ref):.1f}" x2="{sx(len(values))}" y2="{sy(ref):.1f}" '
                 f'stroke="#d62728" stroke-dasharray="4 3"/>')
    return "\n".join([*e, "</svg>"])


def histogram(edges: list[float], counts: list[int], title: str, bound: float | None = None,
              w: int = 460, h: int = 220) -> str:
    """Latency distribution as bars over their bins, with the latency bound dashed."""
    if not counts:
        return ""
    x1 = max(edges[-1], bound or 0)
    y1 = max(counts) * 1.1
    e, sx, sy = _axes(w, h, 0, x1, 0, y1, title, "glass-to-glass latency (ms)", "frames")
    for i, c in enumerate(counts):
        bw = max(1.0, sx(edges[i + 1]) - sx(edges[i]) - 1)
        e.append(f'<rect x="{sx(edges[i]):.1f}" y="{sy(c):.1f}" width="{bw:.1f}" '
                 f'height="{sy(0) - sy(c):.1f}" fill="{COLOURS[0]}"/>')
    if bound is not None:
        e.append(f'<line x1="{sx(bound):.1f}" y1="{sy(0)}" x2="{sx(bound):.1f}" y2="{sy(y1)}" '
                 f'stroke="#d62728" stroke-dasharray="4 3"/>')
    return "\n".join([*e, "</svg>"])


def _series_name(run: dict[str, Any], several: bool) -> str:
    """A plot's legend entry: the mode, and the worker count where a size was run with several."""
    return f"{run['mode']} w{workers_of(run)}" if several else str(run["mode"])


def _workers_text(p: dict[str, Any]) -> str:
    n = workers_of(p)
    return f"{n} worker{'s' if n != 1 else ''}"


def write_html(report: dict[str, Any], path: Path) -> Path:
    """The report as one HTML file with inline SVG plots and no external resources."""
    runs = report.get("runs", [])
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>stream-redact load test</title>",
             "<style>body{font-family:sans-serif;margin:24px;max-width:1400px}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "th{background:#f4f4f4}.grid{display:flex;flex-wrap:wrap;gap:12px}.bad{color:#b00}"
             "pre{background:#f8f8f8;padding:8px;font-size:12px}</style></head><body>",
             "<h1>stream-redact load test</h1>",
             f"<p>{html.escape(report.get('started', ''))} &middot; machine: "
             f"{html.escape(json.dumps(report.get('machine', {})))}</p>"]
    cal = report.get("calibration") or []
    if cal:
        parts.append("<p>Harness path floor (camera &rarr; relay &rarr; reader, no pipeline): "
                     + "; ".join(f"{html.escape(c['size'])}: p50 {_fmt(c['p50_ms'], 0)} ms, "
                                 f"p99 {_fmt(c['p99_ms'], 0)} ms" for c in cal) + "</p>")
    parts.append("<h2>Results</h2><pre>" + html.escape(table(report)) + "</pre>")
    parts.append("<h2>Load</h2><div class='grid'>")
    several = len({workers_of(r) for r in runs}) > 1
    for size in sorted({r["size"] for r in runs}):
        sel = [r for r in runs if r["size"] == size]

        def series(key: Any, sel: list[dict[str, Any]] = sel) -> dict[str, list[tuple[float, float]]]:
            return {_series_name(r, several): [(p["k"], v) for p in r["points"] if "latency_ms" in p
                                               and (v := key(p)) is not None] for r in sel}

        parts.append(line_chart(series(lambda p: p["latency_ms"]["p99"]), f"p99 latency vs K ({size})",
                                "streams K", "ms"))
        parts.append(line_chart(series(lambda p: p["delivered_fps_min"]), f"slowest stream fps vs K ({size})",
                                "streams K", "fps"))
        parts.append(line_chart(series(lambda p: p["k"] * p["delivered_fps_mean"]),
                                f"delivered frames/s, all streams ({size})", "streams K", "fps"))
        parts.append(line_chart(series(lambda p: 100 * p["leaks"]["rate"] if p.get("leaks")
                                       and p["leaks"]["rate"] is not None else None),
                                f"leak rate vs load ({size})", "streams K", "% of objects visible"))
    parts.append("</div><h2>Points</h2>")
    for p in _points(report):
        if "latency_ms" not in p:
            parts.append(f"<h3>{html.escape(p['mode'])} {p['size']} {_workers_text(p)} K={p['k']}: error</h3>"
                         f"<pre>{html.escape(p.get('error', ''))}</pre>")
            continue
        verdict = "held" if p["held"] else "broke: " + ", ".join(p["broke_on"])
        parts.append(f"<h3>{html.escape(p['mode'])} {p['size']} {_workers_text(p)} K={p['k']} &mdash; "
                     f"<span class='{'' if p['held'] else 'bad'}'>{html.escape(verdict)}</span></h3>"
                     "<div class='grid'>")
        parts.append(histogram(p["latency_hist"]["edges_ms"], p["latency_hist"]["counts"],
                               "latency distribution", p["spec"].get("latency_bound_ms")))
        streams = p["streams"]
        parts.append(bar_chart([s["stream"] for s in streams], [s["delivered_fps"] for s in streams],
                               "delivered fps per stream (dashed: sent)", "fps", ref=p["fps"]))
        rows = "".join(f"<tr><td style='text-align:left'>{html.escape(k)}</td><td>{v['checked']}</td>"
                       f"<td>{v['visible']}</td></tr>"
                       for k, v in ((p.get("leaks") or {}).get("by_size") or {}).items())
        if rows:
            parts.append("<table><tr><th>object, height px</th><th>checked</th><th>visible</th></tr>"
                         + rows + "</table>")
        parts.append("</div><pre>" + html.escape(json.dumps(
            {k: p.get(k) for k in ("latency_ms", "pipeline", "harness_cpu_cores", "relay_cpu_cores",
                               "machine_busy_cores", "other_load_cores", "events", "blanked_seen",
                               "unreadable", "leak_examples")}, indent=1))
                     + "</pre>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(s for s in parts if s))
    return path
