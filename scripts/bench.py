"""Side-by-side speed benchmark: Gabor vs conventional convolutions, whole models, and the runner.

Every figure is measured in this one run, with the variants of a section interleaved (A B C A B C ...)
after a warm-up, and reported as the median over the repetitions; on a shared machine only the ratios
between variants of one section mean something.

(a) layers: forward + backward of GaborConv3d (generation + convolution; impl reference, direct,
    direct_contiguous, fft, auto) against nn.Conv3d with the same kernel size (channels-last and
    contiguous) and with size 3, at the shapes of the Wong & Moradi network (docs/design.md §4): level l
    works on size / 2^l voxels per axis. Batch 1, activations channels-last (trainer default); each Gabor
    impl generates its weight in the layout it runs in, and is compared with nn.Conv3d in that layout.
    An implementation stays in medexp.nn.fast only while some row of this table shows it winning.
(b) models: one training step (zero_grad, forward, PCC loss, backward, NAdam step) of WongNet with
    conventional, Gabor and mixed kernels, 1 input channel, 20 classes, batch 1 (the conventional model also
    at batch 2, the trainer default, and contiguous vs channels-last); voxels per second; and the achieved
    FLOP rate of the conventional model as a fraction of the machine's measured matmul rate (a 2048^2 MKL
    sgemm, the issue's yardstick: `conventional_flop_fraction`) and of the faster of that and a 256-channel
    oneDNN 3^3 convolution (`conventional_flop_fraction_of_conv_peak`: on AMD CPUs MKL's sgemm does not use
    AVX-512 and oneDNN's convolution gets ~2.6x more), all timed in the same loop.
    FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over one forward + backward: 2 x MACs of
    every convolution and matmul (forward, grad-input and grad-weight); norms, activations, upsampling and
    the optimiser are not counted, so the fraction is a lower bound on the hardware's use.
(c) runner: per-job overhead, the time a job spends outside its epochs (see `job_overhead`), in a sweep
    (`sweep_job_overhead_s`) and for a job started as its own process (`process_job_overhead_s`); and the
    fraction of a training loop spent waiting for the loader (make_loader with the paper's augmentation,
    num_workers=0 as in the trainer default) on `dataset=demo` and on the same volumes through
    `dataset=nifti` and its cache.
(d) kernel gradient: Gabor layers with impl=direct on the deepest levels' volumes (4^3-16^3; 2D 8^2 and
    16^2), with the parameters' gradient formed inside the C reduction (no dL/dW) and through dL/dW, side
    by side; `medexp.nn.fast.gradient.fused_gradient_pays` chooses between them by this table.
(e) FFT channel product: a Gabor layer's channel product (forward + backward) with its kernel spectrum built
    inside the product and with the spectrum stored, at one tile and at 2-64 tiles (x batch), side by
    side; `medexp.nn.fast.product.FUSED_MAX_TILES` follows this table.
(f) arrangements of the stored-spectrum channel product: rows [x_re; x_im] against w_re, w_im and the
    real block [[w_re, w_im], [-w_im, w_re]], forward + backward, at the tile plans of the network's
    layers; `medexp.nn.fast.product.channel_product`'s rule picks between them.
(g) generation without the C kernels (devices and builds without them): eq. 2 as written (the formula of
    medexp.nn.gabor) against the separable PyTorch operations (medexp.nn.fast.generate), forward +
    backward time and the bytes autograd keeps, per layer shape; the C kernels for scale.

Usage:  python scripts/bench.py --quick          (this machine: layers at 64^3, 3 repetitions)
        python scripts/bench.py                  (layers at 64^3 and 128^3, 5 repetitions)
The table comes first, then one key=value line per figure.
"""

from __future__ import annotations

import os

# The trainer's process settings (passive OpenMP waiting, glibc malloc keeping freed blocks), before torch
# loads: see medexp/run/runtime.py. MEDEXP_NO_TUNE=1 measures without them.
from medexp.run import runtime  # noqa: E402

