"""Which examples each micro-batch holds: a pure function of (seed, epoch, micro-batch number).

Because the order is recomputed rather than iterated, resuming needs only the micro-batch
counter from the checkpoint, and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


class DataOrder:
    def __init__(self, n_examples: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.n = n_examples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.global_batch = batch_size * world_size
        self.micro_batches_per_epoch = math.ceil(n_examples / self.global_batch)
        self._permutation = lru_cache(maxsize=2)(self._permute)

    def _permute(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def epoch_of(self, micro_step: int) -> float:
        return micro_step / self.micro_batches_per_epoch

    def indices(self, micro_step: int) -> list[int]:
        """This rank's example indices for global micro-batch number `micro_step`."""
        epoch, i = divmod(micro_step, self.micro_batches_per_epoch)
        perm = self._permutation(epoch)
        chosen = perm[i * self.global_batch : (i + 1) * self.global_batch].tolist()
        if self.world_size > 1 and len(chosen) < self.global_batch:
            # Every rank must run a forward pass at every step, so the last batch of an epoch
            # borrows from the epoch's start instead of leaving a rank empty.
            chosen += perm[: self.global_batch - len(chosen)].tolist()
        return chosen[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
