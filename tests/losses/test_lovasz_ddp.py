"""The global Lovasz-softmax under DDP: two CPU processes (gloo, torchrun) with two images each give
the value and, after DDP's gradient averaging, the parameter gradient of one process with all four.
The reference reduction (``loss.lovasz_reduction: reference``) gives, on each process, the value and
the DDP-averaged gradient of a plain transcription of the PLCA authors' multi-GPU Lovasz."""

import json
from pathlib import Path

import pytest
import torch

from plca.data.labels import IGNORE_INDEX
from plca.losses.lovasz import lovasz_softmax, lovasz_softmax_global, lovasz_softmax_reference_ddp
from processes import run_torchrun


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each process's results (one torchrun for the module's tests)."""
    out = tmp_path_factory.mktemp("lovasz_ddp")
    run_torchrun(Path(__file__).parent / "lovasz_ddp_worker.py", out)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    return ranks


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_whole_batch(ranks):
    for key, first in ranks[0]["results"].items():
        if key.startswith("authors_multigpu/"):
            continue
        second = ranks[1]["results"][key]
        for result in (first, second):
            assert result["value"] == pytest.approx(result["reference_value"], abs=1e-6), key
            grad, want = torch.tensor(result["grad"]), torch.tensor(result["reference_grad"])
            assert (grad - want).abs().max().item() < 1e-6, key
            assert want.abs().max().item() > 1e-3, key  # the check is not vacuous
        assert first["value"] == second["value"], key  # identical on every process
        assert first["local_valid"] != second["local_valid"], key  # variable pixel counts were gathered
    assert ranks[1]["results"]["empty_share/present"]["local_valid"] == 0


@pytest.mark.slow
def test_reference_reduction_equals_the_authors_multigpu_lovasz(ranks):
    checked = 0
    for rank in ranks:
        for key, result in rank["results"].items():
            if not key.startswith("authors_multigpu/"):
                continue
            checked += 1
            assert result["value"] == pytest.approx(result["reference_value"], abs=1e-9), key
            grad, want = torch.tensor(result["grad"]), torch.tensor(result["reference_grad"])
            assert (grad - want).abs().max().item() < 1e-9, key
            assert want.abs().max().item() > 1e-3, key  # the check is not vacuous
    assert checked == 8  # 2 scenarios x 2 class options, on each process
    # rank 1's images hold no pixel of class 3: its mean is over fewer classes than the global one,
    # so the two reductions differ, in value (per process) and in the averaged gradient
    first, second = (rank["results"]["authors_multigpu/uneven/present"] for rank in ranks)
    assert first["value"] != second["value"]
    assert torch.tensor(first["grad"]).sub(torch.tensor(first["global_grad"])).abs().max().item() > 1e-3
    # averaged over all classes on every process, the averaged gradient is the global one again,
    # and the processes' values average to the global value
    for scenario in ("uneven", "empty_share"):
        first, second = (rank["results"][f"authors_multigpu/{scenario}/all"] for rank in ranks)
        assert (torch.tensor(first["grad"]) - torch.tensor(first["global_grad"])).abs().max().item() < 1e-9
        global_value = ranks[0]["results"][f"{scenario}/all"]["value"]
        assert (first["value"] + second["value"]) / 2 == pytest.approx(global_value, abs=1e-9)
    empty = ranks[1]["results"]["authors_multigpu/empty_share/present"]
    assert empty["local_valid"] == 0 and empty["value"] == 0.0


def test_without_a_process_group_it_is_the_plain_loss():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3, 5), generator=g)
    labels[0, 0] = IGNORE_INDEX
    plain = lovasz_softmax(logits.softmax(dim=1), labels)
    (want,) = torch.autograd.grad(plain, logits)
    for loss in (lovasz_softmax_global, lovasz_softmax_reference_ddp):
        value = loss(logits.softmax(dim=1), labels)
        (grad,) = torch.autograd.grad(value, logits)
        assert value.item() == plain.item() and torch.equal(grad, want)
