"""`ftplan run` (execute a plan on your data) and `ftplan merge` (fold adapters into the base model, or combine them).

Thin click layer: torch, transformers and peft are imported inside the command functions (through `trainer.*`),
never when the CLI lists its commands. User errors exit 2 naming the option; a run that fails (out of memory on every
fallback plan) exits 1; a run stopped by SIGINT/SIGTERM exits 128 + the signal after writing a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from ..config import TrainConfig, parse_target_modules
from ..planfile import read_plan, write_plan
from .checks import check_model, os_error, writable_dir
from .configopt import config_lines, config_option, load_config_or_fail, plan_from_config
from .options import OPTION_OF, RECIPE_OPTIONS, TRAIN_KEYS, build_train_config, emit_json, json_option, train_options

DATA_FORMATS = ("auto", "alpaca", "chat", "prompt_completion", "text")
DEVICES = ("auto", "cuda", "cpu")
COMBINATIONS = ("linear", "cat", "svd", "ties", "ties_svd", "dare", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
SCHEDULE_OPTIONS = {  # Schedule field -> option
    "learning_rate": "--learning-rate", "epochs": "--epochs", "max_steps": "--max-steps",
    "warmup_ratio": "--warmup-ratio", "lr_scheduler": "--lr-scheduler", "save_steps": "--save-steps",
    "logging_steps": "--logging-steps", "seed": "--seed", "max_grad_norm": "--max-grad-norm",
}
OUR_FILES = ("trainer_log.jsonl", "run_summary.json", "run_record.json", "run_spec.json", "loss.png",
             "accelerate_config.yaml", "ds_config.json")


def _passed(ctx: click.Context, name: str) -> bool:
    src = ctx.get_parameter_source(name)
    return src is not None and src not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _train_config(ctx, pf, kwargs) -> TrainConfig:
    """The plan's [train] with the options the user actually passed on top (a default never overrides the plan)."""
    values = pf.train.to_dict()
    for k in TRAIN_KEYS:
        if k in kwargs and _passed(ctx, k):
            values[k] = kwargs[k]
    for k in RECIPE_OPTIONS:  # a recipe option passed on top of the plan's recipe
        if k in kwargs and _passed(ctx, k):
            values["recipe"] = {**values.get("recipe", {}), RECIPE_OPTIONS[k]: kwargs[k]}
    if _passed(ctx, "method") and not _passed(ctx, "quant"):
        values["quant"] = "none"  # `--method lora` on a QLoRA plan means a 16-bit base; `qlora` sets nf4 again
    if values.get("target_modules") is not None:
        try:
            values["target_modules"] = parse_target_modules(values["target_modules"])
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--target-modules") from None
    return build_train_config(values)


def _trainer(command: str, *modules: str) -> list:
    """trainer.<modules>, or a clear error on the planner-only install (no torch, transformers or peft)."""
    import importlib

    try:
        return [importlib.import_module(f"trainer.{m}") for m in modules]
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("trainer", "planner"):
            raise
        raise click.ClickException(f"`ftplan {command}` needs {e.name}, which is not installed: "
                                   "pip install 'ftplan[train]'") from None


def _valid_fallbacks(tc: TrainConfig, fallbacks: list[dict]) -> list[dict]:
    """The plan's [[fallback]] entries that still make a valid configuration with the options passed on top (a
    checkpointing fallback of a plan run with --method prefix does not), for the plan written into the run."""
    out = []
    for fb in fallbacks:
        try:
            TrainConfig.from_dict({**tc.to_dict(), **fb})
        except (ValueError, TypeError):
            continue
        out.append(fb)
    return out


def _check_model(ctx, model_dir: str, tc: TrainConfig) -> None:
    """The training config against the model's config.json (targets, IA3, positions), before any weight is loaded;
    an error names the option when it was passed, else the plan's [train] field."""
    from ..arch import ArchError
    from ..profiles import ProfileError, resolve_model

    try:
        arch, _ = resolve_model(str(Path(model_dir) / "config.json"))
    except (ProfileError, ArchError, UnicodeDecodeError):
        return  # a family the planner does not model: transformers and peft will say what is wrong

    def hint(field: str) -> str:
        return OPTION_OF.get(field, field) if _passed(ctx, field) else f"PLAN [train] {field}"

    check_model(arch, tc, targets_given=_passed(ctx, "target_modules"), hint=hint)


