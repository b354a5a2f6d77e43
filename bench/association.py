"""Time and peak memory of the association loss (or of spatial aggregation alone), forward + backward,
dense reference against the memory-linear implementation, and how far apart their numbers are.

    python bench/association.py                                   # 92x183, cos at C=2048 and kl at 19 classes
    python bench/association.py --metric cos --size 92x183 --channels 2048 --json cos.json
    python bench/association.py --metric kl --classes 19 --size 32x64
    python bench/association.py --part aggregate --impls dense,efficient:blockwise,efficient:sdpa
    python bench/association.py --metric cos --size 128x128 --channels 256   # 1/4 map of a 512x512 crop
    python bench/association.py --part flips --size 32x32 --channels 256 --seeds 5   # bf16 vs float32

What one measurement is: every impl gets its own **fresh subprocess** (multiprocessing "spawn", so
no impl inherits another's memory), which builds the random inputs (below) and waits. The parent
then has them run in turn, one at a time: ``--warmup`` untimed rounds, then ``--repeats`` timed
rounds of ``impl 1, impl 2, ...``, so that on a shared machine every impl sees about the same load
(the load average during its runs is reported). ``seconds`` is the median wall time of one forward +
backward (CUDA synchronised). ``peak_mb`` is the peak memory of the subprocess over all its runs
above what it held once its inputs were built:

- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()`` at that point
  (tensors only, after ``reset_peak_memory_stats``);
- CPU: the increase of the resident set size. Where ``/proc/self/clear_refs`` is writable (Linux), the
  kernel's high-water mark VmHWM is reset to the current RSS once the inputs are built, and the peak
  is VmHWM at the end minus that RSS: everything the runs touched (tensors, autograd buffers, BLAS /
  OpenMP workspaces). Elsewhere it is ``ru_maxrss`` minus the RSS at that point, an upper bound (it also
  counts any higher peak while the inputs were built). CPU tensors are malloc'ed, and large blocks go
  back to the OS when freed, so the RSS follows the live tensors.

Metrics and channels. ``cos`` runs on features of ``--channels`` channels (the backbone's last map,
2048 for ResNet-101); ``kl`` runs on softmax probabilities over ``--classes`` classes (19 for
Cityscapes), so its channel count is ``--classes`` and ``--channels`` does not apply to it. Labels
take values in ``[0, --classes)``.

Inputs (seeded, identical in every subprocess): source and target of the same ``--size`` (so
``N = M = H * W``); each image has a blocky random class map (8 x 8 pixel cells, 5% of the source
pixels ignored), and each pixel's features are its class's embedding plus noise (cos) or the softmax
of 3 * one-hot(class) plus noise (kl), so that most cycles are positive. The efficient backward only
visits positive rows; random labels would make it look cheaper than in training.

``max_rel_diff`` compares every impl with the first one (dense): the max over the loss and the
source and target gradients of ``max|a - b| / max(max|a|, max|b|)``; ``rel_diff`` breaks it down.

Impls: ``dense`` (reference: materialises N x M matrices), ``efficient`` (the default backend of
:mod:`plca.losses.association_efficient`), ``efficient:blockwise`` / ``efficient:sdpa`` (its spatial
aggregation forced to one backend). ``--part aggregate`` measures spatial aggregation of the target
alone, its loss being ``sum(aggregated * w)`` with a fixed random ``w``.

Memory of dense: the loss keeps about ten N x M float32 matrices alive at its peak (similarities,
standardised logits, log-softmaxes, their gradients); at 92x183 one is 16836^2 * 4 B = 1.06 GiB, so
dense needs about 11 GiB (more for kl, whose way back is a second matrix, not a transpose). The
script prints this estimate and the memory available and runs dense anyway: if the OS kills the
subprocess, its row says so and the others still run.

Precision (``--similarity-dtype``, ``--part flips``). ``--similarity-dtype`` sets the products'
precision of the loss and aggregation runs (``float32``, the default of the loss, or ``bfloat16``).
``--part flips`` times nothing: in this process, for ``--seeds`` seeds, it runs the association
(``--impls``' first impl, aggregation as ``--aggregate``) on seeded inputs (``--inputs random``:
Gaussian features / softmax of Gaussian logits; ``structured``: the class maps above) three ways:
float32 products (the reference), bfloat16 products of the same inputs, and float32 products of the
inputs rounded to bfloat16 (what a network run under autocast hands over). For the last two it
reports the share of valid source pixels whose ``j(i)``, ``i'(i)`` or positive flag differs from
the reference, and the loss's relative difference; mean, min and max over the seeds.

JSON (``--json``): with one metric ``{"dense": {"seconds", "peak_mb", ...}, "efficient": {...},
"max_rel_diff": float, "ratios": {...}, "settings": {...}}``; with ``--metric both`` an object
``{"cos": <that>, "kl": <that>}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from plca.data.labels import IGNORE_INDEX

IMPL_CHOICES = ("dense", "efficient", "efficient:blockwise", "efficient:sdpa")
CELL = 8  # pixels per side of a class cell in the random label maps
IGNORE_FRACTION = 0.05
DENSE_MATRICES = 10  # N x M float32 matrices alive at dense's peak (estimate, see the docstring)
IDLE_SECONDS = 0.5  # pause before each run: OpenMP threads spin-wait for a while after a parallel region


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration; everything a worker subprocess needs to rebuild the inputs."""

    part: str  # "loss", "aggregate" or "flips"
    metric: str  # "cos" or "kl"
    height: int
    width: int
    channels: int  # channels of the maps actually used (features for cos, classes for kl)
    classes: int
    batch: int
    aggregate: bool
    alpha: float
    repeats: int
    warmup: int
    device: str
    threads: int | None
    seed: int
    similarity_dtype: str = "float32"
    reduction: str = "pooled"
    inputs: str = "structured"  # "structured" (class maps) or "random"; the flips part only

    @property
    def pixels(self) -> int:
        return self.height * self.width


