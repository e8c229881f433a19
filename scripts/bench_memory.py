"""Peak memory of a training step at the paper's 128^3 (batch 1, 1 channel, 20 classes, Nadam): computed
from the network on the meta device, and measured on the CPU.

(a) computed (medexp.nn.memory, seconds, no memory): parameters, gradients and Nadam's state; the
    activations autograd saves for backward; the high-water mark of all tensors over forward, loss,
    backward and optimiser step; FLOPs, memory traffic and operations, and from them an estimated GPU step
    time on a V100 16 GB and an H200 (medexp.nn.memory.gpu_step_seconds states the fractions of peak
    assumed).
(b) measured: each configuration in a fresh process (MEDEXP_NO_TUNE=1, so glibc hands freed large blocks
    back and the resident size follows the live bytes): peak resident set size (getrusage ru_maxrss)
    minus the resident size after the imports, over building the model and one training step.

Configurations: the three models with the plain head (Gabor layers with kernel.impl=direct, the path that
runs on a GPU without the FFT: its generated weight and F.conv3d), and the conventional model with each
head as medexp.nn.wong.WongNet runs it (NeRD heads through forward_levels: the concatenated 180-channel
full-size features are never built; positions evaluated in chunks), plus the NeRD heads without chunking
(computed only: ~15 GB).

Usage:  python scripts/bench_memory.py                        (computed and measured; ~5 min on 2 cores)
        python scripts/bench_memory.py --sections computed    (seconds)
        python scripts/bench_memory.py --size 32 --configs conventional,nerdc
Prints tables, then one key=value line per figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30


def _rss_bytes() -> int:
    """Resident set size of this process now (/proc/self/statm), in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def configs():
    """name -> (kernel factory class, kernel impl, head factory, network class)."""

    from medexp.nn.heads import NeRDcHead, NeRDmHead, PlainHead
    from medexp.nn.kernels import ConventionalKernels, GaborKernels, MixedKernels
    from medexp.nn.wong import WongNet

    unchunked = dict(chunk_bytes=None)
    return {
        "conventional": (ConventionalKernels, "auto", PlainHead, WongNet),
        "mixed": (MixedKernels, "direct", PlainHead, WongNet),
        "gabor": (GaborKernels, "direct", PlainHead, WongNet),
        "nerdc": (ConventionalKernels, "auto", NeRDcHead, WongNet),
        "nerdm": (ConventionalKernels, "auto", NeRDmHead, WongNet),
        "nerdc_unchunked": (ConventionalKernels, "auto", functools.partial(NeRDcHead, **unchunked), WongNet),
        "nerdm_unchunked": (ConventionalKernels, "auto", functools.partial(NeRDmHead, **unchunked), WongNet),
    }


MEASURED = ("conventional", "mixed", "gabor", "nerdc", "nerdm")


def build(name: str, size: int, device: str, classes: int = 20):
    """Model, input, target of a configuration on `device`, channels-last as the trainer runs it."""
    import torch

    kernel, impl, head, net_cls = configs()[name]
    with torch.device(device):
        net = net_cls(1, classes, kernel=kernel(impl=impl), head=head)
        x = torch.randn(1, 1, size, size, size)
        y = torch.randint(0, classes, (1, 1, size, size, size))
    cl = torch.channels_last_3d
    return net.to(memory_format=cl), x.contiguous(memory_format=cl), y


def computed(names: list[str], size: int) -> dict[str, dict]:
    """(a) on the meta device."""
    import torch

    from medexp.losses import PCCLoss
    from medexp.nn.memory import H200, V100, count_step, gpu_step_seconds

    out = {}
    for name in names:
        net, x, y = build(name, size, "meta")
        c = count_step(net, x, y, PCCLoss(), torch.optim.NAdam)
        out[name] = dict(
            params=c.param_bytes // 4,  # float32
            state_gib=(c.param_bytes + c.grad_bytes + c.optimizer_bytes) / GIB,
            saved_gib=c.saved_bytes / GIB,
            peak_gib=c.peak_bytes / GIB,
            gflop=c.flops / 1e9,
            traffic_gib=c.traffic_bytes / GIB,
            ops=c.ops,
            v100_s=gpu_step_seconds(c, V100),
            h200_s=gpu_step_seconds(c, H200),
            h200_bf16_s=gpu_step_seconds(c, H200, bf16=True),
        )
    return out


