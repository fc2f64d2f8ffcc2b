"""The result rows: a rich table and a JSON list."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

#: The keys of every throughput row, in this order.
KEYS = ("table", "variant", "msgs_per_s", "ratio_to_plain", "peak_rss_mb", "order_violations",
        "notes")
#: The keys of every latency row, in this order: ``rate_spec`` is the rate as asked
#: (``"200"``, ``"half"``), ``rate`` the target msg/s, ``achieved_rate`` the publisher's.
LATENCY_KEYS = ("table", "variant", "rate_spec", "rate", "achieved_rate", "messages", "p50_ms",
                "p90_ms", "p99_ms", "max_ms", "order_violations", "notes")
THROUGHPUT = "throughput"
LATENCY = "latency"


def row(variant: str, **values: Any) -> dict[str, Any]:
    """A throughput row with every key of :data:`KEYS` (``None`` where not measured)."""
    data: dict[str, Any] = {key: None for key in KEYS}
    data.update(table=THROUGHPUT, variant=variant, notes="")
    data.update(values)
    return data


def latency_row(variant: str, rate_spec: str, **values: Any) -> dict[str, Any]:
    """A latency row with every key of :data:`LATENCY_KEYS` (``None`` where not measured)."""
    data: dict[str, Any] = {key: None for key in LATENCY_KEYS}
    data.update(table=LATENCY, variant=variant, rate_spec=rate_spec, notes="")
    data.update(values)
    return data


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill ``ratio_to_plain`` from the "plain" row's ``msgs_per_s``."""
    plain = next((r["msgs_per_s"] for r in rows if r["variant"] == "plain"), None)
    for r in rows:
        if plain and r["msgs_per_s"]:
            r["ratio_to_plain"] = round(r["msgs_per_s"] / plain, 3)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(title: str, *numbers: str) -> Table:
    """A table whose first column names the variant and whose others are numbers."""
    t = Table(title=title, show_header=True, header_style="bold", show_lines=False)
    t.add_column("variant", no_wrap=True)
    for name in numbers:
        t.add_column(name, justify="right")
    return t


def table(rows: list[dict[str, Any]], title: str) -> Table:
    t = _table(title, "msg/s", "× plain", "peak RSS MB", "order viol.")
    for r in rows:
        t.add_row(r["variant"], _fmt(r["msgs_per_s"], ",.0f"), _fmt(r["ratio_to_plain"], ".2f"),
                  _fmt(r["peak_rss_mb"], ".0f"), _violations(r["order_violations"]))
    return t


def latency_table(rows: list[dict[str, Any]], title: str) -> Table:
    t = _table(title, "rate", "msg/s", "msgs", "p50 ms", "p90 ms", "p99 ms", "max ms", "order viol.")
    for r in rows:
        t.add_row(r["variant"], r["rate_spec"], _fmt(r["rate"], ",.0f"), _fmt(r["messages"], ",d"),
                  _fmt(r["p50_ms"], ".2f"), _fmt(r["p90_ms"], ".2f"), _fmt(r["p99_ms"], ".2f"),
                  _fmt(r["max_ms"], ".1f"), _violations(r["order_violations"]))
    return t


def _violations(violations: int | None) -> str:
    return "-" if violations is None else (str(violations) if violations == 0
                                           else f"[red]{violations}[/]")


def print_table(rows: list[dict[str, Any]], title: str, console: Console) -> None:
    """The table, then each row's notes (too long for a column)."""
    console.print(table(rows, title))
    for r in rows:
        if r["notes"]:
            console.print(f"  [bold]{escape(r['variant'])}[/]: {escape(r['notes'])}", highlight=False)


def print_latency_table(rows: list[dict[str, Any]], title: str, console: Console) -> None:
    """The latency table, then each row's notes."""
    console.print(latency_table(rows, title))
    for r in rows:
        if r["notes"]:
            console.print(f"  [bold]{escape(r['variant'])}[/] at {escape(r['rate_spec'])}: "
                          f"{escape(r['notes'])}", highlight=False)


def write_json(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Every row, throughput and latency (``table`` says which), as one JSON list."""
    keyed = [{k: r[k] for k in (LATENCY_KEYS if r["table"] == LATENCY else KEYS)} for r in rows]
    Path(path).write_text(json.dumps(keyed, indent=2) + "\n", encoding="utf-8")