runtime.configure()

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from medexp.losses import PCCLoss  # noqa: E402
from medexp.nn.fast import auto_choices, backend, gradient, native  # noqa: E402
from medexp.nn.fast.fftconv import plan_tiles  # noqa: E402
from medexp.nn.fast.generate import native_weight, torch_weight  # noqa: E402
from medexp.nn.fast.product import _BlockProduct, _RowsProduct, fused_product, stored_product  # noqa: E402
from medexp.nn.fast.spectrum import native_spectrum  # noqa: E402
from medexp.nn.gabor import GaborConv2d, GaborConv3d  # noqa: E402
from medexp.nn.kernels import ConventionalKernels, GaborKernels, MixedKernels  # noqa: E402
from medexp.nn.wong import CHANNELS, WongNet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CL = torch.channels_last_3d
# (level, cin, cout) of the layer table: C -> C per level, the first conv of level 0 and the first decoder
# conv of levels 0, 1 and 3 (3 C -> C).
LAYERS = (
    (0, 1, 12),
    (0, 36, 12),
    (1, 24, 24),
    (1, 72, 24),
    (2, 48, 48),
    (3, 96, 96),
    (3, 288, 96),
    (4, 192, 192),
)
GABOR_IMPLS = ("reference", "direct", "direct_contiguous", "fft", "auto")
KERNELS = {"conventional": ConventionalKernels, "gabor": GaborKernels, "mixed": MixedKernels}


