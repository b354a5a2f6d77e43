"""Memory of the training data stream over a long run: RSS and PSS of the training process and its
DataLoader worker processes, sampled every few batches, on the embedded synthetic data.

    python bench/loader_memory.py                                  # data/synthetic (generated if missing), 2 workers
    python bench/loader_memory.py --batches 20000 --workers 4 --batch 8 --crop 128 256
    python bench/loader_memory.py --data-root /tmp/tiny --generate 32 --batches 600   # small and quick

The data is read exactly as training reads it (``build_dataset`` + ``batch_stream``, augmentation
on, epochs repeating, the same worker processes throughout). The memory after a warm-up
(``--warmup``, a fraction of the batches) is compared with the memory at the end: a leak (a
cache that keeps every decoded image, a list that grows per sample, Python objects of the dataset
copied page by page into each worker) shows as growth. RSS counts pages shared between the
processes once per process; PSS divides them between the processes that share them, so the PSS
total is the memory the stream really uses. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _kib(path: Path, field: str) -> int:
    """A ``kB`` field of a /proc file (``VmRSS`` of status, ``Pss`` of smaps_rollup); 0 if unreadable."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def child_pids(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (the DataLoader workers of the training process)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return sorted(children)


def memory_sample(pid: int | None = None) -> dict:
    """RSS and PSS (MiB) of process ``pid`` (default: this one) and of each of its child processes."""
    pid = os.getpid() if pid is None else pid
    workers = child_pids(pid)

    def of(p: int) -> tuple[float, float]:
        return (_kib(Path(f"/proc/{p}/status"), "VmRSS") / 1024, _kib(Path(f"/proc/{p}/smaps_rollup"), "Pss") / 1024)

    main_rss, main_pss = of(pid)
    worker_mem = [of(p) for p in workers]
    return {
        "main_rss": main_rss, "main_pss": main_pss,
        "workers": len(workers),
        "workers_rss": sum(rss for rss, _ in worker_mem), "workers_pss": sum(pss for _, pss in worker_mem),
        "total_rss": main_rss + sum(rss for rss, _ in worker_mem),
        "total_pss": main_pss + sum(pss for _, pss in worker_mem),
    }


def measure(dataset, batches: int, batch_size: int, workers: int, every: int, seed: int = 0,
            progress: bool = False) -> list[dict]:
    """Memory samples (see :func:`memory_sample`, plus ``batch`` and ``seconds``) taken every ``every``
    batches while streaming ``batches`` batches of ``dataset`` as training does."""
    from plca.engine.loader import batch_stream

    samples, start = [], time.perf_counter()
    with batch_stream(dataset, batch_size, seed, num_workers=workers) as stream:
        for index in range(1, batches + 1):
            batch = next(stream)
            del batch
            if index % every == 0 or index == batches:
                samples.append({"batch": index, "seconds": time.perf_counter() - start, **memory_sample()})
                if progress:
                    last = samples[-1]
                    print(f"  batch {index:7d}  main RSS {last['main_rss']:8.1f} MiB  workers RSS "
                          f"{last['workers_rss']:8.1f} MiB ({last['workers']})  total PSS "
                          f"{last['total_pss']:8.1f} MiB", flush=True)
    return samples


def growth(samples: list[dict], warmup: float, key: str = "total_pss") -> dict:
    """Memory at the end of the warm-up (the first sample at or after ``warmup`` of the batches) and
    at the end, and the difference (MiB)."""
    last = samples[-1]
    first = next(s for s in samples if s["batch"] >= warmup * last["batch"])
    return {"key": key, "after_warmup": first[key], "end": last[key], "growth": last[key] - first[key],
            "from_batch": first["batch"], "to_batch": last["batch"]}


def build(data_root: Path, generate: int | None, crop: tuple[int, int], on_error: str = "raise"):
    from plca.data.datasets import build_dataset
    from plca.data.synthetic import SYNTHETIC_CLASSES, ensure_generated
    from plca.data.transforms import TrainTransform

    if generate is not None:
        ensure_generated(data_root, n_train=generate, n_val=1, height=64, width=128)
    transform = TrainTransform(crop_size=crop, shorter_side=(min(crop), 2 * min(crop)), flip=True)
    # the folder format: "synthetic" would insist on the demo's generation parameters
    return build_dataset("folder", data_root, "source_train", SYNTHETIC_CLASSES, transform, on_error=on_error)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--generate", type=int, metavar="N",
                        help="generate N small (64 x 128) scenes in --data-root if it is not there "
                             "(default: the demo's 600 scenes of 128 x 256)")
    parser.add_argument("--batches", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--crop", type=int, nargs=2, default=[96, 96], metavar=("H", "W"))
    parser.add_argument("--every", type=int, default=250, help="sample the memory every this many batches")
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the batches before the baseline")
    parser.add_argument("--max-growth-mib", type=float, default=32.0,
                        help="exit status 1 if the total PSS grows more than this after the warm-up")
    parser.add_argument("--json", help="also write the samples and the verdict to this file")
    args = parser.parse_args()
    if args.generate is None and not (args.data_root / "meta.json").is_file():
        from plca.data.synthetic import ensure_generated

        print(f"generating the synthetic data in {args.data_root} ...", flush=True)
        ensure_generated(args.data_root)
    dataset = build(args.data_root, args.generate, tuple(args.crop))
    print(f"{len(dataset)} images, {args.batches} batches of {args.batch}, {args.workers} worker(s), "
          f"crop {args.crop[0]}x{args.crop[1]} (about {args.batches * args.batch / len(dataset):.1f} epochs)")
    samples = measure(dataset, args.batches, args.batch, args.workers, args.every, progress=True)
    verdicts = {key: growth(samples, args.warmup, key) for key in ("total_pss", "total_rss", "main_rss")}
    for key, verdict in verdicts.items():
        print(f"{key:10s} after warm-up (batch {verdict['from_batch']}) {verdict['after_warmup']:8.1f} MiB, "
              f"at the end (batch {verdict['to_batch']}) {verdict['end']:8.1f} MiB: "
              f"growth {verdict['growth']:+.1f} MiB")
    flat = verdicts["total_pss"]["growth"] <= args.max_growth_mib
    print(f"{'FLAT' if flat else 'GROWING'}: total PSS growth {verdicts['total_pss']['growth']:+.1f} MiB "
          f"(limit {args.max_growth_mib} MiB); {samples[-1]['seconds']:.1f} s, "
          f"{args.batches * args.batch / samples[-1]['seconds']:.0f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                               "samples": samples, "growth": verdicts, "flat": flat}, indent=2))
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
