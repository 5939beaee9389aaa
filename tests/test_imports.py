"""The planner stays pure: `import planner`, `ftplan estimate` and `ftplan recommend` never import torch,
transformers, peft, pandas or matplotlib (they would cost seconds at start-up)."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "pandas", "matplotlib", "bitsandbytes", "accelerate", "numpy")


def _modules_after(code: str) -> set:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return {line.split(".")[0] for line in out.stdout.splitlines()}


def test_import_planner_is_light():
    mods = _modules_after("import planner, planner.plan, planner.recommend, planner.memory, planner.cost, planner.hub")
    assert not mods & set(HEAVY), mods & set(HEAVY)
    assert "huggingface_hub" not in mods  # imported only when a hub id is resolved (planner/hub.py)


def test_estimate_and_recommend_commands_are_light():
    code = (
        "from click.testing import CliRunner\n"
        "from planner.cli import cli\n"
        "r = CliRunner().invoke(cli, ['estimate', '--model', '8b', '--gpu', 'a100-80', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(cli, ['recommend', '--model', '7b', '--gpu', '4090', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
    )
    mods = _modules_after(code)
    assert not mods & set(HEAVY), mods & set(HEAVY)