def _nodes(pf, tc, num_machines, machine_rank, main_process_ip, main_process_port):
    """The machines of this run: the options, else the plan's [launch] table, else one machine."""
    from trainer.launch import Nodes

    launch = pf.launch or {}
    nodes = Nodes(num_machines=num_machines if num_machines is not None else launch.get("num_machines", 1),
                  machine_rank=machine_rank,
                  main_process_ip=main_process_ip or launch.get("main_process_ip"),
                  main_process_port=main_process_port or launch.get("main_process_port"))
    try:
        nodes.check(tc.num_gpus)
    except ValueError as e:
        msg = str(e)
        hint = next((o for o in ("--machine-rank", "--main-process-ip", "--main-process-port", "--num-machines")
                     if msg.startswith(o)), "--num-machines")
        raise click.BadParameter(msg, param_hint=hint) from None
    return nodes


def _print_launch(nodes, out: Path, tc, as_json: bool) -> None:
    from trainer.launch import node_commands

    rows = node_commands(sys.argv[1:], nodes, out, tc.num_gpus)
    if as_json:
        emit_json({"num_machines": nodes.num_machines, "main_process_ip": nodes.main_process_ip,
                   "num_processes": tc.num_gpus, "nodes": rows})
        return
    where = f", main {nodes.main_process_ip}:{nodes.main_process_port or 29500}" if nodes.several else ""
    click.echo(f"{tc.num_gpus} processes on {nodes.num_machines} machine(s){where}; run on each machine:")
    for r in rows:
        click.echo(f"\n# machine {r['machine_rank']}: {r['processes']} process(es)")
        click.echo(" ".join(shlex.quote(a) for a in r["ftplan"]))
        click.echo("#   which starts: " + " ".join(shlex.quote(a) for a in r["accelerate"]))


def _schedule(pf, overrides: dict):
    try:
        return dataclasses.replace(pf.schedule, **overrides)
    except ValueError as e:
        msg = str(e)
        hint = next((opt for f, opt in SCHEDULE_OPTIONS.items() if f"schedule.{f} " in msg), "[schedule]")
        raise click.BadParameter(msg, param_hint=hint) from None


def _existing_run(out: Path) -> bool:
    if not out.is_dir():
        return False
    return (out / "run_summary.json").exists() or any(p.name.startswith("checkpoint-") for p in out.iterdir())


def _clear_run(out: Path) -> None:
    """--overwrite: remove what a previous run wrote (checkpoints, logs, records), nothing else."""
    for p in out.iterdir():
        if p.name.startswith(("checkpoint-", ".tmp-checkpoint-")) or p.name == "records":
            shutil.rmtree(p, ignore_errors=True)
        elif p.name in OUR_FILES:
            p.unlink()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False), required=False)
@config_option
@click.option("--data", "data_path", required=True, metavar="PATH",
              help="Training data: JSON lines (alpaca, chat, prompt/completion, text) or a `datasets` folder.")
@click.option("--eval-data", "eval_path", default=None, metavar="PATH", help="Held-out data: eval loss at the end.")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False),
              help="Where the adapter/model, tokenizer, plan, run record, log, loss curve and checkpoints go.")
@click.option("--format", "data_format", type=click.Choice(DATA_FORMATS), default="auto", show_default=True,
              help="Data format (auto: from the first record's keys).")
