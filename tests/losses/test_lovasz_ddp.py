"""The global Lovasz-softmax under DDP: two CPU processes (gloo, torchrun) with two images each give
the value and, after DDP's gradient averaging, the parameter gradient of one process with all four."""

import json
from pathlib import Path

import pytest
import torch

from plca.data.labels import IGNORE_INDEX
from plca.losses.lovasz import lovasz_softmax, lovasz_softmax_global
from processes import run_torchrun


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    run_torchrun(Path(__file__).parent / "lovasz_ddp_worker.py", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    for key, first in ranks[0]["results"].items():
        second = ranks[1]["results"][key]
        for result in (first, second):
            assert result["value"] == pytest.approx(result["reference_value"], abs=1e-6), key
            grad, want = torch.tensor(result["grad"]), torch.tensor(result["reference_grad"])
            assert (grad - want).abs().max().item() < 1e-6, key
            assert want.abs().max().item() > 1e-3, key  # the check is not vacuous
        assert first["value"] == second["value"], key  # identical on every process
        assert first["local_valid"] != second["local_valid"], key  # variable pixel counts were gathered
    assert ranks[1]["results"]["empty_share/present"]["local_valid"] == 0


def test_without_a_process_group_it_is_the_plain_loss():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3, 5), generator=g)
    labels[0, 0] = IGNORE_INDEX
    plain = lovasz_softmax(logits.softmax(dim=1), labels)
    (want,) = torch.autograd.grad(plain, logits)
    value = lovasz_softmax_global(logits.softmax(dim=1), labels)
    (grad,) = torch.autograd.grad(value, logits)
    assert value.item() == plain.item() and torch.equal(grad, want)
