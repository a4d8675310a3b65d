"""Triton only: the attention kernels and the ``@triton.jit`` helpers they compose. ``mods`` (masks and score
modifications), ``forward`` (tile load, the forward block and kernel), ``decode`` (split-KV and combine),
``backward`` (preprocess, dK/dV, dQ), ``blockmask`` (a mask_mod's block classes), ``paged`` (append and the
block-table forward). Launchers live one level up, in ``ops/attention/``."""
