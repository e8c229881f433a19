"""Data-pipeline throughput at the paper's 128^3: training transforms per core, loader with workers.

(a) transforms: the paper's augmentation (medexp.data.augment.random_affine with conf/augment/paper.yaml's
    settings: MONAI RandAffined, p=0.8) on 128^3 volumes, one thread, in this process, on the items a
    training loader's cache holds (float32 image, uint8 label, MetaTensors). Also at p=1 (every case
    resampled: the worst case) and through medexp.data.loaders.DeviceAugment with device=cpu (the code
    path of trainer.augment_on_device=true, run on the CPU).
(b) loader: medexp.data.loaders.make_loader over cases written as .npy files (the preprocessing cache's
    format), batch 1, with 0, 1, 2, ... workers: cases per second over whole epochs after a warm-up epoch
    (worker start and the cache fill are not timed).

Both CPU time and wall time are reported, with the load average before and after each section: on a shared
machine the wall time depends on what else runs, while CPU seconds per case (time.process_time for (a);
utime + stime of this process and its worker processes from /proc for (b)) measure the work itself.
"Cases per second per core" is 1 / (CPU seconds per case).

Usage:  python scripts/bench_data.py                       (128^3, 16 cases per variant, workers 0,1,2)
        python scripts/bench_data.py --size 64 --cases 4 --workers 0,1 --epochs 1
Prints a table, then one key=value line per figure.
"""

from __future__ import annotations

from medexp.run import runtime  # noqa: I001 - the trainer's process settings, before torch loads

runtime.configure()

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.data import MetaTensor  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from medexp.data.augment import random_affine  # noqa: E402
from medexp.data.loaders import DeviceAugment, make_loader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def paper_settings() -> dict:
    """The settings of conf/augment/paper.yaml (prob, rotate_deg, shift, scale), without its _target_."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "augment" / "paper.yaml"))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def load_average() -> float:
    """The 1-minute load average (as `uptime` prints it)."""
    return os.getloadavg()[0]


def synthetic_case(size: int, seed: int, num_classes: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """A (1, s, s, s) float32 image and a (1, s, s, s) uint8 label map of `num_classes` nested shells."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    radius = np.sqrt(grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None, :] ** 2)
    label = np.clip((radius * num_classes / 1.8).astype(np.uint8), 0, num_classes - 1)
    image = label.astype(np.float32) / num_classes + rng.normal(0, 0.1, label.shape).astype(np.float32)
    return image[None], label[None]


def _item(size: int, seed: int) -> dict:
    image, label = synthetic_case(size, seed)
    return {"image": MetaTensor(torch.from_numpy(image)), "label": MetaTensor(torch.from_numpy(label))}


def transform_section(size: int, cases: int) -> tuple[list[str], dict[str, float]]:
    """(a): seconds per case of the augmentation on one thread, CPU and wall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = paper_settings()
    shape = [size] * 3
    items = [_item(size, i) for i in range(min(cases, 4))]
    variants = {
        f"random_affine p={settings['prob']}": random_affine(3, shape, **settings),
        "random_affine p=1": random_affine(3, shape, **{**settings, "prob": 1.0}),
    }
    rows, keys = [], {}
    try:
        for name, transforms in variants.items():
            transforms[0].set_random_state(seed=0)
            transforms[0](items[0])  # warm-up: first-call allocations
            load = load_average()
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(cases):
                for t in transforms:
                    t(items[i % len(items)])
            cpu, wall = (time.process_time() - cpu) / cases, (time.perf_counter() - wall) / cases
            rows.append(_row(name, cpu, wall, load, load_average()))
            tag = "p1" if "p=1" in name else "paper"
            keys |= {f"transform_{tag}_cpu_s_per_case": cpu, f"transform_{tag}_wall_s_per_case": wall}
            keys[f"transform_{tag}_cases_per_s_per_core"] = 1.0 / cpu
        # the same transforms on a batch "on the device" (here: the CPU), as trainer.augment_on_device runs
        augment = DeviceAugment(random_affine(3, shape, **settings, device="cpu"), seed=0)
        image = torch.stack([it["image"].as_subclass(torch.Tensor) for it in items[:1]])  # (1, 1, *S)
        label = torch.stack([it["label"].as_subclass(torch.Tensor) for it in items[:1]])
        augment(image, label)
        load = load_average()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(cases):
            augment(image, label)
        cpu, wall = (time.process_time() - cpu) / cases, (time.perf_counter() - wall) / cases
        rows.append(_row("DeviceAugment on cpu", cpu, wall, load, load_average()))
        keys |= {"device_augment_cpu_s_per_case": cpu, "device_augment_cases_per_s_per_core": 1.0 / cpu}
    finally:
        torch.set_num_threads(threads)
    return rows, keys


def _row(name: str, cpu: float, wall: float, load0: float, load1: float, extra: str = "") -> str:
    return (
        f"| {name} | {extra}{1e3 * cpu:.0f} ms | {1e3 * wall:.0f} ms | {1 / cpu:.2f} | {1 / wall:.2f} | "
        f"{load0:.2f} -> {load1:.2f} |"
    )


def _cpu_seconds_of(pid: int) -> float:
    """utime + stime of one process (all its threads) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def process_tree_cpu_seconds() -> float:
    """CPU seconds of this process and its live children (the loader's workers)."""
    me = os.getpid()
    return _cpu_seconds_of(me) + sum(_cpu_seconds_of(c) for c in _children(me) if Path(f"/proc/{c}").exists())


