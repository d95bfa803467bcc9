"""Training noise that does not depend on how the global batch is split across processes.

With torch's global RNG each DDP rank draws noise for its own half batch, so a 2-process run sees different
noise than a 1-process run of the same global batch. Here every draw is a slice of one draw for the whole
global batch from a generator seeded by (seed, iteration): sample i of the global batch gets the same noise
whatever the number of processes.

The slice is interleaved (``full[rank::world_size]``) to match ``DistributedSampler(shuffle=False)``, which hands
rank r the dataset indices r, r + W, r + 2W, ...: with a per-rank batch of B/W, the union of the ranks' k-th
batches is the single-process k-th batch of size B, in the same interleaved order.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["iteration_generator", "rank_randn", "rank_rand"]


def iteration_generator(seed: int, iteration: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, iteration).

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so the pair is folded into 32 bits as
    ``(seed * 0x9E3779B9 + iteration) mod 2^32``: distinct for every iteration of one run, and two seeds share a
    stream only ~10^9 iterations apart.
    """
    if seed < 0 or iteration < 0:
        raise ValueError(f"iteration_generator: seed and iteration must be >= 0, got {seed}, {iteration}.")
    return torch.Generator(device=device).manual_seed((seed * 0x9E3779B9 + iteration) % 2**32)


def _global_draw(fn, local_shape, generator, rank: int, world_size: int, **kwargs) -> Tensor:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size}).")
    local_shape = tuple(local_shape)
    full = fn((local_shape[0] * world_size, *local_shape[1:]), generator=generator, **kwargs)
    return full[rank::world_size]


def rank_randn(local_shape, generator: torch.Generator, rank: int = 0, world_size: int = 1, **kwargs) -> Tensor:
    """This rank's rows ``[rank::world_size]`` of a standard normal draw for the global batch (dim 0 = batch)."""
    return _global_draw(torch.randn, local_shape, generator, rank, world_size, **kwargs)


def rank_rand(local_shape, generator: torch.Generator, rank: int = 0, world_size: int = 1, **kwargs) -> Tensor:
    """Like `rank_randn`, uniform on [0, 1)."""
    return _global_draw(torch.rand, local_shape, generator, rank, world_size, **kwargs)
