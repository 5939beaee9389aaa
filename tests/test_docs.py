"""Docs that cannot drift: the README's generated blocks are current, its set-up is what CI runs, every
command and profile is documented."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_generated_blocks_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_ci_runs_the_readme_setup_commands():
    setup = re.search(r"## Set up.*?```sh\n(.*?)```", README, re.S).group(1).strip().splitlines()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == setup


def test_every_command_is_in_the_readme():
    from planner.cli import COMMANDS

    for name in COMMANDS:
        assert f"ftplan {name}" in README, name


def test_every_breakdown_term_is_documented():
    from planner.memory import TERMS

    for term, what in TERMS.items():
        assert what, term