@click.option("--train-on-inputs", is_flag=True, help="Loss on every token, not only the responses.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --output-dir.")
@click.option("--overwrite", is_flag=True, help="Start over in an --output-dir that holds a run (deletes its checkpoints).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto: CUDA when available, else CPU.")
@click.option("--no-fallback", is_flag=True, help="On out-of-memory, stop instead of retrying with the next plan.")
@click.option("--no-record", is_flag=True, help="Do not add the run record to calibrate/results (CUDA runs).")
@click.option("--model-path", default=None, metavar="DIR", help="Base model folder (overrides the plan's [model] path).")
@click.option("--tokenizer", "tokenizer_path", default=None, metavar="DIR", help="Tokenizer folder [default: the model's].")
@train_options
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=None, help="Peak learning rate.")
@click.option("--epochs", type=float, default=None, help="Passes over the data.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps (0: from epochs).")
@click.option("--warmup-ratio", type=float, default=None, help="Fraction of steps of linear warm-up.")
@click.option("--lr-scheduler", type=click.Choice(("cosine", "linear", "constant")), default=None, help="Decay after warm-up.")
@click.option("--max-grad-norm", type=float, default=None, help="Gradient clipping norm.")
@click.option("--save-steps", type=int, default=None, help="Checkpoint every N optimizer steps.")
@click.option("--logging-steps", type=int, default=None, help="Log flush interval in optimizer steps.")
@click.option("--seed", type=int, default=None, help="Data order and initialization seed.")
@click.option("--eval-steps", type=int, default=0, show_default=True, help="Also evaluate every N steps (0: at the end only).")
@click.option("--keep-checkpoints", type=int, default=2, show_default=True, help="Checkpoints kept (the latest ones).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--num-machines", type=int, default=None,
              help="Machines the plan's GPUs are spread over (run the same command on each)  [default: the plan's "
                   "[launch] table, else 1]")
@click.option("--machine-rank", type=int, default=0, show_default=True, help="This machine's rank (0: the main one).")
@click.option("--main-process-ip", default=None, metavar="HOST", help="Address of machine rank 0 (several machines).")
@click.option("--main-process-port", type=int, default=None, metavar="PORT",
              help="Rendezvous port on machine rank 0, the same on every node  [default: 29500 with several machines]")
