"""Notebook-wide checks: what notebooks/README.md asks of every notebook, where a machine can check it.

nbval runs the notebooks themselves (the README's test command). These tests check what running
them cannot: stored outputs stripped except the golden cells', the sanitize rules parsed as
written, the setup cell and the one configured repository location, the Colab badges, a static
figure before every slider, summary and exercises, a Colab install that leaves Colab's packages
alone, and the helpers the notebooks use to compare what they build with the package.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbval.plugin import get_sanitize_patterns
from packaging.requirements import Requirement

from longnet_ref.notebook import compare, setup

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
SANITIZE = NOTEBOOK_DIR / "nbval_sanitize.cfg"
GOLDEN = "nbval-check-output"
BADGE = re.compile(
    r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/notebooks/([\w.-]+\.ipynb)"
)

# What Colab preinstalls (snapshot; the floors must stay at or below these so that installing
# this package there upgrades nothing). ipywidgets is the one that matters: Colab stays on 7.7.x.
COLAB_PREINSTALLED = {
    "torch": "2.6.0",
    "numpy": "2.0.2",
    "matplotlib": "3.10.0",
    "ipywidgets": "7.7.1",
    "tqdm": "4.67.1",
}


def cells(path, kind=None):
    nb = json.loads(path.read_text())
    return [c for c in nb["cells"] if kind is None or c["cell_type"] == kind]


def text(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def is_golden(cell):
    return GOLDEN in cell.get("metadata", {}).get("tags", [])


def python_of(cell):
    """A code cell's source parsed as Python: IPython magics (`%pip ...`) become `pass` at their indentation."""
    lines = [re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in text(cell).splitlines()]
    return ast.parse("\n".join(lines))


def configured_repo_url():
    """pyproject.toml's [project.urls] Repository, which notebooks/README.md repeats after <!-- repo-url -->."""
    pyproject = (NOTEBOOK_DIR.parent / "pyproject.toml").read_text()
    urls = re.search(
        r'^\[project\.urls\]\n(?:#.*\n)*Repository = "(https://github\.com/[\w.-]+/[\w.-]+)"', pyproject, re.M
    )
    assert urls, 'pyproject.toml must set the repository: [project.urls] Repository = "https://github.com/OWNER/NAME"'
    match = re.search(
        r'<!-- repo-url -->\n`REPO_URL = "(https://github\.com/[\w.-]+/[\w.-]+)"`',
        (NOTEBOOK_DIR / "README.md").read_text(),
    )
    assert match and match.group(1) == urls.group(1), "notebooks/README.md's REPO_URL must be pyproject's Repository"
    return urls.group(1)


def notebook_ids():
    return [p.stem for p in NOTEBOOKS]


def test_the_first_three_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    for name in ("01_dense_attention", "02_dilated_branch", "03_mixture"):
        assert name in names


# -- nbval's sanitize rules ------------------------------------------------------------------


def test_every_sanitize_rule_is_parsed_by_nbval():
    """nbval drops a rule silently when its replacement is empty: count what its own parser reads."""
    config = SANITIZE.read_text()
    written = [line for line in config.splitlines() if line.startswith("regex:")]
    parsed = get_sanitize_patterns(config)
    assert len(parsed) == len(written) == 3, f"{len(written)} rules written, nbval parses {len(parsed)}: {parsed}"
    # the hazard this test guards against: a rule with an empty replacement vanishes
    assert get_sanitize_patterns("regex: x\nreplace:\n") == []


def test_sanitize_rules_do_what_they_say():
    rules = get_sanitize_patterns(SANITIZE.read_text())

    def sanitize(s):
        for regex, replacement in rules:
            s = re.sub(regex, replacement, s)
        return s

    assert sanitize("out = [-0.0000  0.5]") == sanitize("out = [ 0.0000  0.5]")  # padded
    assert sanitize("lse = -0.0000") == sanitize("lse = 0.0000")  # not padded
    assert sanitize("x = -0.50, y = -0.0001, z = 1e-05") == "x = -0.50, y = -0.0001, z = 1e-05"  # signs kept
    assert sanitize("c = 1:   116") == "c = 1: 116" != sanitize("c = 1:   117")  # only spacing is forgiven
    assert sanitize("<Figure at 0x7f3a1c2b4d90>") == sanitize("<Figure at 0x7f00deadbeef>")


