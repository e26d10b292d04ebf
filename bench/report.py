"""Tables for the terminal and docs, and the JSON document. Pure.

Every measurement module turns its result into a ``Table``; ``render`` prints one as
aligned text (also valid Markdown), followed by its notes and the machine line, since a
number without the machine it was measured on means little.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def side_by_side(
    title: str,
    columns: list[str],
    left: Sequence[tuple[str, float]],
    right: Sequence[tuple[str, float]],
) -> Table:
    """Two rankings of (name, %) in one table, row by row (the profiles' layout)."""
    table = Table(title, columns)
    blank = ("", float("nan"))
    for i in range(max(len(left), len(right))):
        one = left[i] if i < len(left) else blank
        other = right[i] if i < len(right) else blank
        table.rows.append([one[0], num(one[1], 1), other[0], num(other[1], 1)])
    return table


def num(value: float | None, digits: int = 1) -> str:
    """A number for a table cell; ``-`` for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def times(value: float | None) -> str:
    """A ratio as ``0.42x``."""
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


def render(table: Table, *, machine: str) -> str:
    widths = [len(c) for c in table.columns]
    for row in table.rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [f"### {table.title}", ""]
    lines.append(_line(table.columns, widths))
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [_line(row, widths) for row in table.rows]
    lines.append("")
    lines += [f"- {note}" for note in table.notes]
    lines.append(f"- machine: {machine}")
    return "\n".join(lines) + "\n"


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    padded = [c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(cells, widths, strict=True)]
    return "| " + " | ".join(padded) + " |"


def _numeric(cell: str) -> bool:
    stripped = cell.replace(",", "").replace(".", "").replace("x", "").replace("-", "")
    return stripped.replace("+", "").isdigit()


def to_json(value: Any) -> Any:
    """Dataclasses to dicts, NaN to null: a JSON document any tool can read."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def dumps(document: Any) -> str:
    return json.dumps(to_json(document), indent=2, sort_keys=False) + "\n"
