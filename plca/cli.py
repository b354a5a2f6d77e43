"""Command line: ``plca train | evaluate | demo | predict | prepare | report | sweep | export | weights | config``.

Errors a user can fix (bad config, missing files, bad weights) are printed as
one clear line and exit with status 2; they never end in a stack trace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plca.config import ConfigError, load_config
from plca.data.build import RUN_CHECK_LEVELS
from plca.demo import DEMO_METHODS
from plca.models.trained import RUN_MODELS
from plca.tools.sweep import LAUNCHERS


def _split_config_and_overrides(positional: list[str]) -> tuple[str | None, list[str]]:
    if positional and "=" not in positional[0]:
        return positional[0], positional[1:]
    return None, positional


def _resume_config(resume: str, overrides: list[str]):
    """The config of the run being resumed: the checkpoint's own (else RUN_DIR/config.yaml), plus overrides."""
    from plca.config import build_config
    from plca.engine.checkpoint import load_checkpoint

    path = Path(resume)
    checkpoint = path if path.is_file() else path / "checkpoints" / "last.pt"
    if checkpoint.is_file():
        stored = load_checkpoint(checkpoint).get("config")
        if isinstance(stored, dict):
            try:
                return build_config(stored, overrides)
            except ConfigError as error:
                raise ConfigError(f"the config stored in '{checkpoint}': {error}") from None
    run_dir = checkpoint.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume '{resume}': no checkpoint with a config and no config.yaml there")
    return load_config(run_dir / "config.yaml", overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from plca.engine.trainer import train

    config_path, overrides = _split_config_and_overrides(args.args)
    if config_path is None:
        if args.resume is None:
            raise ConfigError("plca train needs a CONFIG.yaml (or --resume RUN_DIR)")
        config = _resume_config(args.resume, overrides)
    else:
        config = load_config(config_path, overrides)
    result = train(config, resume=args.resume, progress=not args.no_progress, data_check=args.data_check,
                   argv=sys.argv)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0  # the table and the paths are printed once, by the first process
    if result.metrics is not None:
        from plca.evaluation.metrics import format_table

        print(format_table({config.method: result.metrics}, config.data.classes))
    print(f"run dir: {result.run_dir}")
    if result.metrics is not None:
        print(f"  metrics.json (final model) | checkpoints/final.pt | evaluate it: "
              f"plca evaluate --checkpoint {result.run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from plca.evaluation.metrics import format_table
    from plca.tools.evaluate import default_metrics_path, describe_scored, evaluate_checkpoint

    from plca.tools.gallery import default_gallery_dir

    config_path, overrides = _split_config_and_overrides(args.args)
    if args.gallery_dir and not args.gallery:
        raise ConfigError("--gallery-dir needs --gallery N (how many images with the lowest and highest score)")
    if args.output and Path(args.output).is_dir():  # found now, not after the evaluation
        raise ConfigError(f"--output '{args.output}' is a folder; give the metrics file's name, e.g. "
                          f"{Path(args.output) / 'metrics.json'}")
    gallery_dir = args.gallery_dir or (default_gallery_dir(args.output) if args.output else None)
    metrics, classes = evaluate_checkpoint(args.checkpoint, config_path, overrides,
                                           test_time_aggregation=args.aggregate, progress=not args.no_progress,
                                           gallery=args.gallery, gallery_dir=gallery_dir,
                                           allow_unfinished=args.allow_unfinished)
    print(f"model: {metrics['model']}")
    print("\n".join(describe_scored(metrics)))
    print(format_table({Path(args.checkpoint).name: metrics}, classes))
    output = Path(args.output) if args.output else default_metrics_path(metrics)
    from plca.files import atomic_write_json

    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output, metrics)
    print(f"metrics written to {output}")
    if "gallery" in metrics:
        print(f"gallery (lowest and highest per-image mIoU) written to {metrics['gallery']['dir']} (index.md)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from plca.demo import run_demo

    run_demo(output_dir=Path(args.output_dir), data_root=Path(args.data_root), seeds=args.seeds,
             iters=args.iters, with_oracle=args.oracle, progress=not args.no_progress, methods=args.methods,
             start="scratch" if args.from_scratch else "pretrained", tuning=args.tuning, overrides=args.set)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from plca.engine.distributed import DeviceError, resolve_device
    from plca.tools.predict import (dataset_inputs, list_inputs, load_model_for_inference, options_from_config,
                                    run_predict)

    config_path, overrides = _split_config_and_overrides(args.args)
    if (args.input is None) == (args.split is None):
        raise ConfigError("plca predict needs exactly one of --input IMAGE_OR_FOLDER or --split SPLIT")
    if args.submission and args.split is None:
        raise ConfigError("--submission needs --split SPLIT (the dataset's test images, whose names the server "
                          "matches), not --input")
    model, config = load_model_for_inference(args.checkpoint, config_path, overrides,
                                             allow_unfinished=args.allow_unfinished)
    window = args.window or (tuple(config.train.crop_size) if args.sliding_window else None)
    options = options_from_config(
        config, size=tuple(args.size) if args.size else None, scales=tuple(args.scales), flip=args.flip,
        window=tuple(window) if window else None, stride=tuple(args.stride) if args.stride else None,
        test_time_aggregation=args.aggregate, batch_size=args.batch_size,
    )
    if args.original_size:
        options = replace(options, size=None)
    inputs = list_inputs(args.input, exclude=Path(args.output)) if args.input else dataset_inputs(config, args.split)
    submission = None
    if args.submission:
        from plca.tools.submission import SubmissionWriter, submission_layout

        layout = submission_layout(config.data.val.format)
        submission = SubmissionWriter(args.output, layout, config.data.classes)
    try:
        device = resolve_device(args.device or config.device)
    except DeviceError as error:
        raise ConfigError(str(error)) from None
    print(f"predicting {len(inputs)} image(s) on {device}: size {list(options.size) if options.size else 'original'}, "
          f"scales {list(options.scales)}, flip {'on' if options.flip else 'off'}, "
          f"{'sliding window ' + str(list(options.window)) if options.window else 'whole image'}, "
          f"test-time aggregation {'on' if options.test_time_aggregation else 'off'}"
          + (f" (exact up to {options.aggregation_max_pixels:,} feature pixels, per window above: "
             f"eval.aggregation_max_pixels)" if options.test_time_aggregation and options.aggregation_max_pixels
             else ""), flush=True)
    summary = run_predict(model, config, inputs, args.output, options, device, num_workers=args.num_workers,
                          progress=not args.no_progress, submission=submission)
    if submission is None:
        print(f"wrote {len(summary.written)} prediction(s) to {summary.output}/labels, /color and /overlay")
    else:
        ids = "train ids" if submission.layout.ids == "train" else "label ids"
        print(f"wrote {len(summary.written)} prediction(s) ({ids}) to {submission.folder} and "
              f"{summary.output / 'submission.zip'}: {submission.layout.how}")
    if summary.failed:
        print(f"plca predict: {len(summary.failed)} image(s) could not be read and were skipped:", file=sys.stderr)
        for _, why in summary.failed:
            print(f"  {why}", file=sys.stderr)
        return 1
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from plca.tools.prepare import check_dataset, format_findings

    report = check_dataset(args.format, args.root, classes=args.classes, split=args.split,
                           write_cache=args.write_cache, stats_path=args.stats, workers=args.workers,
                           progress=not args.no_progress, unlabelled=args.unlabelled, crop_size=args.crop_size,
                           shorter_side=args.shorter_side, scale_range=args.scale_range,
                           rcs_stats_path=args.rcs_stats)
    print(format_findings(report))
    return 2 if report.errors else 0


def cmd_report(args: argparse.Namespace) -> int:
    from plca.tools.report import ReportError, write_report
    from plca.tools.sweep_table import SweepError

    try:
        path = write_report(args.run_dirs, args.output, names=args.names, flag_range=args.flag_range,
                            gallery=args.gallery, progress=not args.no_progress)
    except (ReportError, SweepError) as error:
        print(f"plca report: error: {error}", file=sys.stderr)
        return 2
    print(f"report written to {path} and {path.with_name('report.html')}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from plca.tools.sweep import SlurmOptions, SweepError, parse_slurm_args, run_sweep

    config_path, overrides = _split_config_and_overrides(args.args)
    # key=value words right after --seeds are overrides, not seeds
    seeds = [value for value in args.seeds if "=" not in value]
    overrides += [value for value in args.seeds if "=" in value]
    try:
        if config_path is None:
            raise SweepError("plca sweep needs a CONFIG.yaml first")
        slurm = SlurmOptions(partition=args.partition, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                             time_min=args.time, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
                             folder=args.slurm_folder, additional=parse_slurm_args(args.slurm_arg or []))
        outcome = run_sweep(config_path, seeds, args.grid or [], overrides, launcher=args.launcher,
                            nproc_per_node=args.nproc_per_node, slurm=slurm, flag_range=args.flag_range,
                            wait=not args.no_wait, dry_run=args.dry_run, progress_every_s=args.progress_every)
    except SweepError as error:
        print(f"plca sweep: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plca sweep: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    return outcome.exit_code


def cmd_export(args: argparse.Namespace) -> int:
    from plca.tools.export import export_model
    from plca.tools.model_folder import export_folder

    config = load_config(args.config, args.overrides) if args.config else None
    writers = {"file": export_model, "folder": export_folder}
    path = writers[args.format](args.source, args.output, config=config, which=args.which,
                                allow_unfinished=args.allow_unfinished)
    print(f"exported to {path} (use it with plca predict --checkpoint {path}, plca evaluate or plca.load_model)")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from plca.tools.weights import convert_weights, inspect_weights

    if args.action == "inspect":
        report = inspect_weights(args.file)
        print("\n".join(report.lines()))
        return 0 if report.usable else 1
    report, output = convert_weights(args.file, args.output)
    identity = report.identity
    style = f" model.style={identity.style}" if identity.style else ""
    print(f"{report.path}: {identity.architecture} ({report.layout.name} layout)")
    print(f"wrote {output} in this project's layout (use it as model.backbone={identity.backbone}{style} "
          f"model.pretrained={output})")
    return 0


def _allow_unfinished_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="accept a model of a run that did not reach its end (e.g. last.pt at step 2 of 6); "
                             "without it such a model is refused, naming the step it reached")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and adds each option's default where its help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default in (None, False, [], argparse.SUPPRESS) or "default" in text
                or not action.option_strings):
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {default})"


#: subcommand -> (one-line summary, a paragraph, examples)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": (
        "train a model with any method (source_only, plca, self_training)",
        "Trains the method, model and data a config describes, in a new run directory under output_dir "
        "(config.yaml, train.log, TensorBoard events, checkpoints, metrics.json). Every config key can be "
        "overridden as key.path=value; `plca config --show CONFIG` prints every key with its meaning. A killed "
        "or stopped run continues exactly with --resume. Under torchrun each process trains on its share of "
        "the data (DDP).",
        "  plca train configs/gta2cityscapes_plca.yaml model.pretrained=weights/resnet101_caffe.pth\n"
        "  plca train configs/folder_plca.yaml data.source.root=/data/src data.target.root=/data/tgt train.iters=200\n"
        "  plca train --resume runs/<run_name>\n"
        "  torchrun --nproc_per_node 2 -m plca.cli train configs/gta2cityscapes_plca.yaml"),
    "evaluate": (
        "score a trained model on a validation set",
        "Computes the confusion matrix of a model on a labelled validation set and prints each protocol "
        "(mIoU19 / 16 / 13) with its per-class IoU. The model comes from the file (a run directory means its "
        "final model; an unfinished run is refused unless --allow-unfinished); a config is optional and supplies "
        "the data: if it asks for another network or class "
        "list than the file holds, that is an error naming both.",
        "  plca evaluate --checkpoint runs/<run_name>\n"
        "  plca evaluate --checkpoint model.safetensors data.val.format=folder data.val.root=/data/tgt "
        "data.val.split=val\n"
        "  plca evaluate configs/gta2cityscapes_plca.yaml --checkpoint gta2city_plca.pth   # the authors' release\n"
        "  plca evaluate --checkpoint runs/<run_name> --gallery 8   # the 8 worst and 8 best images, as panels"),
    "demo": (
        "train and compare methods on the embedded two-domain data, on a CPU, in minutes",
        "Generates procedural street scenes in two appearances (a synthetic source, a real-like target), "
        "trains EfficientNet-Lite0 from its ImageNet weights with DAFormer's head (or, with --from-scratch, a "
        "ResNet-18 DeepLab-v2 from random weights) with each method and prints their per-class IoU on the "
        "target's validation split, one column per method (mean over the seeds). --tuning uses scenes of "
        "another generator seed: choose settings there, never on the reported scenes.",
        "  plca demo\n"
        "  plca demo --methods source_only plca self_training self_training_plca --seeds 0 1 2\n"
        "  plca demo --tuning --methods plca --set plca.association.feature_weight=0.3"),
    "predict": (
        "segment images with a trained model; write label, colour and overlay images",
        "Segments an image, a folder of images or a configured split, whole-image or with a sliding window, "
        "optionally averaging a flipped copy and several scales, and writes labels/ (class indices), color/, "
        "overlay/ and legend.png under --output.",
        "  plca predict --checkpoint runs/<run_name> --input photos/ --output predictions/\n"
        "  plca predict --checkpoint model.safetensors --input a.jpg --output out/ --sliding-window --flip "
        "--scales 0.75 1 1.25"),
    "prepare": (
        "check a dataset folder before training (every file); class statistics",
        "Reads a dataset through the same readers as training and names every bad file: missing pairs, size "
        "mismatches, truncated or oddly-encoded images, unknown label ids, 8-bit SYNTHIA labels, a folder of "
        "another format. Reports the image sizes it found and warns when a configured resize or crop is far "
        "from them. Exits non-zero when the dataset is unusable.",
        "  plca prepare gta5 /data/gta5 --stats gta5_stats.json\n"
        "  plca prepare folder /data/mine --classes road car sky --split train --unlabelled"),
    "report": (
        "plots and Markdown tables of runs, or of sweeps (mean +- sd over seeds)",
        "Training curves, per-class IoU bars and a Markdown comparison of runs, with the config and "
        "environment keys in which they differ; for sweep directories, the mean +- sd tables over seeds. "
        "The same report is written as report.md and as one HTML page, report.html.",
        "  plca report runs/<source_only_run> runs/<plca_run>\n"
        "  plca report runs/<run_name> --gallery 6   # with the final model's 6 worst and 6 best val images\n"
        "  plca report runs/my_sweep --output report/"),
    "sweep": (
        "train every --grid combination x every seed; a manifest, then mean +- sd tables",
        "Runs every combination of the --grid values with every seed, each in its own run directory under the "
        "sweep directory (output_dir), locally one after another or as Slurm jobs through submitit, then writes "
        "results.md, results.csv and results.png. Re-running the command skips finished runs and resumes "
        "interrupted ones.",
        "  plca sweep configs/folder_plca.yaml --seeds 0 1 2 --grid train.lr=0.01,0.02 output_dir=runs/lr_sweep\n"
        "  plca sweep configs/gta2cityscapes_plca.yaml --seeds 0 1 2 --launcher slurm --partition gpu "
        "--gpus-per-node 2"),
    "export": (
        "save a trained model as one .safetensors file that describes itself, or as a model folder",
        "Writes the weights of a run's final model (or of any model file) and, as metadata, the network "
        "(backbone, head, style, normalisation), the classes and the run's config: evaluate and predict then "
        "need nothing else. No optimiser state, no pickle. --format folder writes a folder instead: config.json "
        "(network, classes, test-time settings, training config and command, metrics with their protocol), "
        "model.safetensors and a model card README.md.",
        "  plca export runs/<run_name> --output model.safetensors\n"
        "  plca export runs/<run_name> --format folder --output my_model/\n"
        "  plca export gta2city_plca.pth --config configs/gta2cityscapes_plca.yaml --output authors.safetensors"),
    "weights": (
        "name what a weights file is (inspect); rewrite a backbone's weights in our layout (convert)",
        "inspect reads a file's tensor names and shapes (nothing in it is run) and names its layout (PLCA's "
        "Caffe ResNet, torchvision's ResNet, mmcv's ResNet-101 v1c, SegFormer's mit_b* or Hugging Face's "
        "nvidia/mit-b*, EfficientNet-Lite0 of efficientnet_pytorch or timm, the PLCA authors' released "
        "checkpoints, plca checkpoints and exports), the architecture, its model.backbone and model.style, "
        "the number of tensors and parameters, its sha256 (checked against a hash in its name, as torchvision's "
        "file names carry) and the configs it fits. Exit status 0: something here uses the file; 1: recognised "
        "but nothing here loads it; 2: unknown or unreadable. convert loads the file strictly into the backbone "
        "it fits and writes that backbone's weights as one .safetensors file, renamed into place only when "
        "complete.",
        "  plca weights inspect weights/resnet101-63fe2227.pth\n"
        "  plca weights inspect gta2city_plca.pth   # the PLCA authors' release: how to evaluate it\n"
        "  plca weights convert weights/mit_b5.pth weights/mit_b5_plca.safetensors"),
    "config": (
        "print a resolved config with the meaning of every key",
        "Resolves a config (its _base_ files, the method's defaults and the overrides) and prints it as YAML "
        "with each key's documentation, or checks it only.",
        "  plca config --show configs/gta2cityscapes_self_training_plca.yaml\n"
        "  plca config --show configs/folder_plca.yaml train.lr=0.01"),
}


