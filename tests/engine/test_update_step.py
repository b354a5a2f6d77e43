"""The engine's update: each micro-batch of an update draws its own random numbers (ClassMix classes,
MIC masks, HRDA's detail boxes), as separate steps would; micro-batch 0 draws what a step without
accumulation draws, so runs without accumulation are unchanged."""

from __future__ import annotations

import torch
from torch import nn

from plca.engine.distributed import DistInfo
from plca.engine.update import UpdateOutcome, update
from plca.methods import Method, MethodContext, StepOutput


class DrawRecorder(Method):
    """Records the first number of the step's generator at every forward; its loss trains one weight."""

    name = "draw_recorder"  # not registered: used directly

    def __init__(self) -> None:
        super().__init__(nn.Linear(1, 1), MethodContext(loss=None, seed=7))
        self.draws: list[float] = []

    def training_step(self, source, target, step) -> StepOutput:
        self.draws.append(float(torch.rand((), generator=self.step_generator(step))))
        return StepOutput(loss=self.student(source["image"].mean().reshape(1, 1)).sum())


def batch(value: float) -> dict:
    return {"image": torch.full((1, 3, 2, 2), value), "label": torch.zeros((1, 2, 2), dtype=torch.int64)}


def run_update(method: DrawRecorder, micro_batches: int, step: int = 3) -> UpdateOutcome:
    optimizer = torch.optim.SGD(method.student.parameters(), lr=0.1)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = [(batch(float(i)), None) for i in range(micro_batches)]
    return update(method, optimizer, batches, step, info, None, False, False, lambda logs: None)


def test_the_micro_batches_of_an_update_draw_different_numbers():
    method = DrawRecorder()
    assert run_update(method, micro_batches=3) is UpdateOutcome.APPLIED
    assert len(method.draws) == 3 and len(set(method.draws)) == 3


def test_micro_batch_zero_draws_what_an_update_without_accumulation_draws():
    with_accumulation, without = DrawRecorder(), DrawRecorder()
    run_update(with_accumulation, micro_batches=2)
    run_update(without, micro_batches=1)
    assert with_accumulation.draws[0] == without.draws[0]
    # and what the method draws outside an update (e.g. a test calling training_step directly)
    assert without.draws[0] == float(torch.rand((), generator=without.step_generator(3)))


def test_the_draws_are_a_function_of_step_and_micro_batch_only():
    first, second = DrawRecorder(), DrawRecorder()
    run_update(first, micro_batches=2)
    run_update(second, micro_batches=2)
    assert first.draws == second.draws  # a resumed run draws the same
    with first.micro_batch(1):
        assert float(torch.rand((), generator=first.step_generator(3))) == first.draws[1]
    assert first.__dict__["_micro_batch"] == 0  # the context is left


def test_large_finite_values_are_finite_and_one_nan_or_inf_is_not():
    from plca.engine.update import all_finite

    huge = torch.full((1000,), 3e38)  # finite, but their float32 sum overflows to inf
    assert all_finite([huge, torch.ones(3)])
    assert all_finite([torch.ones(2, dtype=torch.int64)])  # integer tensors are not checked
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not all_finite([torch.ones(3), torch.tensor([1.0, bad])])
    assert all_finite([])