# --------------------------------------------------------------------------- inputs


def label_maps(settings: Settings, generator: torch.Generator) -> Tensor:
    """``(B, H, W)`` int64: one random class per ``CELL x CELL`` cell."""
    cells_h, cells_w = -(-settings.height // CELL), -(-settings.width // CELL)
    coarse = torch.randint(0, settings.classes, (settings.batch, cells_h, cells_w), generator=generator)
    full = coarse.repeat_interleave(CELL, dim=1).repeat_interleave(CELL, dim=2)
    return full[:, :settings.height, :settings.width].contiguous()


def class_maps(labels: Tensor, settings: Settings, generator: torch.Generator) -> Tensor:
    """``(B, C, H, W)`` float32 maps whose pixels look like their class: features or probabilities."""
    b, h, w = labels.shape
    noise = torch.randn(b, settings.channels, h, w, generator=generator)
    if settings.metric == "cos":
        embedding = torch.randn(settings.classes, settings.channels, generator=generator)
        return embedding[labels].permute(0, 3, 1, 2) + 1.5 * noise
    one_hot = torch.nn.functional.one_hot(labels, settings.classes).permute(0, 3, 1, 2).float()
    return (3 * one_hot + noise).softmax(dim=1)


def make_inputs(settings: Settings) -> dict[str, Tensor]:
    """Source / target maps, source labels (with ignored pixels) and the aggregate-part weight ``w``."""
    generator = torch.Generator().manual_seed(settings.seed)
    source_labels = label_maps(settings, generator)
    target_labels = label_maps(settings, generator)
    source = class_maps(source_labels, settings, generator)
    target = class_maps(target_labels, settings, generator)
    if settings.inputs == "random":
        source, target = (torch.randn(source.shape, generator=generator) for _ in range(2))
        if settings.metric == "kl":
            source, target = (2 * source).softmax(dim=1), (2 * target).softmax(dim=1)
    source_labels[torch.rand(source_labels.shape, generator=generator) < IGNORE_FRACTION] = IGNORE_INDEX
    weight = torch.randn(target.shape, generator=generator)
    device = torch.device(settings.device)
    return {"source": source.to(device).requires_grad_(True), "target": target.to(device).requires_grad_(True),
            "labels": source_labels.to(device), "weight": weight.to(device)}


# --------------------------------------------------------------------------- one run


def forward_backward(impl: str, inputs: dict[str, Tensor], settings: Settings) -> dict[str, Tensor | float]:
    """One forward + backward of ``impl``: loss, gradients and, for the loss part, the positive ratio.

    The inputs are leaves that require grad (no copy, which would count in the peak); their ``.grad``
    is reset first, so each run allocates its own gradients, as a training step does."""
    from plca.losses.association import associate, check_inputs, spatial_aggregate
    from plca.losses.association_efficient import efficient_associate, efficient_spatial_aggregate

    source, target = inputs["source"], inputs["target"]
    source.grad = target.grad = None
    backend = impl.partition(":")[2]
    result: dict[str, Tensor | float] = {}
    if settings.part == "aggregate":
        if backend:
            aggregated = efficient_spatial_aggregate(target, settings.metric, settings.alpha, backend=backend,
                                                     similarity_dtype=settings.similarity_dtype)
        else:
            aggregated = spatial_aggregate(target, settings.metric, settings.alpha, impl=impl,
                                           similarity_dtype=settings.similarity_dtype)
        loss = (aggregated * inputs["weight"]).sum()
        loss.backward()
        result["grad_target"] = target.grad
    else:
        labels = inputs["labels"]
        if backend:
            check_inputs(source, target, labels, None, settings.metric, "efficient", settings.alpha,
                         settings.reduction, settings.similarity_dtype)
            out = efficient_associate(source, target, labels, settings.metric, settings.aggregate, settings.alpha,
                                      IGNORE_INDEX, None, aggregate_backend=backend, reduction=settings.reduction,
                                      similarity_dtype=settings.similarity_dtype)
        else:
            out = associate(source, target, labels, metric=settings.metric, aggregate=settings.aggregate,
                            alpha=settings.alpha, impl=impl, reduction=settings.reduction,
                            similarity_dtype=settings.similarity_dtype)
        loss = out.loss
        loss.backward()
        result["positive_ratio"] = float(out.positive_ratio)
        result["grad_source"] = source.grad if source.grad is not None else torch.zeros_like(source)
        result["grad_target"] = target.grad if target.grad is not None else torch.zeros_like(target)
    result["loss"] = loss.detach()
    return result


# --------------------------------------------------------------------------- memory


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in MB, or None where there is no procfs."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory above the moment of construction; see the module docstring for what it counts."""

    def __init__(self, device: torch.device):
        self.device = device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device) / 2**20
            self.method = "torch.cuda.max_memory_allocated"
        else:
            reset = _reset_peak_rss()
            rss = _status_mb("VmRSS")
            self.base = rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.method = "VmHWM - VmRSS (clear_refs reset)" if reset else "ru_maxrss - VmRSS (upper bound)"
            self.reset = reset

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        hwm = _status_mb("VmHWM") if self.reset else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return max(hwm - self.base, 0.0)


