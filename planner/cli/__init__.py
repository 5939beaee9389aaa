"""ftplan: plan, validate and run LLM fine-tuning with numbers you can check.

The root click group. Subcommands live one module each in this package and are imported only when invoked,
so `ftplan estimate` / `ftplan recommend` start fast and never import torch.
"""

from __future__ import annotations

import importlib

import click

# command name -> (module, attribute, short help)
COMMANDS = {
    "estimate": ("planner.cli.estimate", "estimate", "Memory, speed and cost of one configuration."),
    "recommend": ("planner.cli.recommend", "recommend", "Rank the plans that fit a GPU; save the chosen one."),
    "limits": ("planner.cli.limits", "limits", "Longest sequence, largest batch and rank that fit a GPU."),
    "gpus": ("planner.cli.catalog", "gpus", "GPU profiles (list, show)."),
    "models": ("planner.cli.catalog", "models", "Model profiles (list, show)."),
    "calibrate": ("planner.cli.calibrate", "calibrate", "Measure real training steps and record them (GPU or CPU)."),
    "validate": ("planner.cli.calibrate", "validate", "Predicted vs measured for every record."),
    "run": ("planner.cli.run", "run", "Execute a plan on your data (transformers + peft)."),
    "merge": ("planner.cli.run", "merge", "Fold adapters into the base model, or combine adapters."),
    "report": ("planner.cli.report", "report", "Comparison charts and tables (HTML, PNG, CSV)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("planner"):
                raise
            missing = e.name or "a dependency"

            @click.command(name=name, help=COMMANDS[name][2])
            def unavailable(**_):
                raise click.ClickException(
                    f"`ftplan {name}` needs {missing}, which is not installed: pip install 'ftplan[train,report]'"
                )

            return unavailable

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main, with errors reported by `planner.cli.errors`: the valid names added to 'no such
        option/command', and with `--json` a JSON object on stdout instead of text (same exit code)."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        import json
        import sys

        from .errors import complete, payload, wants_json

        args = sys.argv[1:] if args is None else list(args)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            complete(e)
            if wants_json(args):
                sys.stdout.write(json.dumps(payload(e), indent=2) + "\n")
                sys.stdout.flush()
            else:
                e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, _, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="ftplan", prog_name="ftplan")
def cli():
    """Plan LLM fine-tuning before you rent GPUs: peak memory, speed and cost of every method.

    \b
    ftplan recommend --model 70b --gpu a100-80
    ftplan estimate --model llama-2-7b --method qlora --target-modules all-linear --seq-len 2048 --batch-size 4 --grad-ckpt --gpu a100-80
    ftplan gpus list        ftplan models show 8b
    ftplan calibrate ...    ftplan validate        ftplan run plan.toml --data train.jsonl
    """


def main():  # pragma: no cover - console script entry point
    cli()
