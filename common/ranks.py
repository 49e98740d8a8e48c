"""Where this process stands among torchrun's processes, and how the processes talk: the one helper every
stage that runs under torchrun uses (data-parallel collection, DDP training, the multi-GPU benchmarks).

torchrun (torch.distributed.run) starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; without it a script runs as rank 0 of 1, unchanged. The processes join one gloo
process group (CPU, TCP: across nodes as well) for a few small messages (training passes "nccl" for its
gradients on GPUs); only rank 0 prints.
"""
from __future__ import annotations

import atexit
import builtins
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

from common.errors import UserError

TIMEOUT = timedelta(minutes=30)  # a rank waits this long for the others (loading a large model takes minutes)
T = TypeVar("T")


@dataclass
class Ranks:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def leave(self) -> None:
        """The end of a run under torchrun: every rank waits for the others, then tears the process group down
        here rather than at interpreter exit. A rank that tears gloo down while a peer is still talking to it,
        or while the interpreter itself is being torn down, can abort with "terminate called without an active
        exception" after doing all its work (seen once in CI, on rank 1 of a collection that had succeeded)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 and hand its result to every rank; a UserError there is raised on every rank
        (the others would otherwise wait for rank 0 until the timeout)."""
        result: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                result = (True, fn())
            except UserError as e:
                result = (False, str(e))
        ok, value = self.broadcast(result)
        if not ok:
            raise UserError(value)
        return value


def torchrun_ranks() -> Ranks:
    """The rank variables torchrun sets; rank 0 of 1 when they are absent."""
    def env(name: str, default: int) -> int:
        value = os.environ.get(name)
        try:
            return default if value is None else int(value)
        except ValueError:
            raise UserError(f"environment variable {name}={value!r} is not an integer") from None

    ranks = Ranks(env("RANK", 0), env("WORLD_SIZE", 1), env("LOCAL_RANK", 0), env("LOCAL_WORLD_SIZE", 1))
    if not (0 <= ranks.rank < ranks.world and 0 <= ranks.local_rank < ranks.local_world):
        raise UserError(f"RANK {ranks.rank} / WORLD_SIZE {ranks.world} / LOCAL_RANK {ranks.local_rank} / "
                        f"LOCAL_WORLD_SIZE {ranks.local_world} are inconsistent")
    return ranks


def init_ranks(backend: str = "gloo", device_id: Any = None) -> Ranks:
    """Join torchrun's process group (when there is more than one process) and keep the console to rank 0.

    gloo needs nothing but TCP between the hosts; collection uses it only for a few small messages, so it
    never competes with the GPUs. Training passes "nccl" for its gradients on GPUs.
    """
    ranks = torchrun_ranks()
    if ranks.distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            kwargs = {"device_id": device_id} if device_id is not None else {}
            dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
            atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        if not ranks.is_main:
            quiet_print()
    return ranks


def quiet_print() -> None:
    """`print` says nothing on this rank (errors still reach stderr): the plan, the progress and the summary are
    printed once, by rank 0. Pass `force=True` to print from every rank."""
    plain = builtins.print

    def print_if_forced(*args: Any, force: bool = False, **kwargs: Any) -> None:
        if force:
            plain(*args, **kwargs)
    builtins.print = print_if_forced


def rank_device(ranks: Ranks, device: str, gpu: int | None) -> tuple[str, int | None]:
    """(--device, --gpu) for this rank: under torchrun with several processes each takes GPU LOCAL_RANK."""
    if not ranks.distributed:
        return device, gpu
    import torch

    if gpu is not None or (device.startswith("cuda:")):
        raise UserError("under torchrun every rank takes GPU LOCAL_RANK; drop --gpu / --device cuda:N "
                        "(CUDA_VISIBLE_DEVICES chooses which GPUs a node offers)")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        if ranks.local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {ranks.local_world} processes on this node but only "
                            f"{torch.cuda.device_count()} GPU(s) are visible")
        return f"cuda:{ranks.local_rank}", None
    return device, gpu
