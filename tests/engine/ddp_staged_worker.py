"""Run by tests/engine/test_ddp.py under torchrun (2 CPU processes, gloo).

One engine update of self-training with PLCA on top and MIC (three forwards of the student, two
of them back-propagated early under ``no_sync``) through DistributedDataParallel: every process's
gradients must equal the mean over processes of the gradients of one plain backward of the whole
loss on its own batch, and the gradients are all-reduced once (the early parts under no_sync).
Writes RESULT_DIR/rank<k>.json.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent.parent))
from methods.test_self_training import batches, method  # noqa: E402
from plca.engine.distributed import DistInfo  # noqa: E402
from plca.engine.update import UpdateOutcome, update  # noqa: E402


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    plca = ["plca.association.feature_weight=0.1", "plca.association.classifier_weight=0.1", "plca.lsr_weight=0.01"]
    trained = method(plca, masking__enabled=True, masking__patch_size=8, pseudo_label__threshold=0.0)
    reference = copy.deepcopy(trained)
    source, target = batches(10 + rank)  # each process its own batch

    out = reference.training_step(source, target, 0)
    out.loss.backward()
    expected = []
    for p in reference.student.parameters():
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        expected.append(grad / world)

    ddp = DistributedDataParallel(trained.student)
    trained.set_student_forward(ddp)
    reductions = []

    def counting_allreduce(state, bucket):  # DDP's default all-reduce, counted
        reductions.append(1)
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    # DDP rebuilds its buckets after the first backward: one warm-up backward, then count
    ddp(source["image"])["logits"].sum().backward()
    reductions.clear()
    optimizer = torch.optim.SGD(trained.student.parameters(), lr=0.0)  # keep the weights: compare gradients
    logs = []
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    outcome = update(trained, optimizer, [(source, target)], 0, info, ddp, use_amp=False, channels_last=False,
                     on_logs=logs.append)
    got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trained.student.parameters()]
    staged_reductions = len(reductions)
    reductions.clear()
    ddp(source["image"])["logits"].sum().backward()  # one plain synchronised backward, for the count
    max_rel = max(float((g - e).abs().max() / e.abs().max().clamp_min(1e-12)) for g, e in zip(got, expected))
    local = [p.grad.clone() for p in reference.student.parameters() if p.grad is not None]
    differs_from_local = max(float((g - e).abs().max()) for g, e in zip(got, local))
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "applied": outcome == UpdateOutcome.APPLIED,
        "max_relative_difference_to_mean_gradient": max_rel,
        "max_difference_to_local_gradient": differs_from_local,
        "all_reduced_buckets": staged_reductions, "buckets_of_one_backward": len(reductions),
        "total": float(logs[0]["loss/total"]), "reference_total": float(out.loss),
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
