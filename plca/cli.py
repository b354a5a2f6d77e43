"""Command line: ``plca train | evaluate | demo``.

Errors a user can fix (bad config, missing files, bad weights) are printed as
one clear line and exit with status 2; they never end in a stack trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from plca.config import ConfigError, load_config


def _split_config_and_overrides(positional: list[str]) -> tuple[str | None, list[str]]:
    if positional and "=" not in positional[0]:
        return positional[0], positional[1:]
    return None, positional


def cmd_train(args: argparse.Namespace) -> int:
    from plca.engine.trainer import train

    config_path, overrides = _split_config_and_overrides(args.args)
    if config_path is None:
        if args.resume is None:
            raise ConfigError("plca train needs a CONFIG.yaml (or --resume RUN_DIR)")
        config_path = str(Path(args.resume) / "config.yaml")
    config = load_config(config_path, overrides)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if result.metrics is not None:
        from plca.evaluation.metrics import format_table

        print(format_table({config.method: result.metrics}, config.data.classes))
    print(f"run dir: {result.run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from plca.evaluation.run import evaluate_checkpoint
    from plca.evaluation.metrics import format_table

    config = load_config(args.config, args.overrides)
    metrics = evaluate_checkpoint(config, args.checkpoint, test_time_aggregation=args.tta,
                                  progress=not args.no_progress)
    print(format_table({Path(args.checkpoint).name: metrics}, config.data.classes))
    output = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".metrics.json")
    output.write_text(json.dumps(metrics, indent=2))
    print(f"metrics written to {output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from plca.demo import run_demo

    run_demo(output_dir=Path(args.output_dir), data_root=Path(args.data_root), seeds=args.seeds,
             iters=args.iters, with_oracle=not args.no_oracle, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plca", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (source_only or plca)")
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml [key=value ...]",
                   help="config file then dotted overrides, e.g. train.iters=200 data.classes=[sky,road]")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a checkpoint on the config's validation set")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--checkpoint", required=True,
                   help="a plca checkpoint (.pt), an exported .safetensors, or the PLCA authors' released .pth")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time aggregation (default: eval.test_time_aggregation)")
    p.add_argument("--output", help="where to write the metrics JSON (default: next to the checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="generate the embedded two-domain data, train source-only and PLCA on CPU, "
                                    "compare them on the target")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--data-root", default="data/synthetic")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--iters", type=int, default=None, help="updates per model (default: the demo's budget)")
    p.add_argument("--no-oracle", action="store_true", help="skip the model trained on target labels")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from plca.data.io import DatasetError
    from plca.engine.checkpoint import CheckpointError
    from plca.engine.trainer import TrainingError, TrainingInterrupted
    from plca.models.weights import WeightsError

    try:
        return args.func(args)
    except (ConfigError, DatasetError, WeightsError, CheckpointError, TrainingError) as error:
        print(f"plca {args.command}: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as error:
        print(f"plca {args.command}: {error}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
