"""Several processes collecting one trace set: torchrun's ranks share one seeded plan, shard by shard.

    torchrun --nproc_per_node 2 scripts/collect_traces.py ...        # one process per GPU of this machine

torchrun (torch.distributed.run) starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; without it a script runs as rank 0 of 1, unchanged. Every rank computes the
same plan from --seed (texts, tokens, shards of --shard_size sequences); shard i is collected by rank
i % WORLD_SIZE, on GPU LOCAL_RANK, and keeps the file name of its global index, so the shards are exactly those
of a one-process run. The ranks talk through a gloo process group (CPU, TCP: across nodes as well), only to
agree at the start and to gather shard lists at the end; shards go to the shared --output directory.

Bookkeeping, so that one trace set comes out and a kill of any rank loses only the shards in progress:
- rank 0 alone prepares the directory, writes router_weights.safetensors and manifest.json (no shard yet);
- each rank records every shard it finishes in its own partial manifest `manifest.rankNNNNN.json`;
- at the end rank 0 gathers every rank's list over the process group, writes manifest.json with all shards in
  plan order (the manifest a one-process run writes) and deletes the partial manifests;
- `--resume` (any number of ranks, also one process): rank 0 first folds the partial manifests a killed run
  left into manifest.json, checking every shard they list, then the unfinished shards are given out again,
  shard i to rank i % WORLD_SIZE.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from collection.traces.format import Manifest, ShardInfo, TraceFormatError, TraceShard, write_manifest
from common.atomic import PARTIAL_SUFFIX, atomic_write_json
from common.paths import refuse_symlink, set_file
from common.ranks import Ranks

PARTIAL_MANIFEST_GLOB = "manifest.rank*.json"


def partial_manifest_name(rank: int) -> str:
    return f"manifest.rank{rank:05d}.json"


def partial_manifest_files(out: Path) -> list[Path]:
    """Every rank's partial manifest in `out`, and the temporary file of one whose atomic write a kill cut short:
    exactly the names this tool writes (a user's file that only resembles them is not listed)."""
    name = re.compile(r"manifest\.rank\d{5}\.json(" + re.escape(PARTIAL_SUFFIX) + ")?")
    return sorted(p for p in Path(out).glob(PARTIAL_MANIFEST_GLOB + "*") if name.fullmatch(p.name))


# ----------------------------------------------------------------------------------------------
# which shards are done, which are this rank's, and who writes that down


def shard_index(info: ShardInfo) -> int:
    return int(info.file.removeprefix("shard_").split(".")[0])


def rank_shards(n_shards: int, done: set[int], ranks: Ranks) -> list[int]:
    """This rank's unfinished shards: shard i belongs to rank i % world."""
    return [i for i in range(n_shards) if i not in done and i % ranks.world == ranks.rank]


def fold_partial_manifests(out: Path, manifest: Manifest, write: bool = True) -> Manifest:
    """Add the shards listed by partial manifests (a killed multi-rank run) to `manifest`, each checked
    against its size and checksum (one that fails is dropped and collected again), and (`write`) write
    manifest.json and delete the partial manifests; without `write` the caller does both once it may write.
    Rank 0 only, before any rank starts collecting."""
    partials = sorted(out.glob(PARTIAL_MANIFEST_GLOB))
    if not partials:
        return manifest
    listed = {s.file for s in manifest.shards}
    dropped = 0
    for path in partials:
        refuse_symlink(path, "partial manifest", TraceFormatError)
        try:
            partial = json.loads(path.read_text())
            # the entries as a manifest holds them: every name checked (FILE_FIELDS), every count typed
            infos = Manifest.from_json({**manifest.to_json(), "shards": partial["shards"]}, path).shards
        except (OSError, ValueError, KeyError, TypeError, RecursionError, TraceFormatError):
            raise TraceFormatError(f"{path}: unreadable partial manifest; delete it to collect its shards again") from None
        if partial.get("tokens_sha256") != manifest.plan.get("tokens_sha256"):
            raise TraceFormatError(f"{path}: belongs to another collection plan than {out / 'manifest.json'}")
        for info in infos:
            if info.file in listed:
                continue
            try:
                TraceShard(set_file(out, info.file), info, manifest, verify=True)
            except TraceFormatError:
                dropped += 1
                continue
            manifest.shards.append(info)
            listed.add(info.file)
    manifest.shards.sort(key=shard_index)
    if write:
        write_manifest(out, manifest)
        for path in partials:
            set_file(out, path.name).unlink()
    print(f"resume: folded {len(partials)} partial manifest(s) into {out / 'manifest.json'}"
          + (f"; {dropped} listed shard(s) failed their check and will be collected again" if dropped else ""))
    return manifest


class ShardLedger:
    """The shards of one collection: which are done, which this rank collects, and where each finished one
    is recorded (manifest.json in one process; this rank's partial manifest under torchrun)."""

    def __init__(self, out: Path, manifest: Manifest, n_shards: int, ranks: Ranks):
        self.out, self.manifest, self.n_shards, self.ranks = out, manifest, n_shards, ranks
        self.done = {shard_index(s) for s in manifest.shards}
        self.todo = rank_shards(n_shards, self.done, ranks)
        self.mine: list[ShardInfo] = []

    def remaining(self) -> list[int]:
        """Every rank's unfinished shards (the disk-space check counts them all)."""
        return [i for i in range(self.n_shards) if i not in self.done]

    def record(self, info: ShardInfo) -> None:
        """A shard of this rank is committed (called on the writer thread, in shard order)."""
        if not self.ranks.distributed:
            self.manifest.shards.append(info)
            self.manifest.shards.sort(key=shard_index)
            self.manifest.complete = len(self.manifest.shards) == self.n_shards
            write_manifest(self.out, self.manifest)
            return
        self.mine.append(info)
        atomic_write_json(self.out / partial_manifest_name(self.ranks.rank),
                          {"rank": self.ranks.rank, "world": self.ranks.world,
                           "tokens_sha256": self.manifest.plan.get("tokens_sha256"),
                           "shards": [vars(s) for s in self.mine]})

    def finish(self) -> Manifest:
        """Once every rank is done: rank 0 writes the one manifest listing every shard, in plan order."""
        if not self.ranks.distributed:
            return self.manifest
        everyone = self.ranks.all_gather(self.mine)  # returns only when every rank has finished its shards
        listed = {s.file for s in self.manifest.shards}
        self.manifest.shards += [s for part in everyone for s in part if s.file not in listed]
        self.manifest.shards.sort(key=shard_index)
        self.manifest.complete = len(self.manifest.shards) == self.n_shards
        if self.ranks.is_main:
            write_manifest(self.out, self.manifest)
            for r in range(self.ranks.world):
                set_file(self.out, partial_manifest_name(r)).unlink(missing_ok=True)
        self.ranks.barrier()  # no rank reports success before the manifest is written
        return self.manifest