def _subcommand(sub, name: str) -> argparse.ArgumentParser:
    summary, paragraph, examples = COMMANDS[name]
    import textwrap

    return sub.add_parser(name, help=summary, formatter_class=_HelpFormatter,
                          description=f"{summary[0].upper()}{summary[1:]}.\n\n" + textwrap.fill(paragraph, 100),
                          epilog=f"examples:\n{examples}")


def cmd_config(args: argparse.Namespace) -> int:
    from plca.config import annotated_yaml

    config_path, overrides = _split_config_and_overrides(args.args)
    if config_path is None:
        raise ConfigError("plca config needs a CONFIG.yaml")
    config = load_config(config_path, overrides)
    print(annotated_yaml(config), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from plca.data.formats import format_names

    parser = argparse.ArgumentParser(
        prog="plca", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pixel-Level Cycle Association (NeurIPS 2020) and self-training for domain adaptive semantic "
                    "segmentation.\nEach command has its own help: plca COMMAND --help.",
        epilog="examples:\n  plca demo\n  plca train configs/folder_plca.yaml data.source.root=/data/src "
               "data.target.root=/data/tgt\n  plca evaluate --checkpoint runs/<run_name>\n\n"
               "Your own backbones, heads, methods and formats: PLCA_PLUGINS=module[,module...] (or entry points "
               "of the group plca.plugins) names modules imported first.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subcommand(sub, "train")
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml [key=value ...]",
                   help="config file then dotted overrides, e.g. train.iters=200 data.classes=[sky,road]")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--data-check", choices=RUN_CHECK_LEVELS, default=RUN_CHECK_LEVELS[0],
                   help="before training, check every dataset file: open image and label headers and compare "
                        "sizes (headers), and also decode every label and check its ids (labels, the default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = _subcommand(sub, "evaluate")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="optional config (for the data; its model settings must match the checkpoint's), then "
                        "overrides, e.g. data.val.root=/data/cityscapes")
    p.add_argument("--checkpoint", required=True,
                   help="a run directory (its final model), a plca .pt, an exported .safetensors, or the PLCA "
                        "authors' released .pth (which needs a config)")
    p.add_argument("--aggregate", action=argparse.BooleanOptionalAction, default=None,
                   help="PLCA's test-time spatial aggregation (default: eval.test_time_aggregation, which is the "
                        "method's default when null: on for plca)")
    p.add_argument("--output", help="where to write the metrics JSON (default: next to the model file, named "
                                    "after it and the data: <model>.<format>-<split>-<root hash>.metrics.json)")
    p.add_argument("--gallery", type=int, default=0, metavar="N",
                   help="also write the N validation images with the lowest and the N with the highest per-image "
                        "mIoU as input | prediction | label | error panels, with index.md / index.json")
    p.add_argument("--gallery-dir", metavar="DIR",
                   help="folder for the gallery (default: X.gallery next to the metrics JSON X.metrics.json)")
    _allow_unfinished_flag(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = _subcommand(sub, "demo")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--data-root", default="data/synthetic")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--iters", type=int, default=None, help="updates per model (default: the demo's budget)")
    p.add_argument("--methods", nargs="+", default=["source_only", "plca"],
                   choices=list(DEMO_METHODS),
                   help="methods to train and compare, one column each (default: source_only plca)")
    p.add_argument("--oracle", action="store_true",
                   help="also train on the target's labels (the upper bound the domain gap is measured against)")
    p.add_argument("--from-scratch", action="store_true",
                   help="ResNet-18 DeepLab-v2 from random weights (SGD) instead of the ImageNet-pretrained start")
    p.add_argument("--tuning", action="store_true",
                   help="train and report on the tuning scenes (another generator seed), where settings are chosen")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides applied to every method's run (e.g. train.lr=1e-4)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = _subcommand(sub, "predict")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="config then overrides; CONFIG may be left out for a .safetensors export or a plca "
                        "checkpoint, which carry theirs")
    p.add_argument("--checkpoint", required=True,
                   help="a plca checkpoint (.pt), an exported .safetensors, or the PLCA authors' released .pth")
    p.add_argument("--input", help="an image file or a folder of images (searched recursively)")
    p.add_argument("--split", help="instead of --input: this split of the config's data.val dataset, e.g. val")
    p.add_argument("--output", required=True, help="folder for labels/, color/ and overlay/")
    p.add_argument("--submission", action="store_true",
                   help="with --split: write the dataset's benchmark-server files (Cityscapes label ids, ACDC / Dark "
                        "Zurich train ids, named as the server expects) and submission.zip instead")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="resize inputs to H x W before inference (default: eval.size of the config)")
    p.add_argument("--original-size", action="store_true", help="run at each input's own resolution")
    p.add_argument("--sliding-window", action="store_true",
                   help="average overlapping windows (default window: train.crop_size)")
    p.add_argument("--window", type=int, nargs=2, metavar=("H", "W"), help="sliding-window size (implies it)")
    p.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="sliding-window stride (default 2/3 window)")
    p.add_argument("--flip", action="store_true", help="also average the horizontally flipped image")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="average over these scales, e.g. 0.75 1 1.25")
    p.add_argument("--aggregate", action=argparse.BooleanOptionalAction, default=None,
                   help="PLCA's test-time spatial aggregation (default: eval.test_time_aggregation)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the config's device)")
    p.add_argument("--batch-size", type=int, default=1, help="images (or windows) per forward pass")
    p.add_argument("--num-workers", type=int, default=2, help="image-reading processes")
    _allow_unfinished_flag(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = _subcommand(sub, "prepare")
    p.add_argument("format", choices=format_names(prepare=True),
                   help="the dataset's on-disk format (a wrong one is named with what the folder looks like)")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--classes", nargs="+", metavar="NAME",
                   help="class names in index order (default: the format's own classes, e.g. the 19 Cityscapes "
                        "classes; folder: ROOT/classes.txt, else required)")
    p.add_argument("--split", help="check only this split, e.g. val or, for a format with conditions, "
                                   "train:night+snow (default: every split)")
    p.add_argument("--write-cache", metavar="DIR", help="write each label as a class-index PNG under DIR")
    p.add_argument("--stats", metavar="FILE.json", help="write per-class pixel and image counts")
    p.add_argument("--rcs-stats", metavar="FILE.json",
                   help="write the per-image class counts and label sizes of rare class sampling "
                        "(data.rare_class_sampling.stats); "
                        "give the --split the run trains on")
    p.add_argument("--unlabelled", action="store_true",
                   help="the split(s) are a target's training images: labels are not required")
    p.add_argument("--crop-size", nargs=2, type=int, metavar=("H", "W"),
                   help="the run's train.crop_size: warn if it is larger than the images")
    p.add_argument("--shorter-side", nargs=2, type=int, metavar=("LO", "HI"),
                   help="the run's train.shorter_side: warn if it is far from the images' own size")
    p.add_argument("--scale-range", nargs=2, type=float, metavar=("LO", "HI"),
                   help="the run's train.scale_range (ratios of each image's own size)")
    p.add_argument("--workers", type=int, default=4, help="reading threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = _subcommand(sub, "report")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                   help="run directories, or sweep directories (they hold a manifest.json)")
    p.add_argument("--output", help="folder for the PNGs, report.md and report.html (default: DIR/report for one "
                                    "run or sweep, else report/ in the folder that holds them all)")
    p.add_argument("--names", nargs="+", help="labels for the runs in the plots (default: short names from "
                                              "what differs between their configs)")
    p.add_argument("--flag-range", type=float, default=10.0, metavar="POINTS",
                   help="sweeps: flag a class whose IoU spans more than POINTS across seeds (default 10)")
    p.add_argument("--gallery", type=int, default=0, metavar="N",
                   help="runs: evaluate each run's final model on its data.val and show the N images with the "
                        "lowest and the N with the highest per-image mIoU (written to gallery/ in the output)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while --gallery evaluates")
    p.set_defaults(func=cmd_report)

    p = _subcommand(sub, "sweep")
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml [key=value ...]",
                   help="config then overrides shared by all runs; output_dir=DIR is the sweep directory")
    p.add_argument("--seeds", nargs="+", default=["0"], metavar="SEED", help="seeds, e.g. 0 1 2 (default 0)")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="a config key and its values (repeat --grid for more keys; commas inside [...] do not "
                        "split), e.g. --grid train.lr=0.01,0.02")
    p.add_argument("--launcher", choices=LAUNCHERS, default=LAUNCHERS[0],
                   help="local: one run after another here (default); slurm: one Slurm job per run through "
                        "submitit; submitit-local: submitit's local executor (to try the Slurm path here)")
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="processes (GPUs) per run, through torch.distributed.run (default 1; on Slurm: "
                        "--gpus-per-node)")
    p.add_argument("--flag-range", type=float, default=10.0, metavar="POINTS",
                   help="flag a class whose IoU spans more than POINTS across seeds (default 10)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their commands; run nothing")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="local: say the running run's step and ETA and the runs done this often, when the run "
                        "logged a new step (0: only when a run ends; default 30)")
    slurm = p.add_argument_group("Slurm (--launcher slurm)")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node, one process each (default 1)")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes per run (default 1)")
    slurm.add_argument("--time", type=int, default=24 * 60, metavar="MINUTES",
                       help="time limit of each job in minutes (default 1440); a job that reaches it is "
                            "requeued (up to 3 times) and resumes from its checkpoint")
    slurm.add_argument("--cpus-per-task", type=int, help="CPUs per node (data loading workers)")
    slurm.add_argument("--mem-gb", type=float, help="memory per node in GB")
    slurm.add_argument("--slurm-folder", metavar="DIR", help="submitit's job files and logs (default SWEEP_DIR/slurm)")
    slurm.add_argument("--slurm-arg", action="append", metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. --slurm-arg account=mylab --slurm-arg constraint=a100")
    slurm.add_argument("--no-wait", action="store_true",
                       help="submit and exit; run the same command again later to collect the results")
    p.set_defaults(func=cmd_sweep)

    p = _subcommand(sub, "export")
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--output", required=True, metavar="MODEL.safetensors_OR_FOLDER")
    p.add_argument("--format", choices=("file", "folder"), default="file",
                   help="file: one self-describing .safetensors; folder: config.json, model.safetensors and a "
                        "model card README.md, the layout model hubs read (default: file)")
    p.add_argument("--which", choices=RUN_MODELS, default=RUN_MODELS[0],
                   help="which model of a run directory (default: final; best_on_val is oracle model selection)")
    p.add_argument("--config", help="config for a checkpoint that carries none (e.g. the authors' release)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for --config")
    _allow_unfinished_flag(p)
    p.set_defaults(func=cmd_export)

    p = _subcommand(sub, "weights")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    inspect = actions.add_parser("inspect", help="name a weights file's layout, architecture, style and configs",
                                 formatter_class=_HelpFormatter,
                                 description="Name a weights file's layout, architecture, model.backbone / "
                                             "model.style, tensors, sha256 and the configs it fits.",
                                 epilog="examples:\n  plca weights inspect weights/resnet101_v1c-e67eebb6.pth\n"
                                        "  plca weights inspect pytorch_model.bin   # Hugging Face nvidia/mit-b5")
    inspect.add_argument("file", metavar="FILE", help="a .pth / .pt / .bin / .safetensors file, or package:<name>")
    convert = actions.add_parser("convert", help="write a backbone's weights in this project's layout",
                                 formatter_class=_HelpFormatter,
                                 description="Load FILE strictly into the backbone it fits and write that "
                                             "backbone's weights to OUT.safetensors (atomically).",
                                 epilog="examples:\n  plca weights convert resnet101_caffe.pth "
                                        "resnet101_caffe.safetensors")
    convert.add_argument("file", metavar="FILE",
                         help="ImageNet weights in any layout inspect names (or package:<name>)")
    convert.add_argument("output", metavar="OUT.safetensors", help="the converted file (not FILE itself)")
    p.set_defaults(func=cmd_weights)

    p = _subcommand(sub, "config")
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml [key=value ...]", help="config file then overrides")
    p.add_argument("--show", action="store_true", help="print the resolved config (the default action)")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from plca.plugins import PluginError, load_plugins

    try:
        load_plugins()  # before the parser: a plugin's formats, backbones and methods are choices there
    except PluginError as error:
        print(f"plca: error: {error}", file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (plca train C.yaml --no-progress train.iters=5)
    target = "args" if hasattr(args, "args") else "overrides" if hasattr(args, "overrides") else None
    if extra and (target is None or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        setattr(args, target, list(getattr(args, target) or []) + extra)
    from plca.engine.stop_report import REPORTED_ERRORS, exit_status, stop_text
    from plca.engine.trainer import TrainingInterrupted

    try:
        return args.func(args)
    except (*REPORTED_ERRORS, TrainingInterrupted) as error:  # the same text ends a run's train.log
        print(stop_text(args.command, error), file=sys.stderr)
        return exit_status(error)


if __name__ == "__main__":
    sys.exit(main())
