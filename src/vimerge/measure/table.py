"""The one markdown-table helper: a header row, a separator and one line per body row."""

from __future__ import annotations


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table of string cells (no escaping: cells must not hold ``|``).

    >>> print(markdown_table(["a", "b"], [["1", "2"]]))
    | a | b |
    |---|---|
    | 1 | 2 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


__all__ = ["markdown_table"]
