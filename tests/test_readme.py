"""The README's example runs, .ci/run runs exactly the README's commands (lint included), and the
README and notebooks name only what is in the repository: its files, its modules, its license."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PACKAGE = ROOT / "longnet_ref"

# Module paths that the layout of issue 11 retired (longnet_ref/X.py moved into lm/, analysis/ or
# bench/). `longnet_ref.lm.train` does not match: after "longnet_ref." comes "lm".
OLD_MODULES = (
    "train experiment figures complexity paths viz widgets model data generate evaluate checkpoint results bench_report"
).split()
OLD_MODULE_PATH = re.compile(rf"\blongnet_ref[./]({'|'.join(OLD_MODULES)})(?:\.py)?\b")
# File names that exist under no name any more (viz.py and the others live on in a subfolder).
OLD_FILE_NAME = re.compile(r"(?<![\w/.-])(paths|bench|bench_report)\.py\b")


def block_after(marker):
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", README, re.S)
    assert match, f"README.md has no block after <!-- {marker} -->"
    return match.group(1)


def repository_files(*suffixes):
    """The repository's files with these suffixes: tracked, plus new ones git does not ignore."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = [ROOT / name for name in listed.split("\0") if name.endswith(suffixes)]
    return [p for p in paths if p.is_file()]  # a file deleted in the work tree is still in the index


def readme_and_notebooks():
    notebooks = ROOT / "notebooks"
    return [ROOT / "README.md", *sorted(notebooks.glob("*.md")), *sorted(notebooks.glob("*.ipynb"))]


def test_readme_example_runs():
    exec(compile(block_after("readme-example"), "README.md", "exec"), {})


def test_readme_porting_example_runs():
    """It replaces an nn.MultiheadAttention in a small model and checks the outputs are equal."""
    exec(compile(block_after("readme-port"), "README.md", "exec"), {})


def test_ci_reads_its_commands_from_the_readme():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_block ci:install" in ci and "readme_block ci:test" in ci
    # the extraction .ci/run uses gives the README's commands
    for marker in ("ci:install", "ci:test"):
        script = f'cd "{ROOT}" && source <(sed -n "/^readme_block()/,/^}}/p" .ci/run) && readme_block {marker}'
        got = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
        assert got == block_after(marker) and got.strip()


def test_ci_lints_the_package_the_tests_and_the_notebooks_before_testing():
    # .ci/run runs the block with `bash -euo pipefail -c`: joined by &&, a lint failure stops the run
    steps = [step.strip() for step in " ".join(block_after("ci:test").split()).split("&&")]
    assert steps[:2] == ["ruff check longnet_ref tests notebooks", "ruff format --check longnet_ref tests notebooks"]
    assert len(steps) == 3 and steps[2].startswith("python -m pytest tests notebooks ")


def test_no_file_cites_a_document_that_is_not_in_the_repository():
    missing = "LONGNET" + ".md"  # spelt in two parts, so that this file does not cite it either
    assert not (ROOT / missing).exists()
    citing = [
        str(p.relative_to(ROOT))
        for p in repository_files(".py", ".md", ".ipynb", ".toml", ".cfg")
        if missing.lower() in p.read_text(encoding="utf-8", errors="replace").lower()
    ]
    assert not citing, f"{missing} is not in the repository, yet these files cite it: {citing}"


def test_readme_and_notebooks_name_no_old_module_path():
    found = []
    for path in readme_and_notebooks():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in (*OLD_MODULE_PATH.finditer(line), *OLD_FILE_NAME.finditer(line)):
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)}")
    assert not found, "old module paths (see the README's Layout for where they went):\n" + "\n".join(found)


def test_the_old_path_patterns_match_old_paths_only():
    for old in ("python -m longnet_ref.train", "longnet_ref.paths", "`longnet_ref/viz.py`", "longnet_ref.bench_report"):
        assert OLD_MODULE_PATH.search(old), old
    assert OLD_FILE_NAME.search("`paths.py`") and OLD_FILE_NAME.search("bench.py (the CLI)")
    for new in (
        "python -m longnet_ref.lm.train",
        "longnet_ref.analysis.dependency_paths",
        "longnet_ref/analysis/viz.py",
        "longnet_ref.bench",
        "python -m longnet_ref.bench --quick",
        "longnet_ref.lm.data",
        "analysis/dependency_paths.py",
        "bench/report.py",
        "torchscale's dilated_attention.py",
    ):
        assert not OLD_MODULE_PATH.search(new) and not OLD_FILE_NAME.search(new), new


