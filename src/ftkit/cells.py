"""Text width in terminal cells. A CJK character takes two cells, so padding or cutting by len() misaligns
every column after Chinese text; rich's cell measure (the Unicode East Asian Width table) gets it right."""

from __future__ import annotations

from rich.cells import cell_len, set_cell_size


def pad(text: str, width: int) -> str:
    """`text` followed by spaces up to `width` cells (never cut)."""
    return text + " " * max(0, width - cell_len(text))


def clip(text: str, width: int) -> str:
    """`text` on one line, at most `width` cells, ending with … when it was cut."""
    text = " ".join(text.split())
    if cell_len(text) <= width:
        return text
    return set_cell_size(text, width - 1).rstrip() + "…"


def columns(rows: list[list[str]], widths: list[int], separator: str = " | ") -> list[str]:
    """Rows of cells joined by `separator`, each cell clipped and padded to its column's width (the last one is
    clipped, not padded)."""
    lines = []
    for row in rows:
        cells = [clip(cell, width) for cell, width in zip(row, widths)]
        lines.append(separator.join([pad(c, w) for c, w in zip(cells[:-1], widths)] + cells[-1:]))
    return lines
