"""Pictures of LongNet (matplotlib). Every picture of a pattern is drawn from `attention_pattern`.

`save_fig(fig, name)` writes a PNG into the repository's figures/ folder whatever the working
directory (nbval runs a notebook from its own folder; scripts run from anywhere).
"""

from __future__ import annotations

from pathlib import Path


def figures_dir() -> Path:
    """The repository's figures/ folder; ./figures when the package is installed outside a checkout (Colab)."""
    package = Path(__file__).resolve().parent
    repo = package.parent
    if (repo / "pyproject.toml").is_file() and (repo / "figures").is_dir():
        return repo / "figures"
    here = Path.cwd() / "figures"
    here.mkdir(exist_ok=True)
    return here


def save_fig(fig, name: str, *, dpi: int = 120) -> Path:
    """Save `fig` as figures/<name>.png (PNG: nbval compares SVG text, not PNG) and return the path."""
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"name must be a plain file name without folders, got {name!r}")
    path = figures_dir() / (name if name.endswith(".png") else f"{name}.png")
    # metadata without a Software/date stamp keeps the bytes stable across runs and versions
    fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path
