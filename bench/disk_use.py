"""What a run writes to disk in checkpoints, computed from a config without training it.

Builds the config's method (no pretrained weights, no data), gives every parameter its optimiser
state (one step with zero gradients), and counts the bytes of the tensors each file holds,
each storage once, as ``torch.save`` writes it:

    last.pt   the method's state (student, teacher, ...), the inference model (the student's
              tensors again, so counted once), the optimiser's state
    final.pt  the inference model; best_on_val.pt the same size (none on disk when it is a link to final.pt)

    python bench/disk_use.py configs/gta2cityscapes_plca.yaml
    python bench/disk_use.py configs/gta2cityscapes_daformer_mitb5_plca.yaml self_training.feature_distance.enabled=false

Headers (config, description) and pickling add some kilobytes; the event files and logs are not counted.
"""

from __future__ import annotations

import argparse

import torch

from plca.config import load_config
from plca.engine.build import build_training_method
from plca.engine.optim import optimizer_from_config


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared ones once)."""
    seen = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]


def measure(config_path: str, overrides: list[str]) -> dict:
    config = load_config(config_path, overrides + ["model.pretrained=null", "device=cpu"])
    method = build_training_method(config, torch.device("cpu"))
    trainable = method.trainable_module()
    optimizer = optimizer_from_config(trainable, config.train)
    for parameter in trainable.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # creates the optimiser's state (momentum; AdamW's two moments)
    model = method.inference_model()
    model_bytes = storage_bytes(model.state_dict().values())
    last_bytes = storage_bytes([*method.state_dict().values(), *model.state_dict().values(),
                                *optimizer_tensors(optimizer)])
    parameters = sum(p.numel() for p in model.parameters())
    return {"config": config_path, "method": config.method, "backbone": config.model.backbone,
            "head": config.model.head, "model_parameters": parameters, "model_file_MB": model_bytes / 1e6,
            "last_pt_MB": last_bytes / 1e6, "run_MB_best_linked": (last_bytes + model_bytes) / 1e6,
            "run_MB_best_separate": (last_bytes + 2 * model_bytes) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    result = measure(args.config, args.overrides)
    print(", ".join(f"{key} {value:.1f}" if isinstance(value, float) else f"{key} {value}"
                    for key, value in result.items()))


if __name__ == "__main__":
    main()