@click.option("--print-launch", is_flag=True, help="Print each machine's command and the launch it starts; run nothing.")
@json_option
@click.pass_context
def run(ctx, plan_path, config_path, data_path, eval_path, output_dir, data_format, train_on_inputs, resume,
        overwrite, device, no_fallback, no_record, model_path, tokenizer_path, eval_steps, keep_checkpoints, no_progress,
        num_machines, machine_rank, main_process_ip, main_process_port, print_launch, as_json, **kwargs):
    """Execute a saved plan on your data with transformers + peft (the recipe `ftplan estimate` predicts).

    \b
    ftplan run plan.toml --data train.jsonl --eval-data eval.jsonl --output-dir runs/my-run
    ftplan run plan.toml --data train.jsonl --output-dir runs/my-run --resume
    ftplan run plan.toml --data train.jsonl --output-dir runs/try --device cpu --max-steps 20 --method lora
    ftplan run --config axolotl.yaml --data train.jsonl --output-dir runs/my-run

    Any [train] field of the plan can be overridden with its option (--method, --rank, --batch-size, ...), and any
    [schedule] field with --learning-rate, --max-steps, --epochs, --save-steps, .... Options you do not pass keep
    the plan's values.
    """
    if (plan_path is None) == (config_path is None):
        if plan_path is None:
            raise click.MissingParameter(ctx=ctx, param=next(p for p in ctx.command.params if p.name == "plan_path"))
        raise click.BadParameter("give a PLAN or --config, not both (valid: one of them)", param_hint="--config")
    if config_path is not None:  # the user's own TRL / Axolotl / LLaMA-Factory file, run as `estimate` predicts it
        mapping = load_config_or_fail(config_path)
        pf = plan_from_config(mapping, {k: v for k, v in kwargs.items() if k in TRAIN_KEYS})
        plan_path = config_path
        if not as_json:
            click.echo("\n".join(config_lines(mapping, {})), err=True)
    else:
        try:
            pf = read_plan(plan_path)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="PLAN") from None
    tc = _train_config(ctx, pf, kwargs)
    packing = tc.recipe.packing  # --packing, the plan's or the config file's recipe: the data are packed
    sched_over = {f: kwargs[f] for f in SCHEDULE_OPTIONS if kwargs.get(f) is not None}
    schedule = _schedule(pf, sched_over)
    for name, value, low in (("--eval-steps", eval_steps, 0), ("--keep-checkpoints", keep_checkpoints, 1)):
        if value < low:
            raise click.BadParameter(f"must be >= {low}, got {value}", param_hint=name)
    if schedule.max_steps < 0:
        raise click.BadParameter(f"must be >= 0, got {schedule.max_steps}", param_hint="--max-steps")
    out = Path(output_dir)
    nodes = _nodes(pf, tc, num_machines, machine_rank, main_process_ip, main_process_port)
    if print_launch:
        _print_launch(nodes, out, tc, as_json)
        return
    writable_dir(out, "--output-dir")
    from trainer import files  # no torch: the lock is taken before anything heavy is imported

    if nodes.machine_rank == 0:  # one run per output folder (the main machine holds it for all of them)
        try:  # held until this command ends (the kernel drops it if the process dies)
            ctx.with_resource(files.OutputLock(out))
        except files.LockedError as e:
            raise click.BadParameter(str(e), param_hint="--output-dir") from None
    if _existing_run(out) and not resume and nodes.machine_rank == 0:
        if not overwrite:
            raise click.UsageError(f"{out} already holds a run (checkpoints or run_summary.json): pass --resume to "
                                   "continue it, or --overwrite to start over")
        _clear_run(out)

    D, loop = _trainer("run", "data", "loop")

    try:
        model_dir = loop.resolve_model_path(pf, model_path or "", plan_dir=Path(plan_path).resolve().parent)
        dev = loop.resolve_device(device)
        loop.check_device(tc, dev)
    except loop.RunUsageError as e:
        raise click.BadParameter(str(e), param_hint=e.param_hint) from None
    _check_model(ctx, model_dir, tc)
    if dev == "cuda" and tc.num_gpus > 1:
        import torch

        here = tc.num_gpus // nodes.num_machines
        if torch.cuda.device_count() < here:
            raise click.BadParameter(f"the plan needs {here} GPUs on this machine"
                                     + (f" ({tc.num_gpus} over {nodes.num_machines} machines)" if nodes.several else "")
                                     + f" and {torch.cuda.device_count()} are visible", param_hint="--num-gpus")

    command = "ftplan " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    eff_plan = out / "plan.toml"
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_plan(dataclasses.replace(pf, train=tc, schedule=schedule, model_path=model_dir, command=command,
                                       fallback=_valid_fallbacks(tc, pf.fallback)), eff_plan)
    except OSError as e:
        raise os_error(e, "--output-dir") from None
    fallbacks = loop.fallback_chain(tc, pf.fallback)
    spec = loop.RunSpec(
        plan=str(eff_plan), data=str(data_path), output_dir=str(out), model_path=model_dir, train=tc.to_dict(),
        fallbacks=[c.to_dict() for c in fallbacks], eval_data=eval_path, tokenizer=tokenizer_path or "",
        data_format=data_format, train_on_inputs=train_on_inputs, packing=packing, device=dev, resume=resume,
        fallback=not no_fallback, record=not no_record, keep_checkpoints=keep_checkpoints, eval_steps=eval_steps,
        quiet=as_json, progress=not no_progress, command=command, nodes=nodes.to_dict() if nodes.several else {},
    )

    # every record is checked (and tokenized) before a model is loaded
    try:
        tokenizer = loop.load_tokenizer(tokenizer_path or model_dir)
    except loop.RunUsageError as e:
        raise click.BadParameter(str(e), param_hint="--tokenizer") from None
    prepared = []
    for path, hint, pack in ((data_path, "--data", packing), (eval_path, "--eval-data", False)):
        if path is None:
            prepared.append(None)
            continue
        try:
            prepared.append(D.load_dataset(path, tokenizer, tc.seq_len, fmt=data_format,
                                           train_on_inputs=train_on_inputs, packing=pack))
        except D.DataError as e:
            raise click.BadParameter("\n" + str(e), param_hint=hint) from None

    try:
        if tc.num_gpus > 1 or nodes.several:
            from trainer.launch import launch_run

            summary = launch_run(spec)
        else:
            summary = loop.run(spec, prepared=(tokenizer, prepared[0], prepared[1]))
    except loop.Interrupted as e:
        if as_json:
            emit_json(e.summary)
        click.echo(f"ftplan run: {e}", err=True)
        ctx.exit(128 + e.signum)
    except loop.OutOfMemory as e:
        err = click.ClickException(str(e))
        summary_path = out / loop.SUMMARY_NAME
        if as_json and summary_path.exists():  # one JSON object on stdout: the error, with the run's summary
            err.extra = {"summary": json.loads(summary_path.read_text())}
        raise err from None
    except loop.RunUsageError as e:
        raise click.BadParameter(str(e), param_hint=e.param_hint) from None
    except loop.RunError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        emit_json(summary)