def write_cases(folder: Path, size: int, count: int) -> list[dict]:
    """`count` cases as channel-first .npy files (the preprocessing cache's format): make_loader's input."""
    cases = []
    for i in range(count):
        image, label = synthetic_case(size, i)
        np.save(folder / f"case{i}_image.npy", image)
        np.save(folder / f"case{i}_label.npy", label)
        cases.append(
            {
                "id": f"case{i}",
                "image": str(folder / f"case{i}_image.npy"),
                "label": str(folder / f"case{i}_label.npy"),
            }
        )
    return cases


def loader_throughput(
    cases: list[dict], size: int, workers: int, epochs: int, batch_size: int = 1, pin_memory: bool = False
) -> dict[str, float]:
    """Cases per second (wall) and CPU seconds per case of make_loader with the paper's augmentation over
    `epochs` epochs after one untimed warm-up epoch."""
    augmentation = random_affine(3, [size] * 3, **paper_settings())
    loader = make_loader(
        cases,
        batch_size=batch_size,
        train=True,
        augmentation=augmentation,
        num_workers=workers,
        pin_memory=pin_memory,
    )
    for _ in loader:  # warm-up: workers start (persistent), first batches
        pass
    load = load_average()
    cpu, wall = process_tree_cpu_seconds(), time.perf_counter()
    seen = 0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch + 1)
        for batch in loader:
            seen += batch["image"].shape[0]
    cpu, wall = process_tree_cpu_seconds() - cpu, time.perf_counter() - wall
    del loader  # ends persistent workers
    return {
        "cases_per_s": seen / wall,
        "cpu_s_per_case": cpu / seen,
        "wall_s_per_case": wall / seen,
        "load_before": load,
        "load_after": load_average(),
    }


def loader_section(size: int, cases: int, worker_counts: list[int], epochs: int) -> tuple[list[str], dict]:
    """(b): make_loader over `cases` .npy cases with each worker count."""
    rows, keys = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        items = write_cases(Path(tmp), size, cases)
        for workers in worker_counts:
            r = loader_throughput(items, size, workers, epochs)
            rows.append(
                _row(
                    f"make_loader, {workers} workers",
                    r["cpu_s_per_case"],
                    r["wall_s_per_case"],
                    r["load_before"],
                    r["load_after"],
                )
            )
            keys[f"loader_w{workers}_cases_per_s"] = r["cases_per_s"]
            keys[f"loader_w{workers}_cpu_s_per_case"] = r["cpu_s_per_case"]
    return rows, keys


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="volume size per axis (128: the paper)")
    parser.add_argument("--cases", type=int, default=16, help="cases per transform variant and per loader")
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts, comma-separated")
    parser.add_argument("--epochs", type=int, default=2, help="timed loader epochs (after a warm-up one)")
    parser.add_argument("--sections", default="transform,loader")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    print(
        f"# bench_data: {args.size}^3, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    rows = [
        "| variant | CPU per case | wall per case | cases/s per core (CPU) | cases/s (wall) | load 1 min |",
        "|---|---|---|---|---|---|",
    ]
    keys: dict[str, float] = {}
    if "transform" in sections:
        r, k = transform_section(args.size, args.cases)
        rows, keys = rows + r, keys | k
    if "loader" in sections:
        workers = [int(w) for w in args.workers.split(",") if w != ""]
        r, k = loader_section(args.size, args.cases, workers, args.epochs)
        rows, keys = rows + r, keys | k
    print("\n".join(rows))
    print("(loader rows: CPU of the whole process tree, so 'per core' there is cases per CPU-second)")
    for key, value in keys.items():
        print(f"{key}={value:.4g}")
    return keys


if __name__ == "__main__":
    main()