def interleaved(variants: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per variant, timing A B C A B C ... after `warmup` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(warmup + reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for p in module.parameters():
            p.grad = None
        x.grad = None
        module(x).backward(grad)

    return run


def _layer_row(size: int, level: int, cin: int, cout: int, k: int, reps: int) -> dict[str, float]:
    """Median fwd+bwd seconds of the Gabor impls and nn.Conv3d (size k and 3) at one network shape."""
    n = size // 2**level
    torch.manual_seed(0)
    x = torch.randn(1, cin, n, n, n).contiguous(memory_format=CL).requires_grad_()
    grad = torch.randn(1, cout, n, n, n).contiguous(memory_format=CL)
    modules = {impl: GaborConv3d(cin, cout, k, impl=impl) for impl in GABOR_IMPLS}
    modules |= {"convk": nn.Conv3d(cin, cout, k, padding=k // 2), "conv3": nn.Conv3d(cin, cout, 3, padding=1)}
    variants = {name: _fwd_bwd(m.to(memory_format=CL), x, grad) for name, m in modules.items()}
    # nn.Conv3d in the contiguous layout: weight, input and gradient contiguous, as direct_contiguous runs it
    contiguous = nn.Conv3d(cin, cout, k, padding=k // 2)
    variants["convk_contiguous"] = _fwd_bwd(
        contiguous, x.detach().contiguous().requires_grad_(), grad.contiguous()
    )
    t = interleaved(variants, reps)
    return {name: t.get(name, math.nan) for name in (*GABOR_IMPLS, "convk", "convk_contiguous", "conv3")}


def layer_section(sizes: list[int], reps: int, k: int, max_level: int) -> tuple[list[str], dict[str, float]]:
    """Table rows and key figures of (a)."""
    rows = [
        "| input | level | cin->cout | voxels | gabor reference | gabor direct | gabor direct_contiguous | "
        f"gabor fft | gabor auto | conv{k} | conv{k} contiguous | conv3 | direct/conv{k} | "
        f"direct_contiguous/conv{k} contiguous | auto/best conv{k} | auto/direct | fft/direct | fastest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys: dict[str, float] = {}
    for size in sizes:
        direct, contiguous, auto, auto_direct = [], [], [], []
        for level, cin, cout in LAYERS:
            if size // 2**level < 1 or level > max_level:
                continue
            t = _layer_row(size, level, cin, cout, k, reps)
            direct.append(t["direct"] / t["convk"])
            contiguous.append(t["direct_contiguous"] / t["convk_contiguous"])
            auto.append(t["auto"] / min(t["convk"], t["convk_contiguous"]))
            auto_direct.append(t["auto"] / t["direct"])
            ms = " | ".join("-" if math.isnan(v) else f"{1e3 * v:.0f} ms" for v in t.values())
            fastest = min(GABOR_IMPLS[:-1], key=t.get)  # of the fixed implementations
            rows.append(
                f"| {size}^3 | {level} | {cin}->{cout} | {size // 2**level}^3 | {ms} | {direct[-1]:.2f} | "
                f"{contiguous[-1]:.2f} | {auto[-1]:.2f} | {auto_direct[-1]:.2f} | "
                f"{t['fft'] / t['direct']:.2f} | {fastest} |"
            )
            keys[f"fft_vs_direct_layer_{size}_l{level}_{cin}_{cout}"] = t["fft"] / t["direct"]
        suffix = "" if size == 64 else f"_{size}"
        keys[f"gabor_vs_conv{k}_layer{suffix}"] = max(direct)  # worst shape, impl=direct
        keys[f"gabor_contiguous_vs_conv{k}_contiguous_layer{suffix}"] = max(contiguous)
        keys[f"gabor_auto_vs_conv{k}_layer{suffix}"] = max(auto)
        keys[f"gabor_auto_vs_direct_layer{suffix}"] = max(auto_direct)
    return rows, keys


# (spatial dims, channels, size per axis, batch) of the gradient table: the deepest levels of the 3D network
# around the limit of fused_gradient_pays (512 products per tap: 8^3 is 248 per sample), and 2D
# images around theirs (48 per tap: 8^2 is 40 per image)
GRADIENT_CASES = (
    (3, 192, 4, 1),
    (3, 192, 4, 2),
    (3, 192, 6, 1),
    (3, 192, 8, 1),
    (3, 96, 8, 1),
    (3, 96, 8, 2),
    (3, 96, 8, 4),
    (3, 48, 16, 1),
    (2, 64, 8, 1),
    (2, 64, 8, 4),
    (2, 128, 16, 1),
)


def gradient_section(reps: int, k: int) -> tuple[list[str], dict[str, float]]:
    """(d) Gabor layers, impl=direct, forward + backward, with the parameters' gradient formed inside the C
    reduction (gradient.fused_gradient_conv) and through dL/dW (oneDNN's weight gradient, then the
    generation's backward), side by side; the rule `fused_gradient_pays` picks between them."""
    rows = [
        "| layer | size | batch | products per tap | fused | via dL/dW | fused / via dL/dW | rule picks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys: dict[str, float] = {}
    limit = gradient.FUSED_GRAD_MAX_PER_TAP
    for d, channels, n, batch in GRADIENT_CASES:
        torch.manual_seed(0)
        layer = (GaborConv3d if d == 3 else GaborConv2d)(channels, channels, k, impl="direct")
        fmt = CL if d == 3 else torch.channels_last
        x = torch.randn(batch, channels, *[n] * d).contiguous(memory_format=fmt).requires_grad_()
        grad = torch.randn(batch, channels, *[n] * d).contiguous(memory_format=fmt)
        run = _fwd_bwd(layer, x, grad)

        def with_limit(value: float, run: Callable[[], None] = run) -> Callable[[], None]:
            def variant() -> None:
                gradient.FUSED_GRAD_MAX_PER_TAP = {2: value, 3: value}
                try:
                    run()
                finally:
                    gradient.FUSED_GRAD_MAX_PER_TAP = limit

            return variant

        t = interleaved({"fused": with_limit(math.inf), "dldw": with_limit(-1)}, reps)
        h = k // 2
        products = batch * sum(max(0, n - abs(r)) for r in range(-h, h + 1)) ** d / k**d
        picks = "fused" if gradient.fused_gradient_pays(batch, (n,) * d, k) else "via dL/dW"
        ratio = t["fused"] / t["dldw"]
        times = f"{1e3 * t['fused']:.1f} ms | {1e3 * t['dldw']:.1f} ms"
        rows.append(
            f"| {d}D {channels}->{channels} | {n}^{d} | {batch} | {products:.0f} | {times} | {ratio:.2f} | "
            f"{picks} |"
        )
        keys[f"fused_gradient_ratio_{d}d_{channels}_{n}_b{batch}"] = ratio
    return rows, keys


# (cin, cout, FFT size per axis, tiles x batch) of the product table: one tile at the levels' shapes, then
# more tiles
PRODUCT_CASES = (
    (48, 48, 22, 1),
    (144, 48, 22, 1),
    (96, 96, 14, 1),
    (288, 96, 14, 1),
    (192, 192, 8, 1),
    (96, 192, 8, 1),
    (48, 48, 16, 2),
    (48, 48, 16, 4),
    (24, 24, 28, 8),
    (36, 12, 28, 27),  # the stored-spectrum plans of 36->12 at 64^3 and 72->24 at 32^3
    (72, 24, 14, 64),
)


def product_section(reps: int, k: int) -> tuple[list[str], dict[str, float]]:
    """(e) the FFT path's channel product of a Gabor layer, forward + backward (input spectra and all
    parameters): its kernel spectrum built inside the product (product.fused_product) or stored
    (spectrum.native_spectrum, then the product with it); product.FUSED_MAX_TILES follows this."""
    rows = [
        "| cin->cout | FFT size | tiles | built inside | stored | inside / stored |",
        "|---|---|---|---|---|---|",
    ]
    keys: dict[str, float] = {}
    for cin, cout, size, tiles in PRODUCT_CASES:
        torch.manual_seed(0)
        layer = GaborConv3d(cin, cout, k)
        sizes = (size,) * 3
        freqs = size * size * (size // 2 + 1)
        x = torch.randn(freqs, tiles, cin, 2, requires_grad=True)
        stored = stored_product(lambda sizes, g=layer: native_spectrum(g.eq2_params(), k, sizes))

        def run(product: Callable[[], torch.Tensor], layer: nn.Module = layer, x: torch.Tensor = x) -> None:
            for p in layer.parameters():
                p.grad = None
            x.grad = None
            product().square().sum().backward()

        def inside(g: nn.Module = layer, x=x, s=sizes) -> torch.Tensor:
            return fused_product(x, g.eq2_params(), k, s)

        def with_stored(p: Callable = stored, x=x, s=sizes) -> torch.Tensor:
            return p(x, s)

        t = interleaved({"inside": lambda f=inside: run(f), "stored": lambda f=with_stored: run(f)}, reps)
        ratio = t["inside"] / t["stored"]
        times = f"{1e3 * t['inside']:.1f} ms | {1e3 * t['stored']:.1f} ms"
        rows.append(f"| {cin}->{cout} | {size}^3 | {tiles} | {times} | {ratio:.2f} |")
        keys[f"fused_product_ratio_{cin}_{cout}_{size}_t{tiles}"] = ratio
    return rows, keys


def arrangement_section(reps: int, k: int, sizes: list[int]) -> tuple[list[str], dict[str, float]]:
    """(f) the stored-spectrum channel product, forward + backward (input spectra and spectrum), in both
    arrangements at the tile plans the network's layers get with the stored spectrum (as without the C
    kernels) and, where they have more than product.FUSED_MAX_TILES tiles, with the C kernels."""
    rows = [
        "| cin->cout | FFT size | tiles | rows | block | rows / block | rule picks |",
        "|---|---|---|---|---|---|---|",
    ]
    keys: dict[str, float] = {}
    cases = set()
    for size in sizes:
        for level, cin, cout in LAYERS:
            n = size // 2**level
            for fused_tiles in (0, backend.FUSED_MAX_TILES):
                axes = plan_tiles((n,) * 3, (k,) * 3, cin, cout, 1, None, fused_tiles)
                tiles = math.prod(t for _, _, t in axes)
                freqs = math.prod(p for p, _, _ in axes[:-1]) * (axes[-1][0] // 2 + 1)
                if tiles > fused_tiles and freqs * cin * cout * 8 <= 2**30:  # spectrum up to 1 GB
                    cases.add((cin, cout, freqs, tiles, axes[0][0]))
    for cin, cout, freqs, tiles, p in sorted(cases, key=lambda c: c[2] * c[3] * (c[0] + c[1])):
        torch.manual_seed(0)
        x = torch.randn(freqs, tiles, cin, 2, requires_grad=True)
        w = torch.randn(2, freqs, cin, cout, requires_grad=True)
        g = torch.randn(freqs, tiles, cout, 2)

        def rows_product(x=x, w=w, f=freqs, t=tiles, c=cin) -> torch.Tensor:
            return _RowsProduct.apply(x.permute(0, 3, 1, 2).reshape(f, 2 * t, c), w)  # (F, [re; im] T, cin)

        def block_product(x=x, w=w, f=freqs, t=tiles, c=cin, o=cout) -> torch.Tensor:
            return _BlockProduct.apply(x.reshape(f, t, 2 * c), w).view(f, t, o, 2)  # from (F, T, 2 cin)

        def fwd_bwd(fn, x=x, w=w, g=g) -> Callable[[], object]:
            return lambda: torch.autograd.grad(fn(), (x, w), g)

        t = interleaved({"rows": fwd_bwd(rows_product), "block": fwd_bwd(block_product)}, reps)
        rule = "rows" if tiles * (cin + cout) < 2 * cin * cout else "block"
        ratio = t["rows"] / t["block"]
        times = f"{1e3 * t['rows']:.1f} ms | {1e3 * t['block']:.1f} ms"
        rows.append(f"| {cin}->{cout} | {p}^3 | {tiles} | {times} | {ratio:.2f} | {rule} |")
        keys[f"rows_vs_block_{cin}_{cout}_{p}_t{tiles}"] = ratio
    return rows, keys


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """fn()'s result and the bytes of the tensors autograd saved for its backward."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


GENERATION_CASES = ((3, 1, 12), (3, 36, 12), (3, 24, 24), (3, 72, 24), (3, 48, 48), (3, 96, 96), (3, 288, 96))
GENERATION_CASES += ((3, 192, 192), (2, 64, 64), (2, 128, 128))  # (spatial dims, cin, cout)


def generation_section(reps: int, k: int) -> tuple[list[str], dict[str, float]]:
    """(g) the weight's generation, forward + backward: eq. 2 as written (layer.weight(), the reference's
    generator), the separable PyTorch operations (the fallback without C kernels in 3D) and the C kernels;
    with the bytes autograd keeps for the backward."""
    rows = [
        "| layer | formula | separable torch | C kernels | separable / formula | formula saves | "
        "separable saves | saved ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys: dict[str, float] = {}
    for d, cin, cout in GENERATION_CASES:
        torch.manual_seed(0)
        layer = (GaborConv3d if d == 3 else GaborConv2d)(cin, cout, k)
        variants = {
            "formula": lambda g=layer: g.weight(),
            "separable": lambda g=layer: torch_weight(g.eq2_params(), k),
        }
        if native.available(layer.sigma_raw):
            variants["C"] = lambda g=layer: native_weight(g.eq2_params(), k)
        saved = {name: _saved_bytes(fn)[1] for name, fn in variants.items()}

        def fwd_bwd(fn: Callable[[], torch.Tensor], g: nn.Module = layer) -> Callable[[], object]:
            def run() -> None:
                w = fn()
                torch.autograd.grad(w, list(g.parameters())[:-1], torch.ones_like(w))

            return run

        t = interleaved({name: fwd_bwd(fn) for name, fn in variants.items()}, reps)
        ratio, saved_ratio = t["separable"] / t["formula"], saved["separable"] / saved["formula"]
        c_time = f"{1e3 * t['C']:.1f} ms" if "C" in t else "-"
        rows.append(
            f"| {d}D {cin}->{cout} | {1e3 * t['formula']:.1f} ms | {1e3 * t['separable']:.1f} ms | "
            f"{c_time} | {ratio:.2f} | {saved['formula'] / 2**20:.1f} MiB | "
            f"{saved['separable'] / 2**20:.1f} MiB | {saved_ratio:.2f} |"
        )
        keys[f"separable_vs_formula_generation_{d}d_{cin}_{cout}"] = ratio
        keys[f"separable_vs_formula_saved_{d}d_{cin}_{cout}"] = saved_ratio
    return rows, keys


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    loss_fn = PCCLoss()
    optimizer = torch.optim.NAdam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step


def _count_flops(model: nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


SGEMM = "peak: MKL sgemm 2048^2 x4"
BATCH2 = "conventional (batch 2)"


def _peak_variants() -> dict[str, tuple[float, Callable[[], object]]]:
    """Dense float32 kernels for the machine's peak: (FLOPs, run). MKL's sgemm and oneDNN's convolution
    use different code paths (MKL may not pick its AVX-512 kernels on AMD CPUs); the faster one counts."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x = torch.randn(1, 256, 16, 16, 16).contiguous(memory_format=CL)
    w = torch.randn(256, 256, 3, 3, 3).contiguous(memory_format=CL)
    return {
        SGEMM: (4 * 2 * 2048**3, lambda: [a @ b for _ in range(4)]),
        "peak: oneDNN conv3 256ch 16^3": (2 * 256 * 256 * 27 * 16**3, lambda: F.conv3d(x, w, padding=1)),
    }


def model_section(size: int, reps: int, with_direct: bool, channels) -> tuple[list[str], dict[str, float]]:
    """Table rows and key figures of (b)."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, size, size, size)
    y = torch.randint(0, 20, (1, 1, size, size, size))
    contiguous = torch.contiguous_format
    kinds = {"conventional": ("conventional", "auto", CL, 1)}
    kinds["conventional (contiguous)"] = ("conventional", "auto", contiguous, 1)
    kinds |= {"gabor": ("gabor", "auto", CL, 1), "mixed": ("mixed", "auto", CL, 1)}
    if with_direct:
        kinds["gabor (impl=direct)"] = ("gabor", "direct", CL, 1)
        kinds["mixed (impl=direct)"] = ("mixed", "direct", CL, 1)
    kinds[BATCH2] = ("conventional", "auto", CL, 2)  # the trainer's default batch size
    kinds["conventional (batch 2, contiguous)"] = ("conventional", "auto", contiguous, 2)
    variants, flops = {}, {}
    for name, (kind, impl, fmt, batch) in kinds.items():
        model = WongNet(1, 20, KERNELS[kind](impl=impl), channels=channels).to(memory_format=fmt)
        xs = x.expand(batch, -1, -1, -1, -1).contiguous(memory_format=fmt)
        ys = y.expand(batch, -1, -1, -1, -1)
        if kind == "conventional":
            flops[name] = _count_flops(model, xs)
        variants[name] = _train_step(model, xs, ys)
    peaks = _peak_variants()
    t = interleaved(variants | {name: run for name, (_, run) in peaks.items()}, reps)
    rates = {name: count / t.pop(name) for name, (count, _) in peaks.items()}
    matmul, peak, base = rates[SGEMM], max(rates.values()), t["conventional"]
    rows = ["| model | step | vs conventional | voxels/s | GFLOP/step | GFLOP/s | of matmul | of conv peak |"]
    rows.append("|---|---|---|---|---|---|---|---|")
    for name, sec in t.items():
        fl = flops.get(name, math.nan)
        flop_cells = (
            f"{fl / 1e9:.1f} | {fl / sec / 1e9:.1f} | {fl / sec / matmul:.0%} | {fl / sec / peak:.0%}"
            if name in flops
            else "- | - | - | -"
        )
        rows.append(
            f"| {name}, {size}^3 | {sec:.2f} s | {sec / base:.2f} | {kinds[name][3] * size**3 / sec:,.0f} | "
            f"{flop_cells} |"
        )
    rows += [
        f"| {name} | | | | | {rate / 1e9:.1f} | {rate / matmul:.0%} | {rate / peak:.0%} |"
        for name, rate in rates.items()
    ]
    keys = {
        "mixed_vs_conventional_step": t["mixed"] / base,
        "gabor_vs_conventional_step": t["gabor"] / base,
        "conventional_step_s": base,
        "conventional_voxels_per_s": size**3 / base,
        "conventional_flop_fraction": flops["conventional"] / base / matmul,
        "conventional_flop_fraction_of_conv_peak": flops["conventional"] / base / peak,
        "conventional_batch2_flop_fraction": flops[BATCH2] / t[BATCH2] / matmul,
        "conventional_gflops": flops["conventional"] / base / 1e9,
        "matmul_gflops": matmul / 1e9,
        "conv_peak_gflops": peak / 1e9,
        "channels_last_speedup": t["conventional (contiguous)"] / base,
        "channels_last_speedup_batch2": t["conventional (batch 2, contiguous)"] / t[BATCH2],
    }
    if with_direct:
        keys["gabor_direct_vs_conventional_step"] = t["gabor (impl=direct)"] / base
        keys["mixed_direct_vs_conventional_step"] = t["mixed (impl=direct)"] / base
    return rows, keys


TINY_JOB = [
    "dataset.shape=[16,16,16]",
    "dataset.num_cases=10",
    "trainer.max_epochs=1",
    "trainer.progress=false",
]
GRID_BUDGET = [
    "tracking.log_plots=false",
    "tracking.log_checkpoint=false",
    "eval.metrics=[dice]",
]  # README grid


def _medexp(workdir: Path, args: list[str], multirun: bool = False) -> float:
    """Wall seconds of `python -m medexp train [-m] ARGS` against the workdir's data and MLflow store."""
    command = [sys.executable, "-m", "medexp", "train", *(["-m"] if multirun else [])]
    command += [*TINY_JOB, f"dataset.root={workdir / 'data'}"]
    command += [f"tracking_uri=sqlite:///{workdir / 'mlflow.db'}", *args]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def _train_seconds(job_dir: Path) -> float:
    result = (job_dir / "result.yaml").read_text()
    return float(
        next(line for line in result.splitlines() if line.startswith("train_seconds:")).split(":")[1]
    )


def job_overhead(workdir: Path, runs: int) -> dict[str, float]:
    """Per-job overhead, the time a job spends outside its training loop (train_seconds: epochs and
    validation), measured two ways:

    - sweep: one `medexp train -m seed=1..N` with the README grid's budget (Hydra's basic launcher, jobs in
      one process, as the 225-job grid): (first job start -> last job end - sum of train_seconds) / N, from
      the MLflow runs' start and end times (composition, MLflow run, model build, test evaluation, logging).
    - process: a single `medexp train` as its own process with default tracking and metrics, as a cluster
      launcher starts every job: wall - train_seconds (also interpreter start and imports, ~4.7 s here).
    The first process run, which also generates the data and the MLflow store, is not counted.
    """
    from mlflow.tracking import MlflowClient

    walls, process = [], []
    for i in range(runs + 1):
        run_dir = workdir / f"job{i}"
        wall = _medexp(workdir, [f"hydra.run.dir={run_dir}", f"experiment_name=process{i}"])
        if i:
            walls.append(wall)
            process.append(wall - _train_seconds(run_dir))
    jobs = max(runs, 1) * 5
    sweep_dir = workdir / "sweep"
    seeds = ",".join(str(s) for s in range(1, jobs + 1))
    sweep = [f"seed={seeds}", f"hydra.sweep.dir={sweep_dir}", "experiment_name=sweep", *GRID_BUDGET]
    _medexp(workdir, sweep, multirun=True)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    children = [
        r
        for r in client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
        if "mlflow.parentRunId" in r.data.tags
    ]
    span = (max(r.info.end_time for r in children) - min(r.info.start_time for r in children)) / 1e3
    trained = sum(_train_seconds(sweep_dir / str(j)) for j in range(jobs))
    return {
        "sweep": (span - trained) / jobs,
        "process": statistics.median(process),
        "process_wall": statistics.median(walls),
        "jobs": jobs,
    }


def _demo(workdir: Path, size: int):
    """The demo dataset of the runner section: 4 cases of size^3, generated on first use."""
    from medexp.data.demo import DemoDataset

    return DemoDataset(root=str(workdir / "data"), num_cases=4, shape=[size] * 3)


def demo_cases(workdir: Path, size: int) -> list[dict]:
    """The demo dataset at size^3 (`dataset=demo`: NIfTI files decoded by MONAI's loader every epoch)."""
    return _demo(workdir, size).prepare()


def nifti_cases(workdir: Path, size: int) -> list[dict]:
    """The same volumes through `dataset=nifti`: preprocessed once into its .npy cache, then read from it."""
    from medexp.data.nifti import NiftiDataset

    demo = _demo(workdir, size)
    demo.prepare()
    dataset = NiftiDataset(root=str(demo.folder), shape=[size] * 3, cache_dir=str(workdir / "cache"))
    dataset.prepare()  # the first call preprocesses into the cache
    return dataset.prepare()  # a training run reads the cache


def data_wait(cases: list[dict], size: int, steps: int, channels) -> tuple[float, float]:
    """(median loader wait s, median step s) over `steps` iterations of a conventional-model training loop
    on `cases` (cached arrays), with the paper's augmentation and the trainer's default loader."""
    from medexp.data.augment import random_affine
    from medexp.data.loaders import make_loader

    shape = [size] * 3
    loader = make_loader(cases, batch_size=1, train=True, augmentation=random_affine(3, shape=shape))
    model = WongNet(1, 20, ConventionalKernels(), channels=channels).to(memory_format=CL)
    loss_fn, optimizer = PCCLoss(), torch.optim.NAdam(model.parameters(), lr=1e-3)
    waits, computes = [], []
    while len(computes) < steps + 1:
        iterator = iter(loader)
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                break
            ready = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(batch["image"].contiguous(memory_format=CL)), batch["label"]).backward()
            optimizer.step()
            waits.append(ready - start)
            computes.append(time.perf_counter() - ready)
    return statistics.median(waits[1:]), statistics.median(computes[1:])  # the first step is warm-up


def runner_section(workdir: Path, size: int, steps: int, job_runs: int, channels) -> tuple[list[str], dict]:
    """Table rows and key figures of (c)."""
    rows = ["| runner | value |", "|---|---|"]
    keys: dict[str, float] = {}
    if job_runs:
        overhead = job_overhead(workdir, job_runs)
        rows.append(
            f"| per-job overhead in a sweep ({overhead['jobs']} jobs, one process, grid budget) | "
            f"{overhead['sweep']:.2f} s |"
        )
        rows.append(
            f"| `python -m medexp train` on 16^3 data, 1 epoch, as its own process: wall | "
            f"{overhead['process_wall']:.1f} s |"
        )
        rows.append(
            f"| per-job overhead as its own process (wall - train_seconds) | {overhead['process']:.1f} s |"
        )
        keys["sweep_job_overhead_s"] = overhead["sweep"]
        keys["process_job_overhead_s"] = overhead["process"]
    for name, cases in (("demo", demo_cases), ("nifti", nifti_cases)):
        wait, step = data_wait(cases(workdir, size), size, steps, channels)
        rows.append(
            f"| {name}: loader wait per step ({size}^3, augmentation, 0 workers) | {1e3 * wait:.0f} ms |"
        )
        rows.append(f"| {name}: conventional training step ({size}^3) | {1e3 * step:.0f} ms |")
        fraction = wait / (wait + step)
        rows.append(f"| {name}: fraction of step time waiting for data | {fraction:.1%} |")
        keys["data_wait_fraction" if name == "demo" else f"data_wait_fraction_{name}"] = fraction
    return rows, keys


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="this machine: layers at 64^3 only, 3 reps")
    parser.add_argument("--sizes", type=int, nargs="+", help="network input sizes of the layer table")
    parser.add_argument("--model-size", type=int, default=64, help="input size of the model table")
    parser.add_argument("--reps", type=int, help="timed repetitions per variant (3 quick, 5 full)")
    parser.add_argument("--kernel-size", type=int, default=7, help="Gabor kernel size (paper: 7)")
    parser.add_argument("--job-runs", type=int, help="timed `medexp train` runs (1 quick, 3 full; 0 skips)")
    parser.add_argument(
        "--sections",
        default="layer,gradient,product,arrangement,generation,model,runner",
        help="comma-separated subset",
    )
    parser.add_argument("--max-level", type=int, default=4, help="deepest network level in the layer table")
    parser.add_argument(
        "--channels", type=int, nargs=5, default=CHANNELS, help="WongNet widths (tests shrink)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--workdir", type=Path, help="data and MLflow scratch (default: a temp dir)")
    args = parser.parse_args(argv)
    sizes = args.sizes or ([64] if args.quick else [64, 128])
    reps = args.reps or (3 if args.quick else 5)
    job_runs = args.job_runs if args.job_runs is not None else (1 if args.quick else 3)
    sections = args.sections.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    load, policy = os.getloadavg()[0], os.environ.get("OMP_WAIT_POLICY", "unset")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={policy}, load average {load:.1f}"
    )
    keys: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for name, run in (
            ("layer", lambda: layer_section(sizes, reps, args.kernel_size, args.max_level)),
            ("gradient", lambda: gradient_section(reps, args.kernel_size)),
            ("product", lambda: product_section(reps, args.kernel_size)),
            ("arrangement", lambda: arrangement_section(reps, args.kernel_size, sizes)),
            ("generation", lambda: generation_section(reps, args.kernel_size)),
            ("model", lambda: model_section(args.model_size, reps, not args.quick, args.channels)),
            ("runner", lambda: runner_section(workdir, args.model_size, reps, job_runs, args.channels)),
        ):
            if name in sections:
                rows, figures = run()
                print("\n" + "\n".join(rows), flush=True)
                keys |= figures
    print("\nauto choices: " + ", ".join(f"{k[0]}/{k[1][:2]} -> {v}" for k, v in auto_choices().items()))
    print()
    for key, value in keys.items():
        print(f"{key}={value:.4g}" if math.isfinite(value) else f"{key}=nan")
    return keys


if __name__ == "__main__":
    main()
