"""The names of the Gabor convolution implementations (`kernel.impl`), importable without torch so that
config validation stays light; medexp.nn.fast.backend dispatches on them."""

IMPLS = ("auto", "reference", "direct", "direct_contiguous", "fft")
