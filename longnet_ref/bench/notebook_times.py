"""How long each cell of a notebook takes: `python -m longnet_ref.bench.notebook_times NOTEBOOK`.

Runs a copy of the notebook in a fresh kernel (nbclient, the engine nbval drives too), at full
size or, with `--smoke`, at CI size (the environment variable CI set, so `SMOKE` is true), and
prints every cell that took at least `--min-seconds`, the cells' total, the wall time with the
kernel's start, and the 1-minute load average before and after (an idle 2-core machine reads
below 1; the notebook cells' time estimates are labelled with it). The notebook file itself is
never written. Needs the dev extras (nbclient comes with nbval and jupyterlab).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime

from ..checks import as_path
from ..cli import HelpFormatter


def cell_seconds(cell):
    """Wall seconds of one executed cell, from the timestamps nbclient records (None if it did not run)."""
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return None
    parse = lambda stamp: datetime.fromisoformat(stamp.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def time_notebook(path, smoke=False, timeout=3600):
    """[(cell index, first line, seconds)] for every code cell, and the wall seconds with the kernel's start."""
    import nbformat
    from nbclient import NotebookClient

    path = as_path("notebook", path)
    if not path.is_file():
        raise ValueError(f"notebook must be an existing .ipynb file, got {str(path)!r}")
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    if smoke:
        env["CI"] = "true"
    else:
        env.pop("CI", None)
    client = NotebookClient(nb, timeout=timeout, record_timing=True, resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute(env=env)  # the kernel's environment (jupyter_client's start_kernel)
    wall = time.perf_counter() - start
    cells = [
        (i, (cell.source.splitlines() or [""])[0][:70], cell_seconds(cell))
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
    ]
    return cells, wall


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m longnet_ref.bench.notebook_times",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("notebook", help="the .ipynb file to run (a copy runs; the file is not written)")
    parser.add_argument("--smoke", action="store_true", help="CI size: run with the environment variable CI set")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="print the cells that took at least this long")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    try:
        cells, wall = time_notebook(args.notebook, args.smoke)
    except ValueError as error:
        parser.error(str(error))
    load_after = os.getloadavg()[0]
    size = "CI size (SMOKE)" if args.smoke else "full size"
    print(f"{args.notebook}, {size}, {datetime.now().date()}; 1-minute load average {load_before:.2f} before, "
          f"{load_after:.2f} after")  # fmt: skip
    for index, first_line, seconds in cells:
        if seconds is not None and seconds >= args.min_seconds:
            print(f"  cell {index:3d}: {seconds:7.1f} s  {first_line}")
    total = sum(seconds for _, _, seconds in cells if seconds is not None)
    print(f"  all {len(cells)} code cells: {total:.1f} s; wall with the kernel's start: {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
