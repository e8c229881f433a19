"""Fast ways to compute a Gabor layer's convolution, behind one entry point (`gabor_conv`).

medexp.nn.gabor defines the layer (eq. 2 as written, and F.conv{2,3}d with that weight: impl "reference").
Everything here exists for speed only and is tested against that reference:

- backend.py   the door: impl dispatch, "auto" timing, the per-layer weight/spectrum cache, autocast islands
- direct.py    F.conv{2,3}d in the memory layout the generated weight is written in
- generate.py  the weight by the separable factorisation of eq. 2 (C kernels; PyTorch operations elsewhere)
- gradient.py  the direct convolution whose parameters' gradient skips dL/dW (C kernels, small volumes)
- fftconv.py   the FFT convolution: convolution theorem, overlap-save tiles, tile plans
- spectrum.py  kernel spectra: pruned DFT of any weight; Gabor spectra straight from the factors (C)
- product.py   the per-frequency channel product, with a stored or an inside-built spectrum (C)
- native.py    building, loading and calling the C kernels of csrc/
"""

from medexp.nn.fast.backend import IMPLS, auto_choices, check_impl, gabor_conv, run_impl

__all__ = ["IMPLS", "auto_choices", "check_impl", "gabor_conv", "run_impl"]
