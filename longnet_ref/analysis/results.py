"""Generated results: tables written to figures/ and pasted into the README between markers.

A result in the README is a file a committed command wrote, never a copy typed by hand:
`python -m longnet_ref.lm.experiment` and `python -m longnet_ref.bench` write their tables with
`write_table` and paste them with `paste_into_readme`; tests compare the two.
"""

from __future__ import annotations

import csv
import io

from ..checks import as_path, check_file_name, check_flag, check_instance, is_sequence
from ..files import write_atomic
from . import viz


def write_table(name, header, rows, folder=None, with_csv=True, footer=""):
    """figures/<name>.md (the table, then `footer`) and, with_csv, figures/<name>.csv; returns the markdown.

    `folder` replaces figures/; an installed copy without one must be told where (`viz.figures_dir`)."""
    check_file_name("name", name)
    if not is_sequence(header) or not header:
        raise ValueError(f"header must be a non-empty list of column names, got {header!r}")
    for i, row in enumerate(check_instance("rows", rows, (list, tuple), "a list of rows")):
        if not is_sequence(row) or len(row) != len(header):
            raise ValueError(f"rows[{i}] must be a list of {len(header)} cells, one per column of header, got {row!r}")
    check_flag("with_csv", with_csv)
    check_instance("footer", footer, str)
    folder = as_path("folder", folder) if folder is not None else viz.required_figures_dir(f"the table {name}")
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
    check_instance("marker", marker, str)
    check_instance("markdown", markdown, str)
    if readme is None:
        repo = viz.checkout_root()
        if repo is None:
            return False
        readme = repo / "README.md"
    readme = as_path("readme", readme)
    begin, end = f"<!-- {marker} -->\n", f"<!-- /{marker} -->"
    if not readme.is_file():
        return False
    text = readme.read_text()
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    write_atomic(readme, head + begin + markdown + end + rest.split(end, 1)[1])
    return True