# --------------------------------------------------------------------------- worker


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def worker(impl: str, settings_dict: dict, out_path: str, connection) -> None:
    """Subprocess body for one impl: build the inputs, start the peak-memory count, then serve the
    parent's commands: ``"run"`` (one timed forward + backward; answers its seconds) until ``"finish"``
    (``torch.save`` the peak and the last run's loss and gradients to ``out_path``; answers "done")."""
    settings = Settings(**settings_dict)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    inputs = make_inputs(settings)
    memory = PeakMemory(device)
    connection.send("ready")
    result: dict[str, Tensor | float] = {}
    while connection.recv() == "run":
        result.clear()  # free the previous run's gradients before the next run
        _synchronise(device)
        start = time.perf_counter()
        result.update(forward_backward(impl, inputs, settings))
        _synchronise(device)
        connection.send(time.perf_counter() - start)
    record = {"peak_mb": memory.peak_mb(), "peak_measured_as": memory.method, "threads": torch.get_num_threads(),
              "loss": float(result["loss"])}
    if "positive_ratio" in result:
        record["positive_ratio"] = result["positive_ratio"]
    tensors = {key: value.cpu() for key, value in result.items() if isinstance(value, Tensor)}
    torch.save({"record": record, "tensors": tensors}, out_path)
    connection.send("done")


