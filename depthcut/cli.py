"""Command line: `depthcut <method>|compare|report|entropy|fold|heal|import-model ...`.
Parses arguments, calls the API (`depthcut.experiment`, `depthcut.workflows`,
`depthcut.reports`) and prints.

One command per registered method (`depthcut.methods.methods()`), its options generated from
the settings declared beside the config dataclasses (`depthcut.settings`). Settings are
layered: a preset (`--preset quick`, the default, finishes in minutes on 2 CPU cores; `--preset
paper` is the papers' recipe), then a JSON `--config` file, then explicit flags.

Errors the user's input causes (`depthcut.errors.DepthcutError`) are printed as one paragraph
with exit code 2; any other exception is a bug: a short message, the traceback in a file, exit
code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from depthcut import distributed, experiment, reports, settings, workflows
from depthcut.cost import DEFAULT_TIMER, TIMERS
from depthcut.data import dataset_names
from depthcut.errors import ConfigError, DepthcutError
from depthcut.experiment import DATA_MODEL_OPTIONS, DENSE_TRAINING_OPTIONS
from depthcut.fold import POLICIES
from depthcut.methods import MethodSpec, comparable, compare_defaults, methods
from depthcut.options import add_options
from depthcut.run import RunDirError
from depthcut.scorers.choice import CHOICE_OPTIONS
from depthcut.train import TRAIN_OPTIONS

# Bad input: depthcut's own errors, plus the operating system's (e.g. no space left on device
# while writing a checkpoint) and a loss that became NaN or infinite. Anything else is a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (DepthcutError, OSError, FloatingPointError)


# The entropy, fold and heal options default to their depthcut.workflows function's defaults.
WORKFLOW_DEFAULTS: dict[str, dict[str, Any]] = {
    function.__name__: {name: parameter.default
                        for name, parameter in inspect.signature(function).parameters.items()
                        if parameter.default is not inspect.Parameter.empty}
    for function in (workflows.entropy_report, workflows.fold_checkpoint, workflows.heal,
                     workflows.import_model)
}


def _experiment_options(parser: argparse.ArgumentParser) -> set[str]:
    """Options every method shares (data, model, dense training); defaults come from presets.
    Returns their keys: a method's setting of the same key (one key sets every config that
    declares it) is not added twice."""
    group = parser.add_argument_group("data and model")
    group.add_argument("--preset", choices=sorted(settings.presets()), default="quick",
                       help="base settings: quick (minutes on CPU), paper (EASIER Table 4, "
                       "CIFAR-10), transfer-adam (its Flowers-102/DTD/Aircraft row), "
                       "transfer-sgd (its PACS/VLCS row)")
    group.add_argument("--config", type=Path, help="JSON file of settings (keys = option names)")
    add_options(group, DATA_MODEL_OPTIONS)
    add_options(parser.add_argument_group("training"), (*DENSE_TRAINING_OPTIONS, *TRAIN_OPTIONS))
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, help="run directory (required unless --resume)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    out.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue an interrupted run with its own settings (other options "
                     "are ignored) from its last finished epoch")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    out.add_argument("--print-config", action="store_true",
                     help="print the resolved settings (preset, then --config, then flags) as "
                     "JSON and exit, without loading data or training; --out not needed")
    return {option.key for option in (*DATA_MODEL_OPTIONS, *DENSE_TRAINING_OPTIONS,
                                      *TRAIN_OPTIONS)}


def _method_parser(commands: argparse._SubParsersAction, spec: MethodSpec) -> None:
    parser = commands.add_parser(spec.command, help=spec.help)
    parser.set_defaults(handler=cmd_method, spec=spec)
    seen = _experiment_options(parser)
    group = parser.add_argument_group(spec.title or spec.label)
    add_options(group, (*spec.options, *spec.training_options), seen=seen)


def _compare_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare", help="train dense once, run several methods from it, write the report")
    parser.set_defaults(handler=cmd_compare)
    seen = _experiment_options(parser)
    names = list(comparable())
    variants = [name for name in names if name not in compare_defaults()]
    parser.add_argument("--methods", nargs="+", default=argparse.SUPPRESS,
                        help=f"from: {' '.join(names)} (default: all but "
                        f"{' and '.join(variants)})")
    parser.add_argument("--no-fair-reference", action="store_true",
                        help="skip training the dense model as long as each method")
    shared = []
    for spec in methods():
        if not spec.comparable:
            continue
        options = [o for o in spec.compare_options or spec.options if o.key not in seen]
        if options:
            add_options(parser.add_argument_group(
                spec.compare_title or spec.title or spec.label), options, seen)
        shared += spec.training_options
    add_options(parser.add_argument_group("finetuning (every method)"), shared, seen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="depthcut", description="Make trained neural networks shallower."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for spec in methods():
        if spec.help:
            _method_parser(commands, spec)
    _compare_parser(commands)

    report = commands.add_parser("report", help="rebuild the comparison report from run dirs")
    report.add_argument("runs", nargs="+", type=Path, help="run directories")
    report.add_argument("--out", type=Path, required=True, help="report directory")
    report.add_argument("--no-measure", action="store_true",
                        help="do not fold and time EASIER stages (tables show -)")
    report.add_argument("--no-progress", action="store_true")
    _latency_backend_option(report, "the backend Table 3's latencies (batch 1 and 128) are "
                            "measured on")

    entropy = commands.add_parser("entropy", help="print the per-site entropy of a checkpoint")
    entropy.add_argument("--checkpoint", type=Path, required=True,
                         help="a stage checkpoint (checkpoints/stage_NN.pt of a run, or one "
                         "made by import-model)")
    entropy.add_argument("--dataset", choices=dataset_names(),
                         help="default: the checkpoint's dataset")
    entropy.add_argument("--data-root", help="default: the checkpoint's data root")
    entropy.add_argument("--cache-dir")
    entropy.add_argument("--split", choices=("train", "test"),
                         default=WORKFLOW_DEFAULTS["entropy_report"]["split"],
                         help="which split to count on (no augmentation)")
    entropy.add_argument("--samples", type=int, help="count on only the first N images")
    entropy.add_argument("--batch-size", type=int,
                         default=WORKFLOW_DEFAULTS["entropy_report"]["batch_size"])
    entropy.add_argument("--device",
                         default=WORKFLOW_DEFAULTS["entropy_report"]["device"])
    entropy.add_argument("--no-progress", action="store_true")

    fold = commands.add_parser("fold", help="merge linear ops of a checkpoint; print the report")
    fold.add_argument("--checkpoint", type=Path, required=True, help="a stage checkpoint")
    fold.add_argument("--out", type=Path, required=True, help="where to save the folded model")
    fold.add_argument("--policy", choices=POLICIES,
                      default=WORKFLOW_DEFAULTS["fold_checkpoint"]["policy"],
                      help="macs: merge only where MACs do not rise (default); shallow: every "
                      "exact merge (fewest ops); all: every merge; latency: merge where "
                      "measured faster on --latency-backend (on --device)")
    _latency_backend_option(fold, "with --policy latency: the backend merges are timed on")
    fold.add_argument("--export", choices=("onnx",), help="also write OUT with .onnx suffix")
    _data_options(fold, "fold_checkpoint",
                  split_help="test images used for agreement and top-1 (default: all)")

    heal = commands.add_parser("heal", help="finetune a folded model briefly (border merges)")
    heal.add_argument("--folded", type=Path, required=True, help="a model from `depthcut fold`")
    heal.add_argument("--out", type=Path, required=True, help="where to save the healed model")
    heal.add_argument("--epochs", type=int, default=WORKFLOW_DEFAULTS["heal"]["epochs"])
    heal.add_argument("--lr", type=float, default=WORKFLOW_DEFAULTS["heal"]["lr"],
                      help="small: a folded model has no BatchNorm left to steady training")
    heal.add_argument("--weight-decay", type=float,
                      default=WORKFLOW_DEFAULTS["heal"]["weight_decay"])
    heal.add_argument("--train-subset", type=int, help="finetune on only this many images")
    heal.add_argument("--seed", type=int, default=WORKFLOW_DEFAULTS["heal"]["seed"])
    _data_options(heal, "heal", split_help="evaluate on only the first N test images")
    _import_parser(commands)
    _plan_parser(commands)
    return parser


def _latency_backend_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--latency-backend", choices=tuple(TIMERS), default=DEFAULT_TIMER,
                        help=f"{what}: eager (PyTorch as it is, default), onnxruntime (ONNX "
                        "Runtime CPU; pip install 'depthcut[onnx]'), compile (torch.compile, "
                        "inductor), cuda (CUDA events)")


# What `depthcut plan` takes.
PLAN_SETTINGS = ("latency_budget", "latency_backend", "latency_batch", "dp_span", "latency_table",
                 "dp_importance", "dp_verify", "dp_merge", "choice_seed")


def _plan_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("plan", help="--choose dp without training: the sites a "
                                 "latency budget removes, predicted and measured latency")
    parser.add_argument("--dense-checkpoint", type=Path, required=True,
                        help="a stage checkpoint (its model is the dense reference)")
    # The choice settings --choose dp reads, declared once (scorers.choice.CHOICE_OPTIONS).
    add_options(parser, [dataclasses.replace(option, argparse={**option.argparse,
                                                               "required": True})
                         if option.key == "latency_budget" else option
                         for option in CHOICE_OPTIONS if option.key in PLAN_SETTINGS])
    parser.add_argument("--no-measure", action="store_true",
                        help="do not time the whole folded models (the estimate only)")
    parser.add_argument("--dataset", choices=dataset_names(),
                        help="default: the checkpoint's dataset")
    parser.add_argument("--data-root", help="default: the checkpoint's data root")
    parser.add_argument("--cache-dir")
    parser.add_argument("--samples", type=int, default=1024,
                        help="training images the entropies are counted on (default 1024)")
    parser.add_argument("--no-progress", action="store_true")


def _import_parser(commands: argparse._SubParsersAction) -> None:
    defaults = WORKFLOW_DEFAULTS["import_model"]
    parser = commands.add_parser("import-model", help="save your model and weights file as a "
                                 "depthcut checkpoint (for entropy, fold, --dense-checkpoint)")
    parser.add_argument("--model", required=True,
                        help="path/to/file.py:FACTORY, package.module:FACTORY, torchvision:NAME, "
                        "timm:NAME or a depthcut model")
    parser.add_argument("--weights", type=Path, required=True,
                        help="a state_dict file (torch.save), a checkpoint dict holding one, "
                        "or .safetensors")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint to write")
    parser.add_argument("--dataset", choices=dataset_names(), required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--cache-dir")
    parser.add_argument("--reset-head", action="store_true",
                        help="a classifier that does not fit the dataset's classes starts afresh")
    parser.add_argument("--width", type=float, default=defaults["width"],
                        help="depthcut's own architectures only: the run's --width")
    parser.add_argument("--activation", help="depthcut's own architectures only")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--device", default=defaults["device"])
    parser.add_argument("--no-progress", action="store_true")


def _data_options(parser: argparse.ArgumentParser, workflow: str, split_help: str) -> None:
    parser.add_argument("--dataset", choices=dataset_names(), help="default: the model's dataset")
    parser.add_argument("--data-root", help="default: the model's data root")
    parser.add_argument("--cache-dir")
    parser.add_argument("--samples", type=int, help=split_help)
    parser.add_argument("--batch-size", type=int,
                        default=WORKFLOW_DEFAULTS[workflow]["batch_size"])
    parser.add_argument("--device", default=WORKFLOW_DEFAULTS[workflow]["device"],
                        help="cpu (default), cuda, auto, ...")
    parser.add_argument("--no-progress", action="store_true")


def resolve_settings(args: argparse.Namespace) -> dict:
    """Preset (with its dataset's overlay), then config file, then explicit flags."""
    loaded: dict = {}
    if args.config is not None:
        try:
            loaded = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"cannot read config file {args.config}: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {args.config} must hold a JSON object")
    if args.out is None and not getattr(args, "print_config", False):
        raise ConfigError("--out RUN_DIR is required (or --resume RUN_DIR to continue a run)")
    skip = {"command", "preset", "config", "out", "overwrite", "no_progress", "handler", "spec",
            "no_fair_reference", "resume", "print_config"}
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    return settings.resolve(args.preset, loaded, flags, source=args.config)


