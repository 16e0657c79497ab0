"""The README's example runs, and .ci/run runs exactly the README's commands."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block_after(marker):
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", README, re.S)
    assert match, f"README.md has no block after <!-- {marker} -->"
    return match.group(1)


def test_readme_example_runs():
    exec(compile(block_after("readme-example"), "README.md", "exec"), {})


def test_ci_reads_its_commands_from_the_readme():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_block ci:install" in ci and "readme_block ci:test" in ci
    # the extraction .ci/run uses gives the README's commands
    for marker in ("ci:install", "ci:test"):
        script = f'cd "{ROOT}" && source <(sed -n "/^readme_block()/,/^}}/p" .ci/run) && readme_block {marker}'
        got = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
        assert got == block_after(marker) and got.strip()
