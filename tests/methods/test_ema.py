"""The EMA teacher follows the DAFormer formula, never receives gradients, stays in eval mode
and round-trips through a state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from plca.methods.addons import EMATeacher, ema_alpha


def student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))


class Holder(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.student = net
        self.teacher = EMATeacher(net, alpha_max=0.999)


def test_alpha_schedule():
    assert ema_alpha(0) == 0.0
    assert ema_alpha(1) == 0.5
    assert ema_alpha(3) == pytest.approx(0.75)
    assert ema_alpha(10_000) == 0.999
    assert ema_alpha(10, alpha_max=0.8) == 0.8
    with pytest.raises(ValueError):
        ema_alpha(-1)


def test_starts_as_an_exact_copy():
    net = student()
    teacher = EMATeacher(net)
    for (name, p), (_, q) in zip(net.state_dict().items(), teacher.model.state_dict().items()):
        assert torch.equal(p, q), name
    assert int(teacher.step) == 0


def test_update_follows_the_formula_and_copies_buffers():
    net = student()
    alpha_max = 0.6
    teacher = EMATeacher(net, alpha_max=alpha_max)
    reference = {name: p.detach().clone() for name, p in net.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        with torch.no_grad():  # a stand-in for an optimiser step
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        net.train()(torch.randn(5, 3, generator=g))  # moves the BatchNorm running statistics
        alpha = teacher.update(net)
        expected_alpha = min(1 - 1 / (step + 1), alpha_max)
        assert alpha == pytest.approx(expected_alpha)
        for name, p in net.named_parameters():
            reference[name] = expected_alpha * reference[name] + (1 - expected_alpha) * p.detach()
        for name, q in teacher.model.named_parameters():
            torch.testing.assert_close(q, reference[name], rtol=0, atol=1e-6)
        for (name, b), (_, c) in zip(net.named_buffers(), teacher.model.named_buffers()):
            assert torch.equal(b, c), name
        assert int(teacher.step) == step
    # the first update (alpha 0.5) really moved away from the old teacher
    assert not torch.equal(teacher.model[0].weight, net[0].weight)


def test_explicit_step():
    net = student()
    teacher = EMATeacher(net)
    assert teacher.update(net, step=41) == pytest.approx(1 - 1 / 42)
    assert int(teacher.step) == 41
    assert teacher.update(net) == pytest.approx(1 - 1 / 43)


def test_copy_from_resets():
    net = student()
    teacher = EMATeacher(net)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    teacher.update(net, step=5)
    teacher.copy_from(net)
    assert torch.equal(teacher.model[0].weight, net[0].weight)
    assert int(teacher.step) == 0


def test_teacher_never_receives_gradients():
    holder = Holder(student()).train()
    x = torch.randn(6, 3)
    teacher_out = holder.teacher(x)
    assert not teacher_out.requires_grad
    assert all(not p.requires_grad for p in holder.teacher.parameters())
    loss = holder.student(x).pow(2).sum() + (holder.student(x) * teacher_out).sum()
    loss.backward()
    assert all(p.grad is not None for p in holder.student.parameters())
    assert all(p.grad is None for p in holder.teacher.parameters())
    # the student keeps training: its parameters still require gradients
    assert all(p.requires_grad for p in holder.student.parameters())


def test_train_keeps_the_teacher_in_eval():
    holder = Holder(student())
    holder.train()
    assert holder.student.training
    assert not holder.teacher.training
    assert all(not m.training for m in holder.teacher.modules())
    holder.teacher.train(True)
    assert all(not m.training for m in holder.teacher.modules())
    x = torch.randn(4, 3)
    # dropout off and BatchNorm on running statistics: two passes agree, and match eval of a copy
    assert torch.equal(holder.teacher(x), holder.teacher(x))
    running_mean = holder.teacher.model[1].running_mean.clone()
    holder.teacher(x)
    assert torch.equal(holder.teacher.model[1].running_mean, running_mean)


def test_state_dict_round_trip():
    holder = Holder(student())
    net = holder.student
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    net.train()(torch.randn(5, 3))
    holder.teacher.update(net, step=7)
    state = holder.state_dict()
    assert "teacher.model.0.weight" in state and "teacher.step" in state
    assert "teacher.model.1.running_mean" in state

    other = Holder(student())
    assert not torch.equal(other.teacher.model[0].weight, holder.teacher.model[0].weight)
    other.load_state_dict(state)
    for name, value in holder.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name
    assert int(other.teacher.step) == 7
    assert other.teacher.update(other.student) == pytest.approx(1 - 1 / 9)


def test_structure_mismatch_is_refused():
    teacher = EMATeacher(student())
    with pytest.raises(ValueError, match="structure"):
        teacher.update(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(ValueError, match="alpha_max"):
        EMATeacher(student(), alpha_max=1.5)


def test_copy_drops_the_students_gradients():
    net = student()
    net(torch.randn(4, 3)).sum().backward()
    teacher = EMATeacher(net)
    assert all(p.grad is None for p in teacher.parameters())