class Worker:
    """A :func:`worker` process for one impl, spawned fresh (no memory inherited from the parent)."""

    def __init__(self, impl: str, settings: Settings, scratch: Path):
        self.impl, self.error = impl, None
        self.out_path = scratch / f"{settings.metric}-{impl.replace(':', '-')}.pt"
        context = mp.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=worker, args=(impl, asdict(settings), str(self.out_path), child))
        self.process.start()
        child.close()
        self._receive()

    def _receive(self):
        try:
            return self.connection.recv()
        except EOFError:  # the process died
            self.process.join()
            code = self.process.exitcode
            self.error = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            if code == -9:
                self.error += " (probably out of memory)"
            return None

    def run(self) -> float | None:
        """One timed forward + backward; None once the process has died."""
        if self.error:
            return None
        self.connection.send("run")
        return self._receive()

    def finish(self) -> tuple[dict, dict[str, Tensor] | None]:
        """The record (peak, loss, ...) and the last run's tensors; an error record if it died."""
        if not self.error:
            self.connection.send("finish")
            self._receive()
        self.process.join()
        if self.error or not self.out_path.exists():
            return {"error": self.error or f"exit code {self.process.exitcode}"}, None
        saved = torch.load(self.out_path, weights_only=True)
        self.out_path.unlink()
        return saved["record"], saved["tensors"]


def measure(impls: list[str], settings: Settings, scratch: Path) -> dict[str, tuple[dict, dict[str, Tensor] | None]]:
    """Start one :class:`Worker` per impl, then run them in turn (``impl 1, impl 2, impl 1, ...``) so
    that all impls see the same machine load; only one runs at a time. Warm-up runs are not timed."""
    workers = {}
    for impl in impls:
        if impl == "dense" and settings.device == "cpu":
            available = available_gb()
            note = f", {available:.1f} GiB available now" if available is not None else ""
            print(f"  dense: estimated peak about {estimate_dense_gb(settings):.1f} GiB{note}", flush=True)
        workers[impl] = Worker(impl, settings, scratch)
    seconds: dict[str, list[float]] = {impl: [] for impl in impls}
    loads: dict[str, list[float | None]] = {impl: [] for impl in impls}
    for index in range(settings.warmup + settings.repeats):
        kind = "warm-up" if index < settings.warmup else "timed"
        for impl, runner in workers.items():
            time.sleep(IDLE_SECONDS)  # let the previous worker's OpenMP threads stop spinning
            loads[impl].append(_load_average())
            elapsed = runner.run()
            if elapsed is None:
                print(f"  {impl}: {runner.error}", flush=True)
                continue
            print(f"  {impl}: {kind} run {elapsed:.2f} s", flush=True)
            if index >= settings.warmup:
                seconds[impl].append(elapsed)
    results = {}
    for impl, runner in workers.items():
        record, tensors = runner.finish()
        if "error" not in record:
            record = {"seconds": statistics.median(seconds[impl]), "all_seconds": seconds[impl], **record,
                      "load_average": [min(v for v in loads[impl] if v is not None) if any(loads[impl]) else None,
                                       max(v for v in loads[impl] if v is not None) if any(loads[impl]) else None]}
        results[impl] = (record, tensors)
    return results


# --------------------------------------------------------------------------- comparison and report


