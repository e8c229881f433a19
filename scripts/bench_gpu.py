"""The paper's setup on one GPU, end to end in at most 8 minutes: step times and peak memory at 128^3, the
data pipeline with the default workers, a 30-epoch run, and the GPU-hours of the 225-model study.

Sections, each skipped (and said so) when the time budget (--budget-s) would run out:

(a) steps: one training step of the paper's network (1 channel, 20 classes, batch 1, 128^3, PCC loss, Nadam)
    as the trainer runs it (medexp.run.steps.train_epoch and numerics: channels-last, cudnn.benchmark with
    fixed shapes), for conventional / mixed / Gabor kernels in float32 and bf16 autocast, and the
    conventional model with the NeRDc and NeRDm heads in float32. Median of the timed steps after warm-up
    steps (which include kernel.impl=auto's timing and cuDNN's algorithm search), CUDA-synchronised; peak
    memory (torch.cuda.max_memory_allocated) of the timed steps and of the warm-up; the impl each Gabor
    layer ran (layer.used_impl); the forward alone under no_grad (what validation costs per case).
(b) data: the paper's augmentation per core (scripts/bench_data.py's transform section, one thread), the
    training loader (make_loader, 128^3 .npy cases) with trainer.num_workers=auto as it resolves on this
    machine and pin_memory, and the augmentation on the GPU (DeviceAugment, trainer.augment_on_device);
    from them the cores each model needs to keep a GPU busy: (1 / step time) / (cases per second per core).
(c) run: `medexp train kernel=mixed trainer.max_epochs=30` on the demo data in a scratch folder (its own
    MLflow store): wall time and test Dice.
(d) study: GPU-hours of the 225-model grid (3 kernels x 3 losses x 5 learning rates x 5 splits) at 300
    epochs, as the paper trains it: 2 GPUs x batch 1, 43 cases split 60/10/30 (medexp.data.splits: 26
    train, 4 validation, 13 test), so 13 steps per GPU per epoch plus validating 4 cases on one GPU; the
    loss changes the step time little, so each kernel's fp32 step time stands for its 75 models.

It installs nothing and needs only what `make install` put in .venv. `--dry-run` runs every section on
the CPU with tiny shapes (16^3, 1 epoch) in under a minute: tests/test_bench_gpu.py runs it.

Usage:  .venv/bin/python scripts/bench_gpu.py [--out DIR]        (on the GPU machine; DIR or $OUT gets
        .venv/bin/python scripts/bench_gpu.py --dry-run           bench_gpu.json and bench_gpu.txt)
Prints a table, then one key=value line per figure.
"""

from __future__ import annotations

from medexp.run import runtime  # noqa: I001 - the trainer's process settings, before torch loads

runtime.configure()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import bench_data  # noqa: E402 - scripts/ is on sys.path when this file runs as a script
import torch  # noqa: E402
import yaml  # noqa: E402

from medexp.data.augment import random_affine  # noqa: E402
from medexp.data.loaders import DeviceAugment, auto_num_workers  # noqa: E402
from medexp.losses import PCCLoss  # noqa: E402
from medexp.nn.heads import NeRDcHead, NeRDmHead, PlainHead  # noqa: E402
from medexp.nn.kernels import ConventionalKernels, GaborKernels, MixedKernels  # noqa: E402
from medexp.nn.wong import WongNet  # noqa: E402
from medexp.run.dist import DistContext  # noqa: E402
from medexp.run.steps import numerics, train_epoch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"conventional": ConventionalKernels, "mixed": MixedKernels, "gabor": GaborKernels}
HEADS = {"plain": PlainHead, "nerdc": NeRDcHead, "nerdm": NeRDmHead}
# (kernel, head, precision) of section (a)
STEP_CONFIGS = [(k, "plain", p) for p in ("32", "bf16") for k in KERNELS] + [
    ("conventional", "nerdc", "32"),
    ("conventional", "nerdm", "32"),
]
# The paper's study (Wong & Moradi 3.1): 43 cases, 60/10/30 splits, 2 GPUs x batch 1, 300 epochs, 225 models
STUDY = dict(cases=43, train=26, val=4, gpus=2, epochs=300, models_per_kernel=75)


