"""How hard each PLCA loss term pulls on the network: the norm of each weighted term's gradient.

For the demo's PLCA config (pretrained start by default), on a few batches of the demo's scenes,
this prints, per term (source cross-entropy, then PLCA's: lsr, assoc_feature, assoc_classifier,
each with its configured weight), the L2 norm of its gradient on the backbone's parameters (shared
by every term) and on the head's, averaged over the batches, and each term's share of the
backbone gradient's squared norm. With ``--checkpoint`` the network is that model (e.g. a
source-only run's ``final.pt``) rather than the ImageNet start.

    python bench/term_gradients.py --tuning --batches 4
    python bench/term_gradients.py --tuning --checkpoint runs/x/checkpoints/final.pt \
        --set plca.association.feature_weight=0.025
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from plca.data.build import build_run_datasets
from plca.data.synthetic import ensure_generated
from plca.demo import REPORTED_SCENES, TUNING_SCENES, demo_config
from plca.engine.loader import batch_stream
from plca.engine.trainer import build_training_method
from plca.methods.plca_objective import plca_terms
from plca.serialization import load_torch_file


def term_losses(method, source: dict, target: dict) -> dict[str, torch.Tensor]:
    """Each weighted term of PLCA's objective for one batch (target forwarded first, as in training)."""
    options = method.plca_options
    tgt, src = method.segment(target["image"]), method.segment(source["image"])
    ce, _ = method.source_loss(src["logits"], source["label"])
    terms = {"source CE (+ Lovasz)": ce}
    for term, value, _ in plca_terms(options, src, tgt, source["label"]):
        terms[term.name] = term.weight(options) * value
    return terms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tuning", action="store_true", help="the tuning scenes (another generator seed)")
    parser.add_argument("--data-root", default="data/synthetic")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="a plca checkpoint whose model to use instead of the ImageNet start")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    root = Path(args.data_root)
    if args.tuning:
        root = root.with_name(root.name + "_tuning")
    ensure_generated(root, seed=TUNING_SCENES if args.tuning else REPORTED_SCENES)
    config = demo_config("plca", root, Path("/tmp/unused"), args.seed, 150, overrides=args.set)
    torch.manual_seed(args.seed)
    method = build_training_method(config, torch.device("cpu")).train()
    if args.checkpoint:
        method.inference_model().load_state_dict(load_torch_file(Path(args.checkpoint), "checkpoint")["model"])
    datasets = build_run_datasets(config.data, config.train, None, uses_target=True)
    sources = batch_stream(datasets.source, config.train.batch_size, seed=args.seed)
    targets = batch_stream(datasets.target, config.train.batch_size, seed=args.seed + 1)
    parts = {name: [p for p in getattr(method.inference_model(), name).parameters() if p.requires_grad]
             for name in ("backbone", "head")}
    totals: dict[str, dict[str, float]] = {}
    for _ in range(args.batches):
        terms = term_losses(method, next(sources), next(targets))
        for name, loss in terms.items():
            row = totals.setdefault(name, {"backbone": 0.0, "head": 0.0, "value": 0.0})
            row["value"] += float(loss.detach()) / args.batches
            for part, params in parts.items():
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
                row[part] += float(norm) / args.batches
    squared = sum(row["backbone"] ** 2 for row in totals.values())
    print(f"{'term (weighted)':<26} {'value':>9} {'|grad| backbone':>16} {'|grad| head':>12} {'sq. share':>9}")
    for name, row in totals.items():
        print(f"{name:<26} {row['value']:9.4f} {row['backbone']:16.4f} {row['head']:12.4f} "
              f"{row['backbone'] ** 2 / squared:9.1%}")


if __name__ == "__main__":
    main()
