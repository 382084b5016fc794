"""A table as Markdown, for the inspect tables and the run-folder listing."""

import pandas as pd


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub Markdown table of `table` (a `|` in a cell escaped), or "(none)" for an empty one."""
    if not len(table):
        return "(none)\n"
    header = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"
