"""Result tables as plain text (terminal) and as a Markdown report with pictures (SPEC 8).

Cell formatting is shared by both: floats with 2 decimals, a (mean, std) pair or a {"mean", "std"}
dict as `mean ± std`, a missing key or None as '-'. Columns whose values are all numbers are
right-aligned.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Mapping, Sequence

from prism_jax.io import artifacts, fs

MISSING = "-"


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _mean_std(value: Any) -> tuple[Any, Any] | None:
  """(mean, std) if `value` is a pair of numbers or a mapping with numeric 'mean' and 'std', else None."""
  if isinstance(value, Mapping) and "mean" in value and "std" in value:
    pair = (value["mean"], value["std"])
  elif isinstance(value, (tuple, list)) and len(value) == 2:
    pair = tuple(value)
  else:
    return None
  return pair if all(_is_number(v) for v in pair) else None


def format_value(value: Any) -> str:
  """One table cell as text (see the module docstring)."""
  if value is None:
    return MISSING
  if isinstance(value, str):
    return value
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, numbers.Integral):
    return str(int(value))
  if _is_number(value):
    value = float(value)
    return "–" if math.isnan(value) else f"{value:.2f}"  # undefined (e.g. intra_cos at IPC 1)
  pair = _mean_std(value)
  if pair is not None:
    return f"{format_value(pair[0])} ± {format_value(pair[1])}"
  return str(value)


def _is_numeric_column(rows: Sequence[Mapping[str, Any]], column: str) -> bool:
  values = [row.get(column) for row in rows if row.get(column) is not None]
  return bool(values) and all(_is_number(v) or _mean_std(v) is not None for v in values)


def _cells(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[list[str]]:
  for i, row in enumerate(rows):
    if not isinstance(row, Mapping):
      raise ValueError(f"rows[{i}] is a {type(row).__name__}: expected a dict of column -> value")
  return [[format_value(row.get(column)) for column in columns] for row in rows]


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A fixed-width text table: header, a dashed rule, one line per row; columns 2 spaces apart."""
  columns = [str(c) for c in columns]
  cells = _cells(rows, columns)
  widths = [max([len(c)] + [len(line[j]) for line in cells]) for j, c in enumerate(columns)]
  right = [_is_numeric_column(rows, c) for c in columns]

  def line(values: Sequence[str]) -> str:
    parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
    return "  ".join(parts).rstrip()

  return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(v) for v in cells])


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A GitHub-flavoured Markdown table; numeric columns are right-aligned, '|' in cells is escaped."""
  columns = [str(c) for c in columns]
  cells = _cells(rows, columns)
  rule = ["---:" if _is_numeric_column(rows, c) else "---" for c in columns]

  def line(values: Sequence[str]) -> str:
    return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

  return "\n".join([line(columns), "| " + " | ".join(rule) + " |"] + [line(v) for v in cells])


def _picture_link(caption: str, picture_path: str, report_dir: str) -> str:
  relative = fs.relpath(picture_path, report_dir)
  if any(ch in relative for ch in " ()"):
    relative = f"<{relative}>"
  caption = str(caption).replace("[", "\\[").replace("]", "\\]")
  return f"![{caption}]({relative})"


def write_report(path: str, title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                 pictures: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> str:
  """Writes a Markdown report atomically: title, table, pictures (linked relative to the report), notes.

  `pictures` is a sequence of (caption, path to the PNG). Returns the report's text.
  """
  report_dir = os.path.dirname(fs.abspath(path))
  parts = [f"# {title}", markdown_table(rows, columns)]
  for i, picture in enumerate(pictures):
    if not (isinstance(picture, (tuple, list)) and len(picture) == 2):
      raise ValueError(f"pictures[{i}] is {picture!r}: expected a (caption, path) pair")
    parts.append(_picture_link(picture[0], picture[1], report_dir))
  if notes:
    parts.append("\n".join(f"- {note}" for note in notes))
  text = "\n\n".join(parts) + "\n"
  artifacts.write_bytes(path, text.encode("utf-8"))
  return text
