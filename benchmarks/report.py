"""The result rows: a rich table and a JSON list."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

#: The keys of every row, in this order.
KEYS = ("variant", "msgs_per_s", "ratio_to_plain", "p50_ms", "p99_ms", "peak_rss_mb",
        "order_violations", "notes")


def row(variant: str, **values: Any) -> dict[str, Any]:
    """A row with every key of :data:`KEYS` (``None`` where not measured)."""
    data = {key: None for key in KEYS}
    data["variant"] = variant
    data["notes"] = ""
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


def table(rows: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title, show_header=True, header_style="bold", show_lines=False)
    t.add_column("variant", no_wrap=True)
    t.add_column("msg/s", justify="right")
    t.add_column("× plain", justify="right")
    t.add_column("p50 ms", justify="right")
    t.add_column("p99 ms", justify="right")
    t.add_column("peak RSS MB", justify="right")
    t.add_column("order viol.", justify="right")
    for r in rows:
        violations = r["order_violations"]
        t.add_row(r["variant"], _fmt(r["msgs_per_s"], ",.0f"), _fmt(r["ratio_to_plain"], ".2f"),
                  _fmt(r["p50_ms"], ".1f"), _fmt(r["p99_ms"], ".1f"), _fmt(r["peak_rss_mb"], ".0f"),
                  "-" if violations is None else (str(violations) if violations == 0
                                                  else f"[red]{violations}[/]"))
    return t


def print_table(rows: list[dict[str, Any]], title: str, console: Console) -> None:
    """The table, then each row's notes (too long for a column)."""
    console.print(table(rows, title))
    for r in rows:
        if r["notes"]:
            console.print(f"  [bold]{escape(r['variant'])}[/]: {escape(r['notes'])}", highlight=False)


def write_json(rows: list[dict[str, Any]], path: str | Path) -> None:
    Path(path).write_text(json.dumps([{k: r[k] for k in KEYS} for r in rows], indent=2) + "\n",
                          encoding="utf-8")
