"""Multi-source batch schedules: alternate one batch per data set (MultiCheXNet Alg. 1) or mix them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from multichex.data.record import CXRBatch, collate_samples
from multichex.data.sources import CXRDataset


def make_loader(dataset: CXRDataset, batch_size: int, shuffle: bool, seed: int, epoch: int, num_workers: int = 0) -> DataLoader:
    """A loader whose order depends only on (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        collate_fn=collate_samples,
        drop_last=False,
    )


class AlternatingBatches:
    """Yields ``(source_name, batch)`` taking one batch from each source in turn.

    Each epoch has ``steps`` batches; a source that runs out restarts with a new shuffle, so small
    data sets are revisited while large ones are still being read (Algorithm 1, lines 7–11).
    """

    def __init__(self, datasets: dict[str, CXRDataset], batch_size: int, seed: int, num_workers: int = 0) -> None:
        if not datasets:
            raise ValueError("no training data sets given")
        self.datasets = datasets
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers

    def default_steps(self) -> int:
        """One pass over the largest source, visited once per round of all sources."""
        largest = max(len(d) for d in self.datasets.values())
        return len(self.datasets) * -(-largest // self.batch_size)

    def epoch(self, epoch: int, steps: int, start_step: int = 0) -> Iterator[tuple[int, str, CXRBatch | None]]:
        names: Sequence[str] = list(self.datasets)
        iterators: dict[str, Iterator] = {}
        restarts = {name: 0 for name in names}

        def next_batch(name: str) -> CXRBatch | None:
            while True:
                if name not in iterators:
                    dataset = self.datasets[name]
                    dataset.set_epoch(epoch * 1000 + restarts[name])
                    loader = make_loader(dataset, self.batch_size, True, self.seed + 7919 * names.index(name), epoch * 1000 + restarts[name], self.num_workers)
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

    def __init__(self, datasets: dict[str, CXRDataset], batch_size: int, seed: int, num_workers: int = 0) -> None:
        super().__init__(datasets, batch_size, seed, num_workers)
        self.joint = _ConcatCXR(list(datasets.values()))

    def default_steps(self) -> int:
        return -(-len(self.joint) // self.batch_size)

    def epoch(self, epoch: int, steps: int, start_step: int = 0) -> Iterator[tuple[int, str, CXRBatch | None]]:
        restart = 0
        step = 0
        while step < steps:
            self.joint.set_epoch(epoch * 1000 + restart)
            for batch in make_loader(self.joint, self.batch_size, True, self.seed, epoch * 1000 + restart, self.num_workers):
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
