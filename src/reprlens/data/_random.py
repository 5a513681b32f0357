"""Counter-based random numbers: a value depends only on (seed, index, stream), never on batching.

Every random quantity of the procedural data and of the augmentations is a hash of the dataset seed,
the example index, the epoch and a stream id. The result is therefore identical whatever the chunk
size, batch composition, worker count or device, and any subset of examples can be (re)generated on
its own. The hash is a 32-bit integer mixer ("lowbias32") evaluated with int64 torch ops whose
intermediate values never exceed 2**49, so it is exact on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hash32", "hash32_int", "seed_key", "stream_hash", "uniform_from_hash", "uniforms"]

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B
_GOLDEN = 0x9E3779B9


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow."""
    lo = c & _M16
    hi = c >> 16
    return (x * lo + (((x * hi) & _M16) << 16)) & _M32


def hash32(x: Tensor) -> Tensor:
    """Mix an int64 tensor of values in ``[0, 2**32)`` into well-spread 32-bit hashes (same dtype/device).

    Example:
        >>> import torch
        >>> h = hash32(torch.arange(3))
        >>> bool((h >= 0).all() and (h < 2**32).all())
        True
    """
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def hash32_int(x: int) -> int:
    """Python-int twin of :func:`hash32` (for seeds)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def seed_key(seed: int, *salt: int) -> int:
    """Fold a user seed (any int) and integer salts (split id, purpose) into one 32-bit key."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Expected `seed` to be an int, but got {type(seed).__name__}.")
    key = hash32_int((seed & _M32) ^ hash32_int((seed >> 32) & _M32 ^ 0x5BD1E995))
    for s in salt:
        key = hash32_int(key ^ hash32_int((int(s) + _GOLDEN) & _M32))
    return key


def stream_hash(key: int, index: Tensor, stream: Tensor | int) -> Tensor:
    """Hash of ``(key, index, stream)``; ``index`` and ``stream`` broadcast (int64 tensors or int)."""
    h = hash32((index.long() & _M32) ^ key)
    if isinstance(stream, int):
        s = hash32_int((stream + _GOLDEN) & _M32)
        return hash32(h ^ s)
    return hash32(h ^ hash32(stream.long() + _GOLDEN))


def uniform_from_hash(h: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Map 32-bit hashes to floats in ``[0, 1)`` (24 random bits; never exactly 1)."""
    return (h >> 8).to(dtype) * (2.0**-24)


def uniforms(key: int, index: Tensor, num: int, *, offset: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(N, num)`` uniforms in ``[0, 1)`` for the examples ``index`` (N,), streams ``offset..offset+num-1``."""
    streams = torch.arange(offset, offset + num, device=index.device)
    return uniform_from_hash(stream_hash(key, index.long()[:, None], streams[None, :]), dtype)