def rel_diff(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max(max|a|, max|b|)`` in float64 (0 for two zero tensors)."""
    a, b = a.double(), b.double()
    scale = max(a.abs().max().item(), b.abs().max().item())
    return 0.0 if scale == 0 else (a - b).abs().max().item() / scale


def estimate_dense_gb(settings: Settings) -> float:
    """Rough peak of the dense impl: ``DENSE_MATRICES`` N x M float32 matrices (one pair at a time)."""
    if settings.part == "aggregate":
        return 5 * settings.pixels**2 * 4 / 2**30
    return DENSE_MATRICES * settings.pixels**2 * 4 / 2**30


def available_gb() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def benchmark(impls: list[str], settings: Settings) -> dict:
    """Measure every impl; ratios and relative differences against the first one."""
    with tempfile.TemporaryDirectory(prefix="bench-association-") as scratch:
        measured = measure(impls, settings, Path(scratch))
    records = {impl: record for impl, (record, _) in measured.items()}
    tensors = {impl: values for impl, (_, values) in measured.items()}
    reference = impls[0]
    result: dict = dict(records)
    ratios: dict[str, dict[str, float]] = {}
    diffs: dict[str, dict[str, float]] = {}
    for impl in impls[1:]:
        if tensors[impl] is None or tensors[reference] is None:
            continue
        ratios[f"{impl}/{reference}"] = {key: records[impl][key] / records[reference][key]
                                         for key in ("seconds", "peak_mb") if records[reference][key] > 0}
        diffs[impl] = {key: rel_diff(tensors[impl][key], tensors[reference][key]) for key in tensors[impl]}
    result["ratios"] = ratios
    result["rel_diff"] = diffs
    compared = [value for per_impl in diffs.values() for value in per_impl.values()]
    result["max_rel_diff"] = max(compared) if compared else None
    result["settings"] = {**asdict(settings), "impls": impls, "torch": torch.__version__}
    return result


def print_table(result: dict, settings: Settings) -> None:
    what = "association loss" if settings.part == "loss" else "spatial aggregation"
    n = settings.pixels
    aggregate = f", aggregate {'on' if settings.aggregate else 'off'}" if settings.part == "loss" else ""
    records = [record for record in result.values() if isinstance(record, dict) and "threads" in record]
    threads = records[0]["threads"] if records else "?"
    print(f"\n{what}, metric {settings.metric}, {settings.height}x{settings.width} (N = M = {n}), "
          f"C = {settings.channels}, batch {settings.batch}{aggregate}, {settings.device}, {threads} threads, "
          f"forward + backward, median of {settings.repeats} after {settings.warmup} warm-up")
    print(f"{'impl':<26}{'seconds':>10}{'peak MB':>11}  notes")
    impls = result["settings"]["impls"]
    for impl in impls:
        record = result[impl]
        if "error" in record:
            print(f"{impl:<26}{'-':>10}{'-':>11}  {record['error']}")
            continue
        notes = [f"positive ratio {record['positive_ratio']:.2f}"] if "positive_ratio" in record else []
        if None not in record["load_average"]:
            notes.append("load average %.1f-%.1f" % tuple(record["load_average"]))
        note = ", ".join(notes)
        print(f"{impl:<26}{record['seconds']:>10.2f}{record['peak_mb']:>11.0f}  {note}")
    for name, ratio in result["ratios"].items():
        print(f"{name:<26}{ratio.get('seconds', float('nan')):>10.3f}{ratio.get('peak_mb', float('nan')):>11.3f}")
    for impl, diffs in result["rel_diff"].items():
        parts = ", ".join(f"{key} {value:.1e}" for key, value in diffs.items())
        print(f"max_rel_diff {impl} vs {impls[0]}: {max(diffs.values()):.1e} ({parts})")
    if impls and "error" not in result[impls[0]]:
        print(f"peak measured as {result[impls[0]]['peak_measured_as']}")


# --------------------------------------------------------------------------- bf16 flips


def flip_rates(impl: str, settings: Settings, seeds: int) -> dict:
    """How often reduced precision changes the cycles, per variant: ``{"bfloat16 products": ..., "bfloat16
    inputs": ...}``, each ``{"j", "i_prime", "cycle", "positive", "loss_rel_diff"}`` as ``{"mean", "min",
    "max"}`` over ``seeds`` seeds (see the module docstring)."""
    from plca.losses.association import associate

    def run(source: Tensor, target: Tensor, labels: Tensor, similarity_dtype: str):
        with torch.no_grad():
            out = associate(source, target, labels, settings.metric, settings.aggregate, settings.alpha,
                            impl=impl.partition(":")[0], similarity_dtype=similarity_dtype)
        positive = labels.reshape(labels.shape[0], -1).gather(1, out.i_prime.clamp(min=0))
        positive = positive == labels.reshape(labels.shape[0], -1)
        return out, positive

    samples: dict[str, dict[str, list[float]]] = {}
    for seed in range(settings.seed, settings.seed + seeds):
        inputs = make_inputs(Settings(**{**asdict(settings), "seed": seed}))
        source, target, labels = inputs["source"].detach(), inputs["target"].detach(), inputs["labels"]
        valid = labels.reshape(labels.shape[0], -1) != IGNORE_INDEX
        count = max(int(valid.sum()), 1)
        reference, reference_positive = run(source, target, labels, "float32")
        variants = {
            "bfloat16 products": run(source, target, labels, "bfloat16"),
            "bfloat16 inputs": run(source.bfloat16(), target.bfloat16(), labels, "float32"),
        }
        for name, (out, positive) in variants.items():
            j = (out.j != reference.j) & valid
            i_prime = (out.i_prime != reference.i_prime) & valid
            changed_positive = (positive != reference_positive) & valid
            values = {"j": j, "i_prime": i_prime, "cycle": j | i_prime, "positive": changed_positive}
            record = samples.setdefault(name, {key: [] for key in (*values, "loss_rel_diff")})
            for key, flags in values.items():
                record[key].append(int(flags.sum()) / count)
            scale = max(abs(reference.loss.item()), 1e-30)
            record["loss_rel_diff"].append(abs(out.loss.item() - reference.loss.item()) / scale)
    return {name: {key: {"mean": statistics.fmean(v), "min": min(v), "max": max(v)} for key, v in record.items()}
            for name, record in samples.items()}


def print_flips(result: dict, settings: Settings, seeds: int) -> None:
    aggregate = "on" if settings.aggregate else "off"
    print(f"\nbfloat16 against float32, metric {settings.metric}, {settings.inputs} inputs, {settings.height}x"
          f"{settings.width} (N = M = {settings.pixels}), C = {settings.channels}, aggregate {aggregate}, "
          f"{seeds} seeds: share of valid source pixels that change (mean [min, max])")
    print(f"{'variant':<20}{'j(i)':>27}{'i_prime(i)':>27}{'either':>27}{'positive':>27}{'loss rel diff':>16}")
    for name, record in result.items():
        cells = [f"{record[key]['mean']:.4f} [{record[key]['min']:.4f}, {record[key]['max']:.4f}]"
                 for key in ("j", "i_prime", "cycle", "positive")]
        print(f"{name:<20}" + "".join(f"{cell:>27}" for cell in cells) + f"{record['loss_rel_diff']['mean']:>16.1e}")


# --------------------------------------------------------------------------- command line


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HxW, got {text!r}") from None
    return height, width


def parse_impls(text: str) -> list[str]:
    impls = [impl.strip() for impl in text.split(",") if impl.strip()]
    unknown = [impl for impl in impls if impl not in IMPL_CHOICES]
    if unknown or not impls:
        raise argparse.ArgumentTypeError(f"impls must be a comma-separated subset of {IMPL_CHOICES}, got {text!r}")
    return impls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=(92, 183),
                        help="HxW of both source and target maps (default 92x183, the 1/8 map of 730x1460)")
    parser.add_argument("--channels", type=int, default=2048, help="feature channels for cos (default 2048)")
    parser.add_argument("--classes", type=int, default=19,
                        help="classes: the channels of the kl probabilities and the label range (default 19)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--metric", choices=["cos", "kl", "both"], default="both")
    parser.add_argument("--aggregate", action=argparse.BooleanOptionalAction, default=True,
                        help="spatial aggregation of the target before the association (default on)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--part", choices=["loss", "aggregate", "flips"], default="loss",
                        help="the whole association loss, spatial aggregation alone, or how often bfloat16 "
                             "changes the cycles (no timing)")
    parser.add_argument("--similarity-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="precision of the products in the loss and aggregation parts (default float32)")
    parser.add_argument("--reduction", choices=["pooled", "pairs"], default="pooled",
                        help="batch reduction of the loss (default pooled, the reference's)")
    parser.add_argument("--inputs", choices=["random", "structured"], default="random",
                        help="inputs of --part flips: Gaussian, or the class maps of the loss part (default random)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of --part flips (default 5)")
    parser.add_argument("--impls", type=parse_impls, default=["dense", "efficient"],
                        help=f"comma-separated, first one is the reference; from {', '.join(IMPL_CHOICES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.seeds < 1:
        parser.error("--repeats and --seeds must be >= 1 and --warmup >= 0")

    metrics = ["cos", "kl"] if args.metric == "both" else [args.metric]
    results = {}
    for metric in metrics:
        settings = Settings(part=args.part, metric=metric, height=args.size[0], width=args.size[1],
                            channels=args.channels if metric == "cos" else args.classes, classes=args.classes,
                            batch=args.batch, aggregate=args.aggregate, alpha=args.alpha, repeats=args.repeats,
                            warmup=args.warmup, device=args.device, threads=args.threads, seed=args.seed,
                            similarity_dtype=args.similarity_dtype, reduction=args.reduction,
                            inputs=args.inputs if args.part == "flips" else "structured")
        print(f"{metric}: {settings.part}, {settings.height}x{settings.width}, C = {settings.channels}", flush=True)
        if settings.part == "flips":
            if settings.threads:
                torch.set_num_threads(settings.threads)
            results[metric] = flip_rates(args.impls[0], settings, args.seeds)
            print_flips(results[metric], settings, args.seeds)
        else:
            results[metric] = benchmark(args.impls, settings)
            print_table(results[metric], settings)
        sys.stdout.flush()
    if args.json:
        payload = results[metrics[0]] if len(metrics) == 1 else results
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
