"""Fast ways to compute a Gabor layer's convolution, behind one entry point (`gabor_conv`).

medexp.nn.gabor defines the layer (eq. 2 as written, and F.conv{2,3}d with that weight: impl "reference"),
medexp.nn.gabor_separable its separable factors. Everything here exists for speed only, computes with sums
of separable complex kernels given by such factors whatever they mean, and is tested against that reference:

- backend.py   the door: impl dispatch, "auto" timing, the per-layer weight/spectrum cache, autocast islands
- direct.py    F.conv{2,3}d in the memory layout the generated weight is written in
- generate.py  the weight from its separable factors (C kernels; PyTorch operations elsewhere)
- gradient.py  the direct convolution whose factors' gradient skips dL/dW (C kernels, small volumes)
- fftconv.py   the FFT convolution: convolution theorem, overlap-save tiles, tile plans
- spectrum.py  kernel spectra: pruned DFT of any weight; spectra straight from separable factors (C)
- product.py   the per-frequency channel product, with a stored or an inside-built spectrum (C)
- native.py    building, loading and calling the C kernels of csrc/
"""

from medexp.nn.fast.backend import IMPLS, auto_choices, check_impl, gabor_conv, run_impl

__all__ = ["IMPLS", "auto_choices", "check_impl", "gabor_conv", "run_impl"]