# the shared train options show the CLI defaults of `ftplan estimate`; here an option not passed keeps the plan's value
for _param in run.params:
    if _param.name in TRAIN_KEYS:
        _param.show_default = False
        _param.help = (_param.help or "").split("  [default")[0] + "  [default: the plan's]"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the merged model.")
@click.option("--combination", type=click.Choice(COMBINATIONS), default=None,
              help="How to combine several LoRA adapters (peft add_weighted_adapter); dare = dare_linear.")
@click.option("--weights", default=None, metavar="W1,W2,...",
              help="One weight per run [default: 1/n for linear/cat/svd, 1 for ties/dare/magnitude_prune].")
@click.option("--density", type=float, default=0.5, show_default=True,
              help="Fraction of each task vector kept by ties/dare/magnitude_prune.")
@click.option("--majority-sign-method", type=click.Choice(("total", "frequency")), default="total", show_default=True,
              help="TIES sign election.")
@click.option("--base", "base_path", default=None, metavar="DIR",
              help="Base model folder [default: the run's plan.toml, else the adapter's base_model_name_or_path].")
@click.option("--dtype", type=click.Choice(("auto", "bf16", "fp16", "fp32")), default="auto", show_default=True,
              help="Dtype of the merged model (auto: the base model's original dtype).")
@click.option("--adapter-only", is_flag=True, help="With several runs: save the combined adapter, not a merged model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random drop.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --output.")
@json_option
def merge(runs, output, combination, weights, density, majority_sign_method, base_path, dtype, adapter_only, seed,
          overwrite, as_json):
    """Fold a run's adapter into its base model (merge_and_unload), or combine several LoRA adapters.

    \b
    ftplan merge runs/my-run --output merged/
    ftplan merge runs/a runs/b --combination ties --weights 0.6,0.4 --output merged/

    A QLoRA adapter is merged into the unquantized base model in its original dtype. Prefix and prompt tuning
    adapters cannot be merged (they add virtual tokens, not weights).
    """
    out = Path(output)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise click.BadParameter(f"{out} exists and is not empty (pass --overwrite)", param_hint="--output")
    writable_dir(out, "--output")
    for r in runs:
        if not Path(r).is_dir():
            raise click.BadParameter(f"no such folder: {r} (valid: an `ftplan run` output folder)", param_hint="RUNS")
    if len(runs) > 1 and combination is None:
        raise click.BadParameter(f"{len(runs)} runs given: choose how to combine them ({', '.join(COMBINATIONS)})",
                                 param_hint="--combination")
    if len(runs) == 1 and combination is not None:
        raise click.BadParameter("combining needs at least two runs", param_hint="--combination")
    wlist = None
    if weights is not None:
        try:
            wlist = [float(w) for w in weights.split(",") if w.strip()]
        except ValueError:
            raise click.BadParameter(f"not a comma list of numbers: {weights!r}", param_hint="--weights") from None
        if len(wlist) != len(runs):
            raise click.BadParameter(f"{len(wlist)} weights for {len(runs)} runs (valid: one weight per run)",
                                     param_hint="--weights")
    if not 0 < density <= 1:
        raise click.BadParameter(f"must be in (0, 1], got {density}", param_hint="--density")

    (M,) = _trainer("merge", "merge")

    try:
        if len(runs) == 1:
            if adapter_only:
                raise click.BadParameter("only with several runs", param_hint="--adapter-only")
            summary = M.merge_adapter(runs[0], out, base=base_path, dtype=dtype)
        else:
            summary = M.combine_adapters(list(runs), out, combination=combination, weights=wlist, density=density,
                                         majority_sign_method=majority_sign_method, base=base_path, dtype=dtype,
                                         adapter_only=adapter_only, seed=seed)
    except M.MergeError as e:
        raise click.BadParameter(str(e), param_hint=e.param_hint) from None
    if as_json:
        emit_json(summary)
        return
    what = "combined adapter" if summary.get("adapter_only") else "merged model"
    click.echo(f"{what}: {summary['output']}  ({summary['description']})")
    if summary.get("dtype"):
        click.echo(f"dtype {summary['dtype']}, {summary['parameters']:,} parameters; base {summary['base']}")