class Budget:
    """Seconds left before --budget-s is spent; sections check it before they start."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Bar:
    def step(self, loss: float) -> None:
        pass


def step_row(kernel, head, precision, size, device, warmup, reps) -> dict:
    """(a) for one configuration."""
    torch.manual_seed(0)
    net = WongNet(1, 20, kernel=KERNELS[kernel](), head=HEADS[head]).to(device)
    steps = numerics(precision, channels_last=True, spatial_dims=3, device=device, fixed_shapes=True)
    net = net.to(memory_format=steps.memory_format)
    optimizer = torch.optim.NAdam(net.parameters(), lr=1e-3)
    batch = {
        "image": torch.randn(1, 1, size, size, size, device=device),
        "label": torch.randint(0, 20, (1, 1, size, size, size), device=device),
    }
    loss_fn, ctx = PCCLoss(), DistContext(device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    train_epoch(net, [batch] * warmup, loss_fn, optimizer, steps, ctx, _Bar())
    synchronize(device)
    warmup_s = time.perf_counter() - start
    warmup_peak = torch.cuda.max_memory_allocated(device) if cuda else math.nan
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        train_epoch(net, [batch], loss_fn, optimizer, steps, ctx, _Bar())  # ends with loss.item(): synced
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else math.nan
    net.eval()
    with torch.no_grad(), steps.autocast():
        net(batch["image"].contiguous(memory_format=steps.memory_format))
        synchronize(device)
        start = time.perf_counter()
        net(batch["image"].contiguous(memory_format=steps.memory_format))
        synchronize(device)
        infer_s = time.perf_counter() - start
    impls = {name: m.used_impl for name, m in net.named_modules() if getattr(m, "used_impl", None)}
    return dict(
        kernel=kernel,
        head=head,
        precision=precision,
        step_s=statistics.median(times),
        warmup_s=warmup_s,
        peak_gib=peak / 2**30,
        warmup_peak_gib=warmup_peak / 2**30,
        infer_s=infer_s,
        impls=impls,
    )


def step_section(args, device, budget: Budget) -> list[dict]:
    rows = []
    for kernel, head, precision in STEP_CONFIGS:
        if budget.left() < args.reserve_s:
            rows.append(dict(kernel=kernel, head=head, precision=precision, skipped="time budget"))
            continue
        try:
            rows.append(step_row(kernel, head, precision, args.size, device, args.warmup, args.reps))
        except torch.cuda.OutOfMemoryError as err:
            rows.append(dict(kernel=kernel, head=head, precision=precision, skipped=f"out of memory: {err}"))
            torch.cuda.empty_cache()
    return rows


def data_section(args, device, budget: Budget) -> dict:
    """(b): per-core augmentation, the loader with the default workers, the augmentation on the device."""
    out: dict = {}
    _, keys = bench_data.transform_section(args.size, args.transform_cases)
    out["transform_cases_per_s_per_core"] = keys["transform_paper_cases_per_s_per_core"]
    out["transform_cpu_s_per_case"] = keys["transform_paper_cpu_s_per_case"]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    workers = auto_num_workers(cpus, gpus, "cuda")  # what trainer.num_workers=auto gives on a GPU here
    out |= dict(cpus=cpus, gpus=gpus, auto_workers=workers)
    if budget.left() > args.reserve_s:
        with tempfile.TemporaryDirectory() as tmp:
            cases = bench_data.write_cases(Path(tmp), args.size, args.loader_cases)
            r = bench_data.loader_throughput(
                cases, args.size, workers, args.loader_epochs, pin_memory=device.type == "cuda"
            )
        out |= {f"loader_{k}": v for k, v in r.items()}
    settings = bench_data.paper_settings()
    augment = DeviceAugment(random_affine(3, [args.size] * 3, **settings, device=device), seed=0)
    image = torch.randn(1, 1, *[args.size] * 3, device=device)
    label = torch.randint(0, 20, (1, 1, *[args.size] * 3), device=device, dtype=torch.uint8)
    augment(image, label)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.transform_cases):
        augment(image, label)
    synchronize(device)
    out["device_augment_s_per_case"] = (time.perf_counter() - start) / args.transform_cases
    return out


def run_section(args, budget: Budget) -> dict:
    """(c): `medexp train kernel=mixed trainer.max_epochs=30` (dry run: 16^3, 1 epoch) in a scratch folder."""
    timeout = budget.left() - 10
    if timeout < 30:
        return {"skipped": "time budget"}
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "kernel=mixed",
            f"trainer.max_epochs={args.run_epochs}",
            "trainer.progress=false",
            f"tracking_uri=sqlite:///{tmp}/mlflow.db",
        ]
        if args.dry_run:
            overrides += [
                "dataset.shape=[16,16,16]",
                "dataset.num_cases=8",
                "eval.metrics=[dice]",
                "tracking.log_plots=false",
                "trainer.accelerator=cpu",
            ]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "medexp", "train", *overrides],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"skipped": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - start
        if proc.returncode:
            return {"failed": proc.stderr.strip().splitlines()[-1:] or ["?"], "wall_s": wall}
        results = sorted(Path(tmp).rglob("result.yaml"), key=lambda f: f.stat().st_mtime)
        result = yaml.safe_load(results[-1].read_text()) if results else {}
    return dict(
        command="medexp train " + " ".join(overrides[:3]),
        wall_s=wall,
        train_s=result.get("train_seconds"),
        test_dice=result.get("test", {}).get("test/dice_mean"),
    )


def study_estimate(rows: list[dict]) -> dict:
    """(d) GPU-hours of the 225-model study at 300 epochs from the fp32 plain-head step times."""
    steps_per_epoch = math.ceil(STUDY["train"] / STUDY["gpus"])  # per GPU, batch 1 each
    out, total = {"steps_per_gpu_per_epoch": steps_per_epoch}, 0.0
    for kernel in KERNELS:
        row = next(
            (
                r
                for r in rows
                if r.get("kernel") == kernel
                and r.get("head") == "plain"
                and r.get("precision") == "32"
                and "step_s" in r
            ),
            None,
        )
        if row is None:
            return out | {"skipped": f"no {kernel} step time"}
        epoch_s = steps_per_epoch * row["step_s"] + STUDY["val"] * row["infer_s"]
        gpu_hours = STUDY["gpus"] * STUDY["epochs"] * epoch_s / 3600  # both GPUs held for the whole epoch
        out[f"{kernel}_gpu_hours_per_model"] = gpu_hours
        total += STUDY["models_per_kernel"] * gpu_hours
    out["study_gpu_hours"] = total
    out["study_days_on_2_gpus"] = total / STUDY["gpus"] / 24
    return out


def report(env: dict, rows: list[dict], data: dict, run: dict, study: dict) -> tuple[str, dict]:
    lines = [
        f"# bench_gpu on {env['device_name']} (torch {env['torch']}, {env['cpus']} CPUs)",
        "",
        "| model | head | precision | step | vs conventional | peak memory | warm-up (peak) | "
        "forward, no grad | Gabor impls |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys: dict = {}
    base = {
        r["precision"]: r["step_s"]
        for r in rows
        if r.get("kernel") == "conventional" and r.get("head") == "plain" and "step_s" in r
    }
    for r in rows:
        name = f"{r['kernel']}_{r['head']}_{r['precision']}"
        if "step_s" not in r:
            lines.append(f"| {r['kernel']} | {r['head']} | {r['precision']} | skipped: {r['skipped']} |")
            continue
        ratio = r["step_s"] / base[r["precision"]] if r["precision"] in base else math.nan
        counts: dict = {}
        for impl in r["impls"].values():
            counts[impl] = counts.get(impl, 0) + 1
        impls = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "-"
        lines.append(
            f"| {r['kernel']} | {r['head']} | {r['precision']} | {1e3 * r['step_s']:.1f} ms | {ratio:.2f} | "
            f"{r['peak_gib']:.2f} GiB | {r['warmup_s']:.1f} s ({r['warmup_peak_gib']:.2f} GiB) | "
            f"{1e3 * r['infer_s']:.1f} ms | {impls} |"
        )
        keys |= {
            f"step_{name}_s": r["step_s"],
            f"step_{name}_vs_conventional": ratio,
            f"peak_{name}_gib": r["peak_gib"],
            f"infer_{name}_s": r["infer_s"],
        }
        if r["kernel"] != "conventional":
            keys[f"impls_{name}"] = impls
    keys |= {f"data_{k}": v for k, v in data.items()}
    per_core = data.get("transform_cases_per_s_per_core")
    for r in rows:
        if "step_s" in r and per_core and r["head"] == "plain":
            keys[f"cores_per_gpu_{r['kernel']}_{r['precision']}"] = 1 / r["step_s"] / per_core
    keys |= {f"run_{k}": v for k, v in run.items()}
    keys |= {f"study_{k}": v for k, v in study.items()}
    lines.append("")
    for key, value in keys.items():
        lines.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return "\n".join(lines), keys


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return dict(
        device_name=torch.cuda.get_device_name(device) if cuda else "CPU (dry run)",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cpus=os.cpu_count(),
        cudnn=torch.backends.cudnn.version() if cuda else None,
        memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        cudnn_tf32=torch.backends.cudnn.allow_tf32,
        matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks that it all runs")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting sections after this")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_gpu.json/.txt")
    parser.add_argument("--sections", default="steps,data,run")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    device = torch.device("cpu" if dry else "cuda")
    args.size, args.warmup, args.reps = (16, 1, 1) if dry else (128, 3, 5)
    args.transform_cases, args.loader_cases, args.loader_epochs = (2, 2, 1) if dry else (8, 16, 2)
    args.run_epochs, args.reserve_s = (1, 0.0) if dry else (30, 60.0)
    budget = Budget(args.budget_s)
    sections = args.sections.split(",")
    env = environment(device)
    rows = step_section(args, device, budget) if "steps" in sections else []
    data = data_section(args, device, budget) if "data" in sections else {}
    run = run_section(args, budget) if "run" in sections else {}
    study = study_estimate(rows) if rows else {}
    text, keys = report(env, rows, data, run, study)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_gpu.txt").write_text(text + "\n")
        payload = dict(environment=env, steps=rows, data=data, run=run, study=study, keys=keys)
        (out / "bench_gpu.json").write_text(json.dumps(payload, indent=1, default=str))
    return keys


if __name__ == "__main__":
    main()