def measure_one(name: str, size: int) -> dict:
    """(b) in this process (started fresh by `measured`): RSS after imports, peak RSS of build + one step."""
    from medexp.run import runtime

    runtime.configure()  # MEDEXP_NO_TUNE=1 is set by the parent: leaves malloc as glibc has it
    import torch

    from medexp.losses import PCCLoss

    base = _rss_bytes()
    start = time.perf_counter()
    net, x, y = build(name, size, "cpu")
    optimizer = torch.optim.NAdam(net.parameters(), lr=1e-3)
    loss = PCCLoss()(net(x).float(), y)
    loss.backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {
        "base_gib": base / GIB,
        "peak_gib": peak / GIB,
        "step_gib": (peak - base) / GIB,
        "seconds": time.perf_counter() - start,
    }


def measured(names: list[str], size: int) -> dict[str, dict]:
    out = {}
    env = {**os.environ, "MEDEXP_NO_TUNE": "1"}
    for name in names:
        cmd = [sys.executable, __file__, "--measure-one", name, "--size", str(size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def report(comp: dict, meas: dict) -> dict[str, float]:
    keys: dict[str, float] = {}
    if comp:
        print(
            "| config | params+grads+Nadam | saved activations | computed peak | GFLOP/step | traffic | "
            "est. V100 step | est. H200 step (fp32 / bf16) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, c in comp.items():
            cells = [
                f"{1024 * c['state_gib']:.0f} MiB",
                f"{c['saved_gib']:.2f} GiB",
                f"{c['peak_gib']:.2f} GiB",
                f"{c['gflop']:.0f}",
                f"{c['traffic_gib']:.0f} GiB",
                f"{c['v100_s']:.3f} s",
                f"{c['h200_s']:.3f} / {c['h200_bf16_s']:.3f} s",
            ]
            print(f"| {name} | {' | '.join(cells)} |")
            for k, v in c.items():
                keys[f"computed_{name}_{k}"] = v
    if meas:
        print("\n| config | measured step (peak RSS - RSS after imports) | computed peak | wall |")
        print("|---|---|---|---|")
        for name, m in meas.items():
            c = comp.get(name, {}).get("peak_gib", float("nan"))
            print(f"| {name} | {m['step_gib']:.2f} GiB | {c:.2f} GiB | {m['seconds']:.0f} s |")
            keys[f"measured_{name}_step_gib"] = m["step_gib"]
    for source, table in (("computed", comp), ("measured", meas)):
        field = "peak_gib" if source == "computed" else "step_gib"
        plain = table.get("conventional", {}).get(field)
        for head in ("nerdc", "nerdm", "nerdc_unchunked", "nerdm_unchunked"):
            if plain and head in table:
                keys[f"{source}_{head}_vs_plain"] = table[head][field] / plain
    for key, value in keys.items():
        print(f"{key}={value:.4g}")
    return keys


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--sections", default="computed,measured")
    parser.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    parser.add_argument("--measure-one", default=None, help=argparse.SUPPRESS)  # the child of `measured`
    args = parser.parse_args(argv)
    if args.measure_one:
        print(json.dumps(measure_one(args.measure_one, args.size)))
        return {}
    names = args.configs.split(",") if args.configs else list(configs())
    sections = args.sections.split(",")
    print(
        f"# bench_memory: {args.size}^3, batch 1, 20 classes, Nadam; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    comp = computed(names, args.size) if "computed" in sections else {}
    meas = measured([n for n in names if n in MEASURED], args.size) if "measured" in sections else {}
    return report(comp, meas)


if __name__ == "__main__":
    main()