# -- stored outputs --------------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_stored_notebook_is_stripped_with_keep_count(path):
    """Exactly what `nbstripout --keep-count` leaves: no outputs but the golden cells' (keep_output)."""
    result = subprocess.run(
        [sys.executable, "-m", "nbstripout", "--keep-count", "--verify", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, f"run `nbstripout --keep-count {path.relative_to(ROOT)}`: {result.stdout}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_only_golden_cells_keep_outputs_and_they_are_plain_text(path):
    golden = 0
    for cell in cells(path, "code"):
        if not is_golden(cell):
            assert not cell["outputs"], f"output stored in a cell that is not golden:\n{text(cell)[:200]}"
            continue
        golden += 1
        assert cell["metadata"].get("keep_output") is True, f"golden cell without keep_output:\n{text(cell)[:200]}"
        assert cell["execution_count"] is not None and cell["outputs"], f"golden cell not run:\n{text(cell)[:200]}"
        for output in cell["outputs"]:
            assert output["output_type"] == "stream" and output["name"] == "stdout", f"golden output {output}"
        # what differs from machine to machine is printed in ordinary cells
        for forbidden in ("DEVICE", "SMOKE", "perf_counter", "time.time", "__version__", "compare(", "plt."):
            assert forbidden not in text(cell), f"golden cell uses {forbidden!r}:\n{text(cell)[:200]}"
    assert golden >= 2, f"{path.name} has {golden} golden cells"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_no_skipped_cells_and_no_swallowed_errors(path):
    for cell in cells(path, "code"):
        tags = cell.get("metadata", {}).get("tags", [])
        assert not {"nbval-skip", "raises-exception", "nbval-raises-exception", "nbval-ignore-output"} & set(tags)
        assert "NBVAL_SKIP" not in text(cell) and "NBVAL_RAISES_EXCEPTION" not in text(cell)
        for node in ast.walk(python_of(cell)):
            if isinstance(node, ast.ExceptHandler):
                assert node.type is not None, f"bare except:\n{text(cell)[:300]}"
                assert not all(isinstance(s, ast.Pass) for s in node.body), f"except ...: pass\n{text(cell)[:300]}"


# -- skeleton, setup cell, repository location -----------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_title_badge_abstract(path):
    first = cells(path)[0]
    assert first["cell_type"] == "markdown"
    assert text(first).startswith(f"# {path.stem[:2]} · "), "title: '# NN · Title'"
    badges = BADGE.findall(text(first))
    assert badges == [(configured_repo_url().removeprefix("https://github.com/"), path.name)]
    assert "What you will build" in text(first)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_setup_cell(path):
    setup_cell = text(cells(path, "code")[0])
    assert f'REPO_URL = "{configured_repo_url()}"' in setup_cell
    assert 'if "google.colab" in sys.modules:' in setup_cell
    assert 'pip = [sys.executable, "-m", "pip", "install", "--quiet", f"git+{REPO_URL}"]' in setup_cell
    assert "if failed.returncode:\n        raise RuntimeError(" in setup_cell  # a failed install stops the cell
    assert 'SMOKE = "CI" in os.environ' in setup_cell
    assert re.search(r"^DEVICE = setup\(seed=\d+, smoke=SMOKE\)", setup_cell, re.M)
    # the only install anywhere in the notebook, and it installs only this package
    installs = [
        line for c in cells(path, "code") for line in text(c).splitlines() if "install" in line and "pip" in line
    ]
    assert installs == [
        'if "google.colab" in sys.modules:  # install this package (and only it) with pip, or stop with pip\'s reason',
        '    pip = [sys.executable, "-m", "pip", "install", "--quiet", f"git+{REPO_URL}"]',
        '            f"pip could not install git+{REPO_URL} (exit {failed.returncode}):\\n{failed.stderr[-1500:]}\\n"',
    ]


def test_every_badge_points_at_the_configured_repository_and_an_existing_notebook():
    repo = configured_repo_url().removeprefix("https://github.com/")
    sources = [ROOT / "README.md", NOTEBOOK_DIR / "README.md", *NOTEBOOKS]
    for source in sources:
        for owner_repo, name in BADGE.findall(source.read_text()):
            assert owner_repo == repo, f"{source.name}: badge for {owner_repo}, configured {repo}"
            assert (NOTEBOOK_DIR / name).is_file(), f"{source.name}: badge for a missing notebook {name}"


@pytest.mark.parametrize("readme", ["README.md", "notebooks/README.md"])
def test_notebook_tables_list_every_notebook_with_a_badge(readme):
    listed = {name for _, name in BADGE.findall((ROOT / readme).read_text())}
    assert listed == {p.name for p in NOTEBOOKS}


# -- widgets and figures ---------------------------------------------------------------------


def is_named_call(node):
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name)


def is_call_to(node, names):
    func = node.func if isinstance(node, ast.Call) else None
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return name in names


SLIDER_CALLS = {"interact", "interactive", "interactive_output", "explore"}  # explore: analysis.widgets


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_sliders_wrap_pure_plotting_functions_after_a_static_figure(path):
    defined = {}  # plotting function name -> its FunctionDef
    called = set()  # functions called directly so far, in notebook order (the static figures)
    sliders = 0
    for cell in cells(path, "code"):
        assert "%matplotlib widget" not in text(cell) and "ipympl" not in text(cell), "core ipywidgets only"
        for statement in python_of(cell).body:
            if isinstance(statement, ast.FunctionDef):
                defined[statement.name] = statement
                continue
            for node in ast.walk(statement):  # top-level code only: calls inside functions are not figures
                if isinstance(node, ast.Call) and is_call_to(
                    node, {"interact", "interactive", "interactive_output", "explore"}
                ):
                    sliders += 1
                    target = node.args[0]
                    assert isinstance(target, ast.Name) and target.id in defined, "a slider wraps a named function"
                    function = defined[target.id]
                    # the static figure: the function, or a drawing function it calls, run before with fixed arguments
                    draws = {target.id} | {
                        n.func.id for n in ast.walk(function) if is_named_call(n) and n.func.id in defined
                    }
                    assert draws & called, f"{target.id}: no static figure before the slider"
                    prints = [n for n in ast.walk(function) if isinstance(n, ast.Call) and is_call_to(n, {"print"})]
                    assert not prints, f"{target.id} prints: no print inside slider callbacks"
                    last = function.body[-1]
                    assert isinstance(last, ast.Expr) and ast.unparse(last.value) == "plt.show()", (
                        f"{target.id} must end with plt.show()"
                    )
                elif is_named_call(node):
                    called.add(node.func.id)
    assert sliders >= 1, f"{path.name} has no slider"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_saved_figures_are_named_after_the_notebook_and_committed(path):
    names = [
        m.group(1) for c in cells(path, "code") for m in re.finditer(r'(?:save_fig\(fig, |save_as=)"([\w-]+)"', text(c))
    ]
    assert names, f"{path.name} saves no figure"
    for name in names:
        assert name.startswith(path.stem[:2] + "_"), f"figure {name} of {path.name} must start with {path.stem[:2]}_"
        assert (ROOT / "figures" / f"{name}.png").is_file(), f"figures/{name}.png is not in the repository"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_summary_and_two_to_four_exercises(path):
    markdown = "\n".join(text(c) for c in cells(path, "markdown"))
    assert "## Summary" in markdown
    exercises = markdown.split("## Exercises", 1)
    assert len(exercises) == 2, "an '## Exercises' section"
    numbered = re.findall(r"^\d+\. ", exercises[1].split("## References")[0], re.M)
    assert 2 <= len(numbered) <= 4, f"{len(numbered)} exercises"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_references_close_the_notebook(path):
    """The last cell: the paper's sections and equations, and the official code's files."""
    last = text(cells(path)[-1])
    assert last.startswith("## References"), "the last cell is '## References'"
    assert "https://arxiv.org/abs/2307.02486" in last and re.search(r"Sec\. \d", last), "the paper, by section"
    assert re.search(r"`torchscale/[\w/]+\.py`", last), "the official code's files"


# -- the Colab install -----------------------------------------------------------------------


def test_colab_install_leaves_colab_packages_alone():
    """Installing this package where torch & co. are preinstalled must upgrade nothing (notebooks/README.md)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    requirements = [Requirement(s) for s in re.findall(r'"([^"]+)"', block)]
    assert {r.name for r in requirements} == set(COLAB_PREINSTALLED)
    for requirement in requirements:
        assert all(spec.operator == ">=" for spec in requirement.specifier), f"{requirement}: lower bounds only"
        assert requirement.specifier.contains(COLAB_PREINSTALLED[requirement.name]), (
            f"{requirement} would replace Colab's {requirement.name} {COLAB_PREINSTALLED[requirement.name]}"
        )


# -- the helpers the notebooks use -----------------------------------------------------------


def test_compare_passes_equal_values_and_prints_the_difference(capsys):
    x = torch.tensor([1.0, -torch.inf, 2.0], dtype=torch.float64)
    compare("same", x, x.clone())
    compare("within atol", x, x + torch.tensor([1e-14, 0.0, 0.0], dtype=torch.float64))
    out = capsys.readouterr().out
    assert "same" in out and "exact: True" in out and "max abs diff: 0.0e+00" in out
    assert "exact: False" in out and "max abs diff: 1.0e-14" in out


@pytest.mark.parametrize(
    "wrong",
    [
        torch.tensor([1.0, -torch.inf, 2.001], dtype=torch.float64),  # a wrong value
        torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64),  # 0 where -inf is expected
        torch.tensor([1.0, torch.nan, 2.0], dtype=torch.float64),  # NaN
        torch.tensor([1.0, -torch.inf], dtype=torch.float64),  # wrong shape
        torch.tensor([1.0, -torch.inf, 2.0], dtype=torch.float32),  # wrong dtype
    ],
)
def test_compare_fails_on_a_wrong_result(wrong):
    expected = torch.tensor([1.0, -torch.inf, 2.0], dtype=torch.float64)
    with pytest.raises(AssertionError):
        compare("wrong", wrong, expected)


def test_setup_seeds_picks_the_device_and_prints_versions(capsys):
    device = setup(seed=3, smoke=True)
    first = torch.randn(4)
    assert setup(seed=3) == device and torch.equal(torch.randn(4), first)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "longnet_ref" in out and "SMOKE (small CI sizes): True" in out


def test_a_failed_colab_install_stops_the_setup_cell_with_pip_reason(monkeypatch, tmp_path):
    """The setup cell's Colab branch, run with a URL pip cannot install: one RuntimeError naming the URL."""
    import sys
    import types

    setup_cell = text(cells(NOTEBOOKS[0], "code")[0])
    branch = setup_cell[setup_cell.index('if "google.colab" in sys.modules:') : setup_cell.index("else:  # a checkout")]
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    missing = f"file://{tmp_path}/no-such-repo"
    with pytest.raises(RuntimeError, match=f"(?s)pip could not install git\\+{missing} .*Check that this URL opens"):
        exec(compile(branch, "setup cell", "exec"), {"sys": sys, "REPO_URL": missing})


PICTURE_MARK = "<!-- committed picture -->"


def written_pictures(cell):
    """The figures/ PNG names a code cell writes (save_fig(fig, "NAME"), save_as="NAME") or shows (show_result)."""
    source = text(cell)
    names = re.findall(r'save_fig\(fig, "(\w+)"\)', source) + re.findall(r'save_as="(\w+)"', source)
    return list(dict.fromkeys(names + re.findall(r'show_result\("(\w+)"\)', source)))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_ids())
