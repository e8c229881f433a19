"""The FFT input stage of Nair et al. ("Fast Fourier Transformation for Optimizing CNNs in Object
Recognition", Sec. IV-A, "Input Layer"): FFT of the image -> a learnable convolution -> inverse FFT.

The paper builds it from Keras lambda layers around a 3x3 convolution; here it is one module that works in
2D and 3D and returns an image of the input's shape, so it can sit in front of any backbone.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from medexp.nn.kernels import conv_nd


class FFTInput(nn.Module):
    """x -> Re(IFFT(conv([Re FFT(x), Im FFT(x)]))): a learnable filter applied in the frequency domain.

    Steps (Nair et al. eqs. 1-2 for the transforms):
        1. X = fftn(x) over the spatial dims, norm="ortho" (unitary, so the spectrum has the image's energy
           and the convolution sees O(1) values instead of a DC term of order N).
        2. The real and imaginary parts, stacked as 2 * in_channels channels, go through a k^d convolution
           (2 * in_channels -> 2 * in_channels). Its padding is circular because the DFT grid is periodic:
           the highest positive and negative frequencies are neighbours.
        3. The two halves are recombined into a complex spectrum, inverse-transformed, and the real part
           is returned.

    The paper puts an activation after its convolution; we leave it out because a pointwise nonlinearity on
    Fourier coefficients (e.g. ReLU zeroing negative real parts) has no useful meaning there and would stop
    the stage from starting at the identity.

    Initialisation: the convolution is a Dirac (identity) kernel with zero bias, so at start the stage
    returns its input unchanged up to FFT round-off (~1e-6): it does not destroy the image, and training
    moves it away from the identity only as far as that helps.

    Args:
        in_channels: image channels C.
        spatial_dims: 2 or 3.
        kernel_size: odd size of the frequency-domain convolution (3 in the paper).

    Input (B, C, *spatial) real; output (B, C, *spatial) real, the same shape.
    """

    def __init__(self, in_channels: int, spatial_dims: int = 3, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"FFTInput kernel_size must be a positive odd integer, got {kernel_size}")
        self.in_channels, self.spatial_dims = int(in_channels), int(spatial_dims)
        channels = 2 * self.in_channels
        self.conv = conv_nd(spatial_dims)(
            channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="circular", bias=True
        )
        nn.init.dirac_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels or x.is_complex():
            raise ValueError(
                f"FFTInput expects a real input (B, {self.in_channels}, *spatial) with {self.spatial_dims} "
                f"spatial dims, got shape {tuple(x.shape)} and dtype {x.dtype}"
            )
        # A float32 island under autocast: torch.fft and torch.complex take no bfloat16 / float16 (complex
        # tensors of them barely exist), and the stage is one small convolution on 2C channels, so running
        # it in float32 costs nothing. The output keeps the input's dtype (the image's precision); the
        # backbone's first convolution then autocasts as usual.
        device_type = x.device.type
        autocast_off = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )
        with autocast_off:
            image = self._filter(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
        return image.to(x.dtype)

    def _filter(self, x: Tensor) -> Tensor:
        dims = tuple(range(2, x.dim()))
        spectrum = torch.fft.fftn(x, dim=dims, norm="ortho")  # (B, C, *spatial) complex
        stacked = torch.cat([spectrum.real, spectrum.imag], dim=1)  # (B, 2C, *spatial) real
        weight, bias = self.conv.weight.to(stacked.dtype), self.conv.bias.to(stacked.dtype)
        filtered = self.conv._conv_forward(stacked, weight, bias)  # (B, 2C, *spatial)
        real, imag = filtered.chunk(2, dim=1)  # each (B, C, *spatial)
        image = torch.fft.ifftn(torch.complex(real, imag), dim=dims, norm="ortho")  # (B, C, *spatial) complex
        return image.real  # (B, C, *spatial)