def _configs(args: argparse.Namespace, values: dict) -> list:
    """The config dataclasses the command builds (compare: every comparable method's)."""
    specs = [args.spec] if args.command != "compare" else [
        spec for spec in methods() if spec.comparable or spec.reference]
    return [settings.build_config(spec.config, values) for spec in specs]


# What a `--resume` call's namespace holds besides the settings it ignores.
RESUME_KEYS = {"command", "preset", "config", "out", "overwrite", "no_progress", "handler", "spec",
               "resume", "print_config", "no_fair_reference"}


def cmd_print_config(args: argparse.Namespace) -> int:
    """Print the resolved settings as JSON (a valid --config file) and exit; no data, no run.

    The method configs are built too, so a bad value is reported here as it would be by a run.
    With --resume, print the run's own saved config.json instead.
    """
    if getattr(args, "resume", None) is not None:
        path = args.resume / "config.json"
        if not path.is_file():
            raise RunDirError(f"{args.resume} holds no config.json: not a depthcut run")
        print(path.read_text().rstrip())
        return 0
    values = resolve_settings(args)
    settings.experiment_config(values, progress=False)
    _configs(args, values)
    print(json.dumps(values, indent=2, sort_keys=True, default=str))
    return 0


def cmd_method(args: argparse.Namespace) -> int:
    spec: MethodSpec = args.spec
    values = resolve_settings(args)
    result = experiment.run_method(
        settings.experiment_config(values, not args.no_progress), spec,
        settings.build_config(spec.config, values), args.out, overwrite=args.overwrite)
    print()
    print(reports.stage_table(result.records))
    if spec.describe is not None:
        print(spec.describe(result))
    print(f"Records, checkpoints and summary.md in {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    values = resolve_settings(args)
    specs = [spec for spec in methods() if spec.comparable or spec.reference]
    report = experiment.run_comparison(
        settings.experiment_config(values, not args.no_progress), values["methods"], args.out,
        method_configs={spec.name: settings.build_config(spec.config, values) for spec in specs},
        fair_reference=not args.no_fair_reference, overwrite=args.overwrite,
    )
    print(report.read_text())
    print(f"Report, tables and plots in {report.parent}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    report = reports.build_report(args.runs, args.out, measure=not args.no_measure,
                                  progress=not args.no_progress,
                                  latency_backend=args.latency_backend)
    print(report.read_text())
    print(f"Report, tables and plots in {report.parent}")
    return 0


def cmd_entropy(args: argparse.Namespace) -> int:
    report = workflows.entropy_report(
        args.checkpoint, dataset=args.dataset, data_root=args.data_root,
        cache_dir=args.cache_dir, split=args.split, samples=args.samples,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
    print(report.text())
    return 0


def cmd_fold(args: argparse.Namespace) -> int:
    result = workflows.fold_checkpoint(
        args.checkpoint, args.out, policy=args.policy, export=args.export,
        dataset=args.dataset, data_root=args.data_root, cache_dir=args.cache_dir,
        samples=args.samples, batch_size=args.batch_size, device=args.device,
        progress=not args.no_progress, latency_backend=args.latency_backend)
    print(result.text())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    choice = {key: getattr(args, key) for key in PLAN_SETTINGS if hasattr(args, key)}
    result = workflows.plan_checkpoint(
        args.dense_checkpoint, **choice, dataset=args.dataset,
        data_root=args.data_root, cache_dir=args.cache_dir, samples=args.samples,
        measure=not args.no_measure, progress=not args.no_progress)
    print(result.text())
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    result = workflows.heal(
        args.folded, args.out, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
        train_subset=args.train_subset, seed=args.seed, dataset=args.dataset,
        data_root=args.data_root, cache_dir=args.cache_dir, samples=args.samples,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
    print(result.text())
    return 0


def cmd_import_model(args: argparse.Namespace) -> int:
    result = workflows.import_model(
        args.model, args.weights, args.out, dataset=args.dataset, data_root=args.data_root,
        cache_dir=args.cache_dir, width=args.width, activation=args.activation,
        reset_head=args.reset_head, batch_size=args.batch_size, device=args.device,
        progress=not args.no_progress)
    print(result.text())
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    ignored = sorted(f"--{key.replace('_', '-')}" for key in vars(args)
                     if key not in RESUME_KEYS and key != "data_root")
    if ignored:
        print(f"depthcut {args.command}: note: --resume continues with the run's own settings "
              f"(its config.json); ignoring {', '.join(ignored)}", file=sys.stderr)
    result = experiment.resume_run(args.resume, progress=not args.no_progress,
                                   method=None if args.command == "compare" else args.command,
                                   data_root=getattr(args, "data_root", None))
    print()
    print(reports.stage_table(result.records))
    answer = result.answer
    print(f"\nResumed and finished: answer stage {answer['stage']}, test top-1 "
          f"{answer['test_top1']:.2f}. Stopped: {result.stop_reason}. Run in {args.resume}")
    return 0

def _write_traceback(error: BaseException) -> str:
    """Save `error`'s traceback to a file in the temporary folder ($TMPDIR); its path, or
    "stderr" when no file can be written (the traceback is printed there instead)."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        with tempfile.NamedTemporaryFile("w", prefix="depthcut-traceback-", suffix=".txt",
                                         delete=False) as file:
            file.write(text)
        return file.name
    except OSError:
        print(text, file=sys.stderr, end="")
        return "stderr"


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """depthcut's own warnings as one line each ("depthcut easier: warning: ..."), not with
    the file, line and source line Python prints by default; other warnings unchanged."""
    default = warnings.formatwarning

    def formatter(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
        if "depthcut" in Path(filename).parts:
            return f"depthcut {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatter
    try:
        yield
    finally:
        warnings.formatwarning = default


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The command parsers by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command's own parser, so its usage is the one printed
        command = _subparsers(parser).get(getattr(args, "command", None), parser)
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    handler = getattr(args, "handler", None) or {
        "entropy": cmd_entropy, "fold": cmd_fold, "heal": cmd_heal, "report": cmd_report,
        "import-model": cmd_import_model, "plan": cmd_plan,
    }[args.command]
    if getattr(args, "resume", None) is not None:
        handler = cmd_resume
    if getattr(args, "print_config", False):
        handler = cmd_print_config
    try:
        if distributed.init_from_env() and not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 alone reports
        with _one_line_warnings(args.command):
            return handler(args)
    except USER_ERRORS as error:
        print(f"depthcut {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthcut: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a bug in depthcut, not the user's input
        path = _write_traceback(error)
        print(f"depthcut {args.command}: internal error: {type(error).__name__}: {error} "
              f"(traceback written to {path}); please report it", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
