"""Multi-source batch schedules: alternate one batch per data set (MultiCheXNet Alg. 1) or mix them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from multichex.data.record import CXRBatch, collate_samples
from multichex.data.sources import CXRDataset


class RankShardSampler(Sampler[int]):
    """This rank's share of one epoch's order: ``order[rank::world]``, the order wrapped round first so
    every rank gets ``ceil(n / world)`` indices (like ``DistributedSampler(drop_last=False)``).

    The order is what ``RandomSampler(dataset, generator=generator)`` yields (``torch.randperm(n,
    generator=generator)``, drawn lazily when iteration starts, i.e. after the DataLoader has taken its
    base seed from the same generator), or ``0..n-1`` without a generator; with ``world=1`` this sampler
    is that sampler, index for index.
    """

    def __init__(self, n: int, generator: torch.Generator | None, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.n, self.generator, self.rank, self.world = n, generator, rank, world

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def __iter__(self) -> Iterator[int]:
        if self.n == 0:
            return
        order = torch.randperm(self.n, generator=self.generator).tolist() if self.generator is not None else list(range(self.n))
        total = len(self) * self.world
        while len(order) < total:
            order += order[: total - len(order)]
        yield from order[self.rank : total : self.world]


def make_loader(
    dataset: CXRDataset, batch_size: int, shuffle: bool, seed: int, epoch: int, num_workers: int = 0, rank: int = 0, world: int = 1
) -> DataLoader:
    """A loader whose order depends only on (seed, epoch), so a resumed run sees the same batches; under
    data parallelism it reads rank ``rank``'s shard of that order (batch ``j`` of all ranks together is
    batch ``j`` of one process with ``world`` times the batch size)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    # Not DistributedSampler: it seeds its own generator (seed + epoch) and skips the DataLoader's base-seed
    # draw, so even with one rank its order differs from the RandomSampler order single-process runs use.
    sampler = RankShardSampler(len(dataset), generator if shuffle else None, rank, world)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=generator,
        num_workers=num_workers,
        collate_fn=collate_samples,
        drop_last=False,
    )


class AlternatingBatches:
    """Yields ``(source_name, batch)`` taking one batch from each source in turn.

    Each epoch has ``steps`` batches; a source that runs out restarts with a new shuffle, so small
    data sets are revisited while large ones are still being read (Algorithm 1, lines 7–11).

    Under data parallelism (``world`` ranks) each rank reads its shard of every shuffle with
    ``batch_size`` per rank; all ranks have equally many batches per pass, so they take the same
    source at the same step and restart it together.
    """

    def __init__(self, datasets: dict[str, CXRDataset], batch_size: int, seed: int, num_workers: int = 0, rank: int = 0, world: int = 1) -> None:
        if not datasets:
            raise ValueError("no training data sets given")
        self.datasets = datasets
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.rank = rank
        self.world = world

    def _batches_per_pass(self, n: int) -> int:
        """Batches per rank in one pass over ``n`` images (= ceil(n / (world × batch_size)))."""
        per_rank = -(-n // self.world)
        return -(-per_rank // self.batch_size)

    def default_steps(self) -> int:
        """One pass over the largest source, visited once per round of all sources."""
        largest = max(len(d) for d in self.datasets.values())
        return len(self.datasets) * self._batches_per_pass(largest)

    def epoch(self, epoch: int, steps: int, start_step: int = 0) -> Iterator[tuple[int, str, CXRBatch | None]]:
        names: Sequence[str] = list(self.datasets)
        iterators: dict[str, Iterator] = {}
        restarts = {name: 0 for name in names}

        def next_batch(name: str) -> CXRBatch | None:
            while True:
                if name not in iterators:
                    dataset = self.datasets[name]
                    dataset.set_epoch(epoch * 1000 + restarts[name])
                    loader = make_loader(dataset, self.batch_size, True, self.seed + 7919 * names.index(name), epoch * 1000 + restarts[name],
                                         self.num_workers, self.rank, self.world)
                    iterators[name] = iter(loader)
                try:
                    return next(iterators[name])
                except StopIteration:
                    del iterators[name]
                    restarts[name] += 1

        for step in range(steps):
            name = names[step % len(names)]
            batch = next_batch(name)
            if step >= start_step:
                yield step, name, batch


class JointBatches(AlternatingBatches):
    """All sources concatenated and shuffled together: each batch mixes data sets."""

    def __init__(self, datasets: dict[str, CXRDataset], batch_size: int, seed: int, num_workers: int = 0, rank: int = 0, world: int = 1) -> None:
        super().__init__(datasets, batch_size, seed, num_workers, rank, world)
        self.joint = _ConcatCXR(list(datasets.values()))

    def default_steps(self) -> int:
        return self._batches_per_pass(len(self.joint))

    def epoch(self, epoch: int, steps: int, start_step: int = 0) -> Iterator[tuple[int, str, CXRBatch | None]]:
        restart = 0
        step = 0
        while step < steps:
            self.joint.set_epoch(epoch * 1000 + restart)
            for batch in make_loader(self.joint, self.batch_size, True, self.seed, epoch * 1000 + restart, self.num_workers,
                                     self.rank, self.world):
                if step >= steps:
                    return
                if step >= start_step:
                    yield step, "joint", batch
                step += 1
            restart += 1


class _ConcatCXR(torch.utils.data.ConcatDataset):
    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_epoch(epoch)
