"""The DataLoader over whole batches: indices are (epoch, batch) pairs, so workers, DDP shards and resumes agree."""

from __future__ import annotations

import os
import signal
from functools import partial

import torch
from torch.utils.data import DataLoader, Sampler

from library.data.dataset import Batch, TrainingDataset


class EpochBatchSampler(Sampler):
    """Yields (epoch, batch index) for epochs start_epoch.., skipping `skip` batches of the first (resume)."""

    def __init__(self, batches_per_epoch: int, *, start_epoch: int, epochs: int, skip: int = 0):
        self.batches_per_epoch = batches_per_epoch
        self.start_epoch, self.epochs, self.skip = start_epoch, epochs, skip

    def __iter__(self):
        for epoch in range(self.start_epoch, self.epochs + 1):
            first = self.skip if epoch == self.start_epoch else 0
            for index in range(first, self.batches_per_epoch):
                yield epoch, index

    def __len__(self) -> int:
        return max(0, (self.epochs - self.start_epoch + 1) * self.batches_per_epoch - self.skip)


class EpochIndexedDataset(torch.utils.data.Dataset):
    """TrainingDataset addressed by (epoch, index): no epoch state to keep in sync with worker processes."""

    def __init__(self, dataset: TrainingDataset, *, batches_per_step: int = 1):
        self.dataset = dataset
        self.batches_per_step = batches_per_step  # gradient accumulation × processes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, Batch]:
        epoch, index = key
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        # the optimizer step this batch feeds, for token warm-up (known from the position alone)
        self.dataset.set_step(((epoch - 1) * len(self.dataset) + index) // self.batches_per_step)
        return epoch, index, self.dataset[index]


def _single(items):
    return items[0]


_exiting = None  # a byte in shared memory: 1 once this process's interpreter is exiting (see _loader_workers_exit)


def _exiting_flag():
    """The shared flag the workers read, created once per process with the atexit hook that sets it. Registered after
    multiprocessing's own exit hook, so it runs first (atexit is last-in, first-out)."""
    global _exiting
    if _exiting is None:
        import atexit
        import multiprocessing

        _exiting = multiprocessing.RawValue("b", 0)
        atexit.register(_loader_workers_exit)
    return _exiting


def _loader_workers_exit() -> None:
    """At exit, multiprocessing ends the daemonic loader workers still alive with SIGTERM and then waits for each:
    they must obey it now. (Workers outlive a run that stopped with an error: the traceback keeps the loader's
    iterator alive, so it never shut them down; waiting on a worker that ignores SIGTERM hung the process forever.)"""
    _exiting.value = 1


def _worker_init(exiting, _worker_id: int) -> None:
    """In each loader worker: a SIGTERM sent to the whole process group (timeout, Slurm's scancel, a terminal closing)
    must reach only the main process, which saves before stopping; a worker killed by it would abort that save. So
    the worker ignores SIGTERM, until the main process's interpreter is exiting: then it exits at once, with status 0
    (torch's SIGCHLD handler in the main process would report a worker killed by a signal as a crash). Workers also
    exit when the loader shuts down or the main process dies (torch's watchdog)."""
    def on_sigterm(_signum, _frame):
        if exiting.value:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)


def make_loader(dataset: TrainingDataset, sampler: EpochBatchSampler, *, workers: int, persistent: bool,
                batches_per_step: int = 1) -> DataLoader:
    workers = max(0, min(workers, (os.cpu_count() or 1)))
    indexed = EpochIndexedDataset(dataset, batches_per_step=batches_per_step)
    return DataLoader(indexed, batch_size=1, sampler=sampler, collate_fn=_single,
                      num_workers=workers, persistent_workers=persistent and workers > 0,
                      worker_init_fn=partial(_worker_init, _exiting_flag()) if workers > 0 else None)
