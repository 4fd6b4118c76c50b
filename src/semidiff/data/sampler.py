"""Batches made of a fixed number of labeled and unlabeled items.

Semi-supervised methods need every batch to hold ``labeled_batch`` labeled items followed by
``unlabeled_batch`` unlabeled ones. The two streams have very different lengths (8 labeled vs
72 unlabeled LA cases), so each is cycled on its own: a seeded permutation, reshuffled each
time it runs out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from semidiff.errors import ConfigError

__all__ = ["TwoStreamBatchSampler"]

# Stream tags mixed into the seed so that the two streams get independent permutations.
_LABELED, _UNLABELED = 0, 1


class TwoStreamBatchSampler(Sampler[list[int]]):
    """Yields ``num_batches`` index lists: labeled indices first, then unlabeled ones.

    Each stream is an endless sequence of permutations of its indices, permutation ``c`` drawn
    from a generator seeded with ``(seed, c, stream)``; batch ``k`` of the whole run is a pure
    function of ``k`` (see :meth:`batch`), and an iteration yields batches ``start_batch`` to
    ``start_batch + num_batches - 1``. With ``world_size > 1`` every rank takes
    ``perm[rank::world_size]`` of each permutation, so within a pass over a stream the ranks
    see disjoint items. With ``with_seeds`` each entry is ``(index, augmentation_seed)``.
    Use it as ``DataLoader(dataset, batch_sampler=sampler)``.

    Args:
        labeled_indices: dataset indices of labeled items.
        unlabeled_indices: dataset indices of unlabeled items (may be empty when
            ``unlabeled_batch`` is 0).
        labeled_batch: labeled items per batch, at least 1.
        unlabeled_batch: unlabeled items per batch, 0 for supervised training.
        num_batches: batches per iteration over the sampler (``len``).
        seed: base seed.
        rank: this process's rank.
        world_size: number of processes.
        start_batch: global number of the first batch an iteration yields (a resumed run
            passes its step count).
        with_seeds: yield ``(index, seed)`` pairs so each item's augmentation is seeded.

    Raises:
        ConfigError: a batch size or count out of range, or a stream that is needed but has
            fewer indices than ranks.
    """

    def __init__(
        self,
        labeled_indices: Sequence[int],
        unlabeled_indices: Sequence[int],
        labeled_batch: int,
        unlabeled_batch: int,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        with_seeds: bool = False,
    ) -> None:
        self.labeled = np.asarray(list(labeled_indices), dtype=np.int64)
        self.unlabeled = np.asarray(list(unlabeled_indices), dtype=np.int64)
        if labeled_batch < 1:
            raise ConfigError(f"labeled_batch must be >= 1, got {labeled_batch}")
        if unlabeled_batch < 0:
            raise ConfigError(f"unlabeled_batch must be >= 0, got {unlabeled_batch}")
        if num_batches < 1:
            raise ConfigError(f"num_batches must be >= 1, got {num_batches}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if self.labeled.size == 0:
            raise ConfigError("the labeled stream is empty")
        if self.labeled.size < world_size:
            raise ConfigError(
                f"the labeled stream has {self.labeled.size} indices, need at least one per rank "
                f"({world_size})"
            )
        if unlabeled_batch > 0 and self.unlabeled.size < world_size:
            raise ConfigError(
                f"unlabeled_batch is {unlabeled_batch} but the unlabeled stream has "
                f"{self.unlabeled.size} indices (need at least one per rank: {world_size})"
            )
        self.labeled_batch = int(labeled_batch)
        self.unlabeled_batch = int(unlabeled_batch)
        self.num_batches = int(num_batches)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.start_batch = int(start_batch)
        self.with_seeds = with_seeds
        self._cache: dict = {}

    def set_epoch(self, epoch: int) -> None:
        """Start at batch ``epoch * num_batches`` of the global sequence (``DistributedSampler``-style)."""
        self.epoch = int(epoch)
        self.start_batch = self.epoch * self.num_batches

    def _position(self, indices: np.ndarray, tag: int, pos: int, cache: dict) -> int:
        """Item at position ``pos`` of this rank's endless stream of seeded permutations."""
        # Every rank draws the same permutation for a cycle, so the shards of a cycle are disjoint.
        shard = -(-(indices.size - self.rank) // self.world_size)  # len(perm[rank::world_size])
        cycle, offset = divmod(pos, shard)
        key = (tag, cycle)
        if key not in cache:
            cache.clear() if len(cache) > 4 else None
            rng = np.random.default_rng([self.seed, cycle, tag])
            cache[key] = indices[rng.permutation(indices.size)][self.rank :: self.world_size]
        return int(cache[key][offset])

    def batch(self, k: int) -> list[int]:
        """Batch number ``k`` of the global sequence: a pure function of (seed, rank, k), so a run
        resumed at step ``k`` draws exactly what an uninterrupted run would have drawn."""
        cache: dict = self._cache
        out = [self._position(self.labeled, _LABELED, k * self.labeled_batch + j, cache)
               for j in range(self.labeled_batch)]
        out += [self._position(self.unlabeled, _UNLABELED, k * self.unlabeled_batch + j, cache)
                for j in range(self.unlabeled_batch)]
        return out

    def item_seed(self, k: int, j: int) -> int:
        """Augmentation seed of item ``j`` of batch ``k`` (independent of workers and prefetching)."""
        return int(np.random.default_rng([self.seed, k, j, self.rank, 7]).integers(2**31 - 1))

    def __iter__(self) -> Iterator[list]:
        for k in range(self.start_batch, self.start_batch + self.num_batches):
            idx = self.batch(k)
            yield [(i, self.item_seed(k, j)) for j, i in enumerate(idx)] if self.with_seeds else idx

    def __len__(self) -> int:
        return self.num_batches
