"""
Turning measurements into ratios, target checks and the printed table.
"""

from __future__ import annotations

from typing import Any

# figure: (headline field, unit, lower is better, target text, target check)
HEADLINES: dict[str, tuple[str, str, bool, str, Any]] = {
    "start": ("median_s", "s", True, "<= 1.1x", lambda r: r <= 1.1),
    "roundtrip": ("p50_ms", "ms", True, "<= 1.1x", lambda r: r <= 1.1),
    "pipelined": ("executes_per_s", "exec/s", False, "", None),
    "stream_one_write": ("mb_per_s", "MB/s", False, ">= 0.9x, 0 lost", lambda r: r >= 0.9),
    "stream_flushed_writes": ("mb_per_s", "MB/s", False, ">= 0.9x, 0 lost", lambda r: r >= 0.9),
    "concurrent": ("last_ready_s", "s", True, "all ready", None),
}

TITLES = {
    "start": "kernel start -> first kernel_info_reply (median of {n})",
    "roundtrip": "execute round trip '1+1', p50 of {n}",
    "pipelined": "{n} pipelined executes",
    "stream_one_write": "stream: {mb:g} MB in one write",
    "stream_flushed_writes": "stream: {chunks} flushed 10 kB writes",
    "concurrent": "{n} concurrent starts: time to last ready",
}


def ratio(gateway: Any, direct: Any) -> float | None:
    if not isinstance(gateway, (int, float)) or not isinstance(direct, (int, float)) or not direct:
        return None
    return gateway / direct


def summarise(figures: dict[str, dict[str, Any]]) -> list[str]:
    """
    Add C{ratio} (gateway / direct), C{target} and C{met} to each figure;
    return the correctness problems found (lost output, kernels that never
    became ready), which make the run fail.
    """
    problems = []
    for name, figure in figures.items():
        gateway, direct = figure.get("gateway"), figure.get("direct")
        if name in HEADLINES:
            field, _, _, target, check = HEADLINES[name]
            figure["ratio"] = ratio((gateway or {}).get(field), (direct or {}).get(field))
            figure["target"] = target
            met = None
            if check is not None and figure["ratio"] is not None:
                met = bool(check(figure["ratio"]))
            if name.startswith("stream"):
                sides = [s for s in (gateway, direct) if s]
                lost = [s.get("lost") for s in sides] + [s.get("idle_lost") for s in sides]
                if any(lost) or not all(s.get("bytes_ok", True) for s in sides):
                    met = False
                    problems.append(
                        f"{name}: output lost (gateway {(gateway or {}).get('lost')}, "
                        f"direct {(direct or {}).get('lost')} chunks; runs whose idle never came: "
                        f"gateway {(gateway or {}).get('idle_lost', 0)}, direct {(direct or {}).get('idle_lost', 0)})"
                    )
            if name == "concurrent":
                for side_name, side in (("gateway", gateway), ("direct", direct)):
                    if side and side["ready"] != side["requested"]:
                        problems.append(
                            f"concurrent: {side_name} {side['ready']} of {side['requested']} ready"
                        )
                met = bool(gateway) and gateway["ready"] == gateway["requested"]
            figure["met"] = met
        if name == "roundtrip":
            figure["ratio_p99"] = ratio((gateway or {}).get("p99_ms"), (direct or {}).get("p99_ms"))
    return problems


def fmt(value: Any, unit: str) -> str:
    """
    A figure with its unit, to three significant digits or so; C{-} for none.
    """
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            text = f"{value:,.0f}"
        elif abs(value) >= 10:
            text = f"{value:.1f}"
        else:
            text = f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    else:
        text = str(value)
    return f"{text} {unit}"


def table(results: dict[str, Any]) -> str:
    figures = results["figures"]
    sizes = results["meta"]["sizes"]
    rows = [("figure", "gateway", "direct", "gw/direct", "target")]

    def add(title: str, g: str, d: str, r: Any, target: str, met: Any) -> None:
        rows.append(row(title, g, d, r, target, met))

    for name in HEADLINES:
        if name not in figures:
            continue
        figure = figures[name]
        field, unit, _, target, _ = HEADLINES[name]
        g, d = figure.get("gateway") or {}, figure.get("direct") or {}
        title = TITLES[name].format(
            n={"start": sizes["starts"], "roundtrip": sizes["roundtrips"],
               "pipelined": sizes["pipelined"], "concurrent": sizes["concurrent"]}.get(name, ""),
            mb=sizes["stream_chunks"] * 10_000 / 1e6,
            chunks=sizes["stream_chunks"],
        )
        gv, dv = fmt(g.get(field), unit), fmt(d.get(field), unit)
        if name == "concurrent":
            gv += f" ({g.get('ready', 0)}/{g.get('requested', 0)})" if g else ""
            dv += f" ({d.get('ready', 0)}/{d.get('requested', 0)})" if d else ""
        if name.startswith("stream"):
            gv += f" lost {g['lost']}" if g else ""
            dv += f" lost {d['lost']}" if d else ""
        add(title, gv, dv, figure.get("ratio"), target, figure.get("met"))
        if name == "roundtrip":
            add("execute round trip '1+1', p99", fmt(g.get("p99_ms"), "ms"),
                fmt(d.get("p99_ms"), "ms"), figure.get("ratio_p99"), "", None)
    rss = (figures.get("rss") or {}).get("gateway")
    if rss:
        rows.append(("gateway RSS idle (start of run)", fmt(rss.get("idle_mib"), "MiB"), "", "", ""))
        if rss.get("with_kernels_mib") is not None:
            rows.append((f"gateway RSS with {rss['kernels']} kernels connected",
                         fmt(rss["with_kernels_mib"], "MiB"), "", "", ""))
        if rss.get("idle_after_mib") is not None:
            rows.append(("gateway RSS idle (end of run)", fmt(rss["idle_after_mib"], "MiB"), "", "", ""))
    return render(rows, results.get("skipped", {}))


def row(title: str, a: str, b: str, r: Any, target: str, met: Any) -> tuple[str, str, str, str, str]:
    """
    One line of a table: a figure's two sides, their ratio and its target,
    marked C{ok} or C{MISSED} when C{met} says.
    """
    mark = {True: "  ok", False: "  MISSED", None: ""}[met]
    return (title, a, b, "-" if r is None else f"{r:.2f}", target + mark)


def render(rows: list[tuple[str, ...]], skipped: dict[str, str]) -> str:
    """
    Rows (the first is the heading) as aligned columns, then what was
    skipped and why.
    """
    widths = [max(len(line[i]) for line in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for name, reason in skipped.items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)
