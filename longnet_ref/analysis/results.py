"""Generated results: tables written to figures/ and pasted into the README between markers.

A result in the README is a file a committed command wrote, never a copy typed by hand:
`python -m longnet_ref.lm.experiment` and `python -m longnet_ref.bench` write their tables with
`write_table` and paste them with `paste_into_readme`; tests compare the two.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..files import write_atomic
from . import viz


def write_table(name, header, rows, folder=None, with_csv=True, footer=""):
    """figures/<name>.md (the table, then `footer`) and, with_csv, figures/<name>.csv; returns the markdown.

    `folder` replaces figures/; an installed copy without one must be told where (`viz.figures_dir`)."""
    folder = Path(folder) if folder else viz.required_figures_dir(f"the table {name}")
    if with_csv:
        text = io.StringIO(newline="")
        csv.writer(text).writerows([header, *rows])
        write_atomic(folder / f"{name}.csv", text.getvalue())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n" + footer
    write_atomic(folder / f"{name}.md", markdown)
    return markdown


def paste_into_readme(marker, markdown, readme=None):
    """Replace the text between <!-- marker --> and <!-- /marker --> in the README, if both are there.

    readme None: the README of the checkout this package runs from, and none at all for an
    installed copy (never a README that happens to be in the working directory). Returns
    whether it wrote.
    """
    if readme is None:
        repo = viz.checkout_root()
        if repo is None:
            return False
        readme = repo / "README.md"
    readme = Path(readme)
    begin, end = f"<!-- {marker} -->\n", f"<!-- /{marker} -->"
    if not readme.is_file():
        return False
    text = readme.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    write_atomic(readme, head + begin + markdown + end + rest.split(end, 1)[1])
    return True
