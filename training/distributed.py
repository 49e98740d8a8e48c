"""Training a predictor on several GPUs: DistributedDataParallel under torchrun, the same run otherwise.

    torchrun --nproc_per_node 2 scripts/train_simple_predictor.py ...   # one process per GPU, NCCL

Without torchrun (one process) every function here is the identity and the loop runs exactly as before.
Under torchrun with N processes:

- each rank takes GPU LOCAL_RANK (gloo on CPU), and prints nothing: rank 0 speaks for all;
- each rank reads its part of every shard group: the training sequences of every shard are cut into N
  contiguous parts of about equal tokens, and rank r loads part r of each shard of a group (`rank_sequences`),
  so a group's rows are read once overall, not N times;
- a step takes the same rows overall as one process's step: --batch-size (or --batch-rows) counts the rows of
  one step summed over the ranks, so the learning rate, the seed's recipe and the number of steps per epoch
  do not change with N. Each group is walked in the same number of steps on every rank (`row_batches`), and
  each rank's loss is weighted by its share of the step's rows, so the averaged gradient DDP applies is that of
  the mean loss over all the step's rows, as in one process;
- validation runs on rank 0 over the whole validation split and its metrics are sent to every rank, so every
  rank picks the same best epoch; rank 0 alone writes checkpoints and results.json.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
from torch import nn

from collection.traces.rows import TokenBlock
from collection.traces.rows import row_batches as one_process_row_batches
from common.device import pick_device
from common.errors import UserError
from common.ranks import Ranks, init_ranks, rank_device, torchrun_ranks

T = TypeVar("T")


class DataParallel:
    """This process's share of a training run (rank 0 of 1 without torchrun)."""

    def __init__(self, ranks: Ranks, device: torch.device):
        self.ranks, self.device = ranks, device

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    @property
    def world(self) -> int:
        return self.ranks.world

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls: DDP around `model` under torchrun (its backward averages the
        gradients over the ranks); `model` itself in one process. Checkpoints and validation use `model`."""
        if not self.ranks.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)

    def rank_sequences(self, table: dict[str, np.ndarray], seq_ids: np.ndarray) -> np.ndarray:
        """This rank's part of the sequences `seq_ids`: in every shard, the part `rank` of `world` contiguous
        parts of about equal tokens. All of `seq_ids` in one process."""
        if not self.ranks.distributed:
            return seq_ids
        W, r = self.ranks.world, self.ranks.rank
        chosen = np.isin(table["seq_id"], seq_ids)
        mine = []
        for shard in np.unique(table["shard"][chosen]):
            in_shard = chosen & (table["shard"] == shard)
            ids, lengths = table["seq_id"][in_shard], table["length"][in_shard]
            if len(ids) < W:
                raise UserError(f"shard {shard} holds {len(ids)} training sequence(s), fewer than the {W} processes: "
                                f"every rank needs a part of every shard; use fewer processes")
            mine.append(ids[split_by_tokens(lengths, W) == r])
        return np.sort(np.concatenate(mine)) if mine else seq_ids[:0]

    def agree(self, flag: bool) -> bool:
        """True only if `flag` is true on every rank (decisions that change the order of work must agree)."""
        if not self.ranks.distributed:
            return flag
        return all(self.ranks.all_gather(bool(flag)))

    def row_batches(self, block: TokenBlock, layers: list[int], rows_per_step: int,
                    generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        """(token rows, input layers, loss weight) for every step over this rank's rows of a group.

        One process: `collection.traces.rows.row_batches`, weight 1. Under torchrun every rank takes the same number of
        steps (DDP needs a backward on every rank for each step): ceil(group rows / rows_per_step), fewer if a
        rank has fewer rows than that. Rank r's step i holds n[r, i] of its shuffled rows and weighs its mean
        loss by world * n[r, i] / sum_r n[r, i], so the gradient DDP averages is the gradient of the mean over the
        step's rows of all ranks.
        """
        if not self.ranks.distributed:
            for tok, layer in one_process_row_batches(block, layers, rows_per_step, generator):
                yield tok, layer, 1.0
            return
        counts = np.array(self.ranks.all_gather(block.tokens * len(layers)), dtype=np.int64)  # rows per rank
        steps = max(1, min(math.ceil(counts.sum() / rows_per_step), int(counts.min())))
        sizes = step_sizes(counts, steps)  # (world, steps)
        weights = loss_weights(sizes)[self.ranks.rank]
        N = block.tokens
        layer_t = torch.tensor(layers, device=block.topk_ids.device)
        order = torch.randperm(int(counts[self.ranks.rank]), generator=generator, device="cpu").to(layer_t.device)
        for chunk, weight in zip(order.split(sizes[self.ranks.rank].tolist()), weights.tolist()):
            yield chunk % N, layer_t[chunk // N], weight

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of `x` over the ranks (`x` itself in one process)."""
        if not self.ranks.distributed:
            return x
        import torch.distributed as dist

        y = x.detach().clone().float()
        dist.all_reduce(y)
        return y / self.world

    def total(self, n: int) -> int:
        """The sum of `n` over the ranks."""
        return sum(self.ranks.all_gather(int(n))) if self.ranks.distributed else n

    def from_main(self, fn: Callable[[], T]) -> T:
        """`fn()` run on rank 0 only, its result handed to every rank (validation: one set of metrics, so
        every rank makes the same checkpoint choice)."""
        if not self.ranks.distributed:
            return fn()
        return self.ranks.broadcast(fn() if self.is_main else None)


