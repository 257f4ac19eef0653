"""Multi-source batch schedules: alternate one batch per data set (MultiCheXNet Alg. 1) or mix them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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


@dataclass(frozen=True)
class LoaderOptions:
    """How batches are read: loader processes and what they do ahead of the model (see ``TrainConfig``)."""

    num_workers: int = 0
    pin_memory: bool = False  # page-locked batches, so copies to a GPU can be asynchronous
    persistent_workers: bool = True  # keep the processes from pass to pass (only with num_workers > 0)
    prefetch_factor: int = 2  # batches each process prepares ahead (only with num_workers > 0)

    def share(self, sources: int) -> "LoaderOptions":
        """Each of ``sources`` loaders' share of the processes: the schedules read one source per step, so
        the processes of the sources not being read prefetch while another is (at least one each)."""
        if self.num_workers == 0 or sources <= 1:
            return self
        return replace(self, num_workers=max(1, -(-self.num_workers // sources)))


class _PassSampler(Sampler[tuple[int, int]]):
    """The indices of one pass (set by :meth:`start` before each pass), each paired with the pass's key.

    The key travels with every index to the data set copies in the loader's processes, which persist from
    pass to pass and so never see :meth:`CXRDataset.set_epoch` calls made in the main process.
    """

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world
        self.key, self.generator = 0, None

    def start(self, key: int, generator: torch.Generator | None) -> None:
        self.key, self.generator = key, generator

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.generator is not None:
            # Loaders before persistent processes drew their base seed from this generator first; one draw
            # is skipped so each pass's order is the one those runs (and their checkpoints) saw.
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        for index in RankShardSampler(self.n, self.generator, self.rank, self.world):
            yield self.key, index


class _PassIndexed(Dataset):
    """``dataset[(key, index)]``: item ``index`` with the augmentation of pass ``key`` (``set_epoch(key)``)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]):
        key, index = item
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(key)
        return self.dataset[index]


class PassLoader:
    """One data set's batches, pass after pass, from one DataLoader (its processes persist between passes).

    A pass's order depends only on (seed, pass key), so a resumed run sees the same batches, and its
    augmentation is that of ``set_epoch(pass key)``; under data parallelism each rank reads its shard of
    that order (batch ``j`` of all ranks together is batch ``j`` of one process with ``world`` times the
    batch size). Per-process seeding: augmentation draws from (seed, pass key, index) alone, so the same
    run gives the same batches with any number of processes.
    """

    def __init__(self, dataset: Dataset, batch_size: int, options: LoaderOptions | None = None, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        options = options or LoaderOptions()
        self.sampler = _PassSampler(len(dataset), rank, world)  # type: ignore[arg-type]
        workers = options.num_workers
        self.loader = DataLoader(
            _PassIndexed(dataset),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=_collate,
            drop_last=False,
            pin_memory=options.pin_memory,
            persistent_workers=options.persistent_workers and workers > 0,
            prefetch_factor=options.prefetch_factor if workers > 0 else None,
            generator=torch.Generator().manual_seed(0),  # the processes' base seeds; never the global RNG
        )

    def batches(self, seed: int, key: int, shuffle: bool = True) -> Iterator[CXRBatch | None]:
        """The batches of pass ``key`` (shuffled with ``seed``: the same order for the same pair)."""
        self.sampler.start(key, torch.Generator().manual_seed(seed * 1_000_003 + key) if shuffle else None)
        return iter(self.loader)


def _collate(samples):
    return collate_samples(samples)  # looked up at call time (tests replace it)


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, epoch: int, num_workers: int = 0, rank: int = 0, world: int = 1
) -> Iterator[CXRBatch | None]:
    """The batches of one pass (``epoch`` is the pass key) of a fresh :class:`PassLoader`."""
    return PassLoader(dataset, batch_size, LoaderOptions(num_workers=num_workers), rank, world).batches(seed, epoch, shuffle)


class AlternatingBatches:
    """Yields ``(source_name, batch)`` taking one batch from each source in turn.

    Each epoch has ``steps`` batches; a source that runs out restarts with a new shuffle, so small
    data sets are revisited while large ones are still being read (Algorithm 1, lines 7–11).

    Under data parallelism (``world`` ranks) each rank reads its shard of every shuffle with
    ``batch_size`` per rank; all ranks have equally many batches per pass, so they take the same
    source at the same step and restart it together.
    """

    def __init__(self, datasets: dict[str, CXRDataset], batch_size: int, seed: int, loading: int | LoaderOptions = 0,
                 rank: int = 0, world: int = 1) -> None:
        """``loading``: a :class:`LoaderOptions` (an integer: that many loader processes), shared by the sources."""
        if not datasets:
            raise ValueError("no training data sets given")
        self.datasets = datasets
        self.batch_size = batch_size
        self.seed = seed
        self.options = loading if isinstance(loading, LoaderOptions) else LoaderOptions(num_workers=loading)
        self.rank = rank
        self.world = world
        self._loaders: dict[str, PassLoader] = {}

    def loader(self, name: str, dataset: Dataset, sources: int) -> PassLoader:
        """The (lazily built, then reused) loader of one source."""
        if name not in self._loaders:
            self._loaders[name] = PassLoader(dataset, self.batch_size, self.options.share(sources), self.rank, self.world)
        return self._loaders[name]

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
                    loader = self.loader(name, self.datasets[name], len(names))
                    iterators[name] = loader.batches(self.seed + 7919 * names.index(name), epoch * 1000 + restarts[name])
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

    def __init__(self, datasets: dict[str, CXRDataset], batch_size: int, seed: int, loading: int | LoaderOptions = 0,
                 rank: int = 0, world: int = 1) -> None:
        super().__init__(datasets, batch_size, seed, loading, rank, world)
        self.joint = _ConcatCXR(list(datasets.values()))

    def default_steps(self) -> int:
        return self._batches_per_pass(len(self.joint))

    def epoch(self, epoch: int, steps: int, start_step: int = 0) -> Iterator[tuple[int, str, CXRBatch | None]]:
        restart = 0
        step = 0
        while step < steps:
            for batch in self.loader("joint", self.joint, 1).batches(self.seed, epoch * 1000 + restart):
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
