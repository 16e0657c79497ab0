"""Generated results: tables written to figures/ and pasted into the README between markers.

A result in the README is a file a committed command wrote, never a copy typed by hand:
`python -m longnet_ref.lm.experiment` and `python -m longnet_ref.bench` write their tables with
`write_table` and paste them with `paste_into_readme`; tests compare the two.
"""

from __future__ import annotations

import csv
from pathlib import Path

from . import viz


def write_table(name, header, rows, folder=None, with_csv=True, footer=""):
    """figures/<name>.md (the table, then `footer`) and, with_csv, figures/<name>.csv; returns the markdown.

    `folder` replaces figures/."""
    folder = Path(folder) if folder else viz.figures_dir()
    if with_csv:
        with open(folder / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n" + footer
    (folder / f"{name}.md").write_text(markdown)
    return markdown


def paste_into_readme(marker, markdown, readme=None):
    """Replace the text between <!-- marker --> and <!-- /marker --> in the README, if both are there."""
    readme = Path(readme) if readme else viz.figures_dir().parent / "README.md"
    begin, end = f"<!-- {marker} -->\n", f"<!-- /{marker} -->"
    if not readme.is_file():
        return False
    text = readme.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    readme.write_text(head + begin + markdown + end + rest.split(end, 1)[1])
    return True