def test_every_picture_is_on_the_page_after_the_cell_that_draws_it(path):
    notebook = json.loads(path.read_text())["cells"]
    shown = []
    for cell, following in zip(notebook, notebook[1:] + [None]):
        names = written_pictures(cell) if cell["cell_type"] == "code" else []
        if not names:
            continue
        assert following is not None and following["cell_type"] == "markdown", f"{names}: no picture cell after"
        assert text(following).startswith(PICTURE_MARK), f"{names}: the next cell is not a committed picture"
        for name in names:
            assert f"](../figures/{name}.png)" in text(following), f"{name}.png is not shown after its cell"
            assert (ROOT / "figures" / f"{name}.png").is_file(), f"figures/{name}.png is not committed"
        shown += names
    assert shown, f"{path.name} shows no picture"
    pictures = [c for c in notebook if c["cell_type"] == "markdown" and PICTURE_MARK in text(c)]
    assert len(pictures) == len({text(c) for c in pictures}), "a picture cell is repeated"


def test_the_readme_gallery_links_every_notebook_picture():
    gallery = (ROOT / "README.md").read_text().split("<!-- gallery -->")[1].split("<!-- /gallery -->")[0]
    for path in NOTEBOOKS:
        row = next(line for line in gallery.splitlines() if f"(notebooks/{path.name})" in line)
        for cell in cells(path, "code"):
            for name in written_pictures(cell):
                assert f"(figures/{name}.png)" in row, f"the gallery's {path.stem} row lacks {name}.png"


def test_notebook_times_runs_a_copy_at_either_size(tmp_path, capsys):
    from longnet_ref.bench import notebook_times

    nb = nbformat.v4.new_notebook()
    code = "import os, time\nSMOKE = 'CI' in os.environ\ntime.sleep(0.05 if SMOKE else 0.4)"
    nb.cells = [nbformat.v4.new_markdown_cell("# title"), nbformat.v4.new_code_cell(code)]
    path = tmp_path / "timed.ipynb"
    nbformat.write(nb, path)
    before = path.read_bytes()
    (full,), wall = notebook_times.time_notebook(path)
    (smoke,), _ = notebook_times.time_notebook(path, smoke=True)
    assert full[0] == 1 and full[1] == "import os, time"
    assert 0.4 <= full[2] < wall and 0.05 <= smoke[2] < 0.4  # SMOKE followed the environment variable CI
    assert path.read_bytes() == before  # the notebook itself is never written
    assert notebook_times.main([str(path), "--min-seconds", "0"]) == 0
    assert "cell   1:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        notebook_times.main([str(tmp_path / "missing.ipynb")])
