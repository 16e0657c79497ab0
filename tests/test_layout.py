"""The package's dependency rules, read from the source (AST) and from a fresh interpreter.

- The top level (the model) and parallel/ import nothing from lm/, analysis/ or bench/, and
  `import longnet_ref` loads neither matplotlib nor ipywidgets.
- The readable path (attention, patterns, dilated, oracle, and the merge in mixture) imports
  nothing from fast.py or kernels.py.
- The single-device implementation ("fast" or "readable") is chosen in one place, mixture.py.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "longnet_ref"
TOP_LEVEL = sorted(PACKAGE.glob("*.py"))
BELOW = ("lm", "analysis", "bench")


def imported_modules(path):
    """Every module `path` imports, anywhere in the file (lazy imports inside functions too), as
    absolute dotted names: `from ..fast import x` in longnet_ref/parallel/a.py gives longnet_ref.fast."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])  # longnet_ref[.sub]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names]  # `from . import viz`
    return found


def test_imported_modules_reads_relative_imports():
    # the reader itself, on files whose imports are known, so the rules below cannot pass vacuously
    assert "longnet_ref.fast" in imported_modules(PACKAGE / "mixture.py")
    assert "longnet_ref.analysis.viz" in imported_modules(PACKAGE / "analysis" / "results.py")
    assert "longnet_ref.layer" in imported_modules(PACKAGE / "lm" / "model.py")


@pytest.mark.parametrize("path", TOP_LEVEL + sorted((PACKAGE / "parallel").glob("*.py")), ids=lambda p: p.name)
def test_the_model_imports_nothing_below_it(path):
    below = [m for m in imported_modules(path) if m.split(".")[:2] in [["longnet_ref", b] for b in BELOW]]
    assert not below, f"{path.relative_to(PACKAGE.parent)} imports {below}"
    heavy = [m for m in imported_modules(path) if m.split(".")[0] in ("matplotlib", "ipywidgets")]
    assert not heavy, f"{path.relative_to(PACKAGE.parent)} imports {heavy}"


def test_import_longnet_ref_loads_no_plotting_and_nothing_below():
    code = (
        "import sys, json, longnet_ref, longnet_ref.parallel; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'ipywidgets') "
        "or m.split('.')[:2] in (['longnet_ref', 'lm'], ['longnet_ref', 'analysis'], ['longnet_ref', 'bench']))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == []


READABLE = ("attention.py", "patterns.py", "dilated.py", "oracle.py", "checks.py")


@pytest.mark.parametrize("name", READABLE)
def test_the_readable_path_imports_no_fast_path(name):
    fast = [m for m in imported_modules(PACKAGE / name) if m.startswith(("longnet_ref.fast", "longnet_ref.kernels"))]
    assert not fast, f"{name} imports {fast}"


def test_the_readable_merge_uses_no_fast_path_name():
    tree = ast.parse((PACKAGE / "mixture.py").read_text())
    fast_names = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module in ("fast", "kernels")
        for alias in node.names
    }
    assert fast_names, "mixture.py should import the fast path (it dispatches to it)"
    merge = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "merge_branches")
    used = {n.id for n in ast.walk(merge) if isinstance(n, ast.Name)}
    assert not used & fast_names, f"merge_branches uses {used & fast_names}"


def test_the_implementation_is_chosen_in_one_place():
    """Only mixture.py names the branch implementations; no other top-level module tests `implementation`."""
    implementations = {"readable_branch", "fast_branch", "fast_dilated_attention"}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        named = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        named |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        if path.name != "mixture.py":
            assert not (named - defined) & implementations, f"{path.name} names {(named - defined) & implementations}"
        if path.parent == PACKAGE and path.name not in ("mixture.py", "checks.py"):
            compares = [
                n
                for n in ast.walk(tree)
                if isinstance(n, ast.Compare)
                and any(isinstance(x, ast.Name) and x.id == "implementation" for x in [n.left, *n.comparators])
            ]
            assert not compares, f"{path.name} compares `implementation` (line {compares[0].lineno})"


def test_the_steps_of_a_branch_carry_the_papers_equation_numbers():
    """Notebook 02 quotes Sec. 2.2: Q, K, V segmented and sparsified in Eqs. 3-5, attended in Eq. 6,
    scattered and concatenated in Eqs. 7-8. The package says the same, in every module."""
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "longnet_ref"
    stale = re.compile(r"\bEqs?\. (4|5)\b(?!-)|Eqs\. 6-8")  # the old numbering: sparsify 4, attend 5, scatter 6-8
    found = [f"{p.relative_to(package.parent)}:{i}" for p in sorted(package.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if stale.search(line)]  # fmt: skip
    assert not found, f"old step numbering (use Eqs. 3-5, Eq. 6, Eqs. 7-8) at {found}"
    notebook = (package.parent / "notebooks" / "02_dilated_branch.ipynb").read_text()
    assert "## 4. Attend (Eq. 6)" in notebook and "## 5. Scatter (Eqs. 7–8)" in notebook
