"""Run by tests/engine/test_ddp.py under torchrun (2 CPU processes, gloo).

Trains a few PLCA steps with DistributedDataParallel, then checks that every
process holds identical weights and that the processes saw different data.
Writes RESULT_DIR/rank<k>.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent.parent))
from engine.test_training import tiny_config  # noqa: E402
from plca.engine.trainer import train  # noqa: E402


def main() -> None:
    data_root, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    config = tiny_config(data_root, out_dir, "plca", iters=3, run_name=None)
    result = train(config, progress=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    # each process's own, live weights (parameters and BN buffers), not the shared checkpoint file
    params = torch.cat([v.detach().float().flatten() for v in result.model.parameters()])
    buffers = torch.cat([v.detach().float().flatten() for v in result.model.buffers() if v.is_floating_point()])
    params = torch.cat([params, buffers])
    gathered = [torch.zeros_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "world_size": world,
        "run_dir": str(result.run_dir),
        "max_diff_to_rank0": float((gathered[rank] - gathered[0]).abs().max()),
        "mIoU": result.metrics["mIoU"],
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