def layout_files():
    """The .py files the README's Layout tree names under longnet_ref/ (two spaces per level)."""
    block = README.split("## Layout\n", 1)[1].split("```", 2)[1]
    files, folders = set(), []
    for line in block.splitlines():
        match = re.match(r"( *)(\S+)", line)
        if not match:
            continue
        depth, name = len(match.group(1)) // 2, match.group(2)
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        elif name.endswith(".py") and folders and folders[0] == "longnet_ref":
            files.add("/".join([*folders, name]))
    return files


def test_the_layout_names_every_module_of_the_package_once():
    # a subpackage's __init__.py is its folder's line of the tree
    modules = {
        str(p.relative_to(ROOT))
        for p in PACKAGE.rglob("*.py")
        if "__pycache__" not in p.parts and not (p.name == "__init__.py" and p.parent != PACKAGE)
    }
    listed = layout_files()
    assert listed == modules, f"in the package, not in the Layout: {sorted(modules - listed)}; " + (
        f"in the Layout, not in the package: {sorted(listed - modules)}"
    )


def test_the_license_is_the_mit_license_pyproject_names():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n\nCopyright (c) 2026 the longnet_ref contributors\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in license_text
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()


def concept_map_rows():
    """(file, names) of every row of the README's concept map."""
    table = re.search(r"<!-- concept-map -->\n(.*?)<!-- /concept-map -->", README, re.S)
    assert table, "README.md has no concept map between <!-- concept-map --> markers"
    rows = []
    for line in table.group(1).splitlines()[2:]:  # after the header and the |---| line
        _, _, file, names, _ = (cell.strip() for cell in line.split("|"))
        rows.append((file.strip("`"), [name.strip(" `") for name in names.split(",")]))
    return rows


def test_concept_map_names_real_functions_and_matches_the_package_docstring():
    import importlib

    import longnet_ref

    rows = concept_map_rows()
    assert len(rows) >= 10
    for file, names in rows:
        assert (ROOT / file).is_file(), file
        module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
        for name in names:
            assert hasattr(module, name), f"{file} has no {name}"
            # the package docstring's map names the same function on the line of the same file
            lines = [ln for ln in longnet_ref.__doc__.splitlines() if re.search(rf"\b{name}\b", ln)]
            assert any(Path(file).name in ln for ln in lines), f"longnet_ref/__init__.py does not map {name} to {file}"


def test_the_floor_recipe_installs_what_the_unit_tests_import():
    """The README's torch-floor recipe: it installs the package's dependencies, with torch at pyproject's
    floor; the test modules it runs import only what it installs (or the standard library, the package and
    the tests' own helpers); the modules it skips exist; its test-only packages carry the dev extras' bounds."""
    import ast
    import shlex
    import sys

    if not hasattr(sys, "stdlib_module_names"):  # Python 3.9
        pytest.skip("needs sys.stdlib_module_names (Python >= 3.10)")
    recipe = re.search(r"<!-- floor-recipe -->\n\s*```bash\n(.*?)```", README, re.S)
    assert recipe, "README.md has no bash block after <!-- floor-recipe -->"
    commands = recipe.group(1).replace("\\\n", " ")
    install = next(line for line in commands.splitlines() if line.strip().startswith("pip install"))
    installed = {re.split(r"[<>=!~\[ ]", req)[0].lower(): req for req in shlex.split(install)[2:]}

    def name(requirement):
        return re.split(r"[<>=!~\[ ]", requirement)[0].lower()

    pyproject = (ROOT / "pyproject.toml").read_text()
    dependencies = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1))
    dev = re.findall(r'^\s*"([^"]+)"', re.search(r"^dev = \[(.*?)^\]", pyproject, re.S | re.M).group(1), re.M)
    assert {name(d) for d in dependencies} <= set(installed), (dependencies, installed)
    floor = re.search(r"torch>=(\d+\.\d+)", " ".join(dependencies)).group(1)
    assert installed["torch"].startswith(f"torch=={floor}."), (installed["torch"], floor)
    for requirement in dev:  # a test-only package the recipe installs has the dev extras' lower bound
        if name(requirement) in installed:
            assert installed[name(requirement)] == requirement, (installed[name(requirement)], requirement)

    ignored = set(re.findall(r"--ignore=(\S+)", commands))
    assert all((ROOT / path).is_file() for path in ignored), ignored
    tests = ROOT / "tests"
    local = {p.stem for p in tests.glob("*.py")} | {"longnet_ref", "__future__"}
    importable = {n.replace("-", "_") for n in installed}
    for path in sorted(tests.glob("*.py")):
        if f"tests/{path.name}" in ignored:
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
        missing = imported - set(sys.stdlib_module_names) - local - importable
        assert not missing, f"tests/{path.name} imports {sorted(missing)}, which the floor recipe does not install"