def split_by_tokens(lengths: np.ndarray, parts: int) -> np.ndarray:
    """Part index (0..parts-1) of each sequence: `parts` contiguous runs of about equal tokens (a sequence goes
    to the part its middle token falls in), every part non-empty when there are at least `parts` sequences."""
    lengths = np.asarray(lengths, dtype=np.int64)
    middle = np.cumsum(lengths) - lengths / 2
    part = np.minimum((middle * parts / lengths.sum()).astype(np.int64), parts - 1)
    if len(lengths) >= parts and len(np.unique(part)) < parts:  # very unequal lengths: equal counts instead
        part = np.repeat(np.arange(parts), [len(a) for a in np.array_split(lengths, parts)])
    return part


def step_sizes(counts: np.ndarray, steps: int) -> np.ndarray:
    """(ranks, steps) rows per step: rank r's counts[r] rows cut into `steps` near-equal consecutive chunks
    (the first counts[r] % steps chunks one row larger), as torch.tensor_split cuts them."""
    counts = np.asarray(counts, dtype=np.int64)[:, None]
    i = np.arange(steps)[None, :]
    return counts // steps + (i < counts % steps)


def loss_weights(sizes: np.ndarray) -> np.ndarray:
    """(ranks, steps) factors of each rank's mean loss: world * n[r, i] / sum_r n[r, i]. DDP averages the ranks'
    gradients, so sum_r (1/world) * factor * grad(mean_r) = sum_r n[r, i] / n[i] * grad(mean_r) = grad(mean over
    all n[i] rows of step i)."""
    return sizes.shape[0] * sizes / sizes.sum(0)


def data_parallel(device: str, gpu: int | None) -> DataParallel:
    """Join torchrun's process group when there is one (NCCL on GPUs, gloo on CPU) and pick this rank's device."""
    ranks = torchrun_ranks()
    if not ranks.distributed:
        return DataParallel(ranks, pick_device(device, gpu))
    dev = pick_device(*rank_device(ranks, device, gpu), verbose=False)  # GPU LOCAL_RANK, or the CPU
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL and the allocator default to this rank's GPU
    ranks = init_ranks("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    print(f"data parallel: {ranks.world} processes (DDP, {'NCCL' if dev.type == 'cuda' else 'gloo'}); "
          f"rank 0 on {dev}")
    return DataParallel(ranks, dev)


def describe(dp: DataParallel, rows_per_step: int) -> str:
    """One line on how a step is shared out (empty in one process)."""
    if dp.world == 1:
        return ""
    return f", summed over {dp.world} processes: about {rows_per_step // dp.world:,} each"

