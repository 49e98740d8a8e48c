r"""Rewrite a trace set's hidden states in another format (e.g. a lossless set into a compact one).

Every shard is read, its hidden states are re-encoded by collection/traces/hidden_format.py (the same code that
encodes them at collection), and the other tensors are copied unchanged; the new set gets its own manifest
(with `capture.transcoded_from`) and checksums. A compact source is decoded first, so its loss carries over.

Compact copy of the embedded default's traces, as collection with --hidden-format would have written them:
    python scripts/transcode_traces.py --traces routing_data/traces/qwen2moe-mini --hidden-format pca-3.5bit \
        --output routing_data/traces/qwen2moe-mini-pca35
Seconds on a CPU (a bf16 copy of a quick trace set):
    python scripts/collect_traces.py --target_traces 60 --shard_size 30 --max_length 64 --output /tmp/q --overwrite
    python scripts/transcode_traces.py --traces /tmp/q --hidden-format lossless --hidden-dtype bfloat16 --output /tmp/q16
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from tqdm import tqdm

from collection.collector import FIT_TOKENS
from collection.traces.format import (
    COMPACT_FORMAT_VERSION,
    FORMAT_VERSION,
    MANIFEST,
    ROUTER_WEIGHTS,
    Manifest,
    ShardInfo,
    ShardWriter,
    TraceSet,
    bytes_per_token,
    encode_codec,
    manifest_dims,
    shard_specs,
    write_manifest,
)
from collection.traces.hidden_format import CODEC_FILE, FORMATS, LOSSLESS, HiddenFormat, fit_codec
from collection.traces.locks import read_fd
from collection.traces.output import OutputLock, open_output, start_one_shot
from common.atomic import atomic_write_bytes
from common.device import pick_device
from common.errors import UserError, one_line_errors
from common.paths import check_writable, set_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", required=True, help="trace directory to read")
    p.add_argument("--hidden-format", required=True, choices=list(FORMATS), help="format of the copy's hidden states")
    p.add_argument("--hidden-dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="lossless target only: storage dtype (default: the source's)")
    p.add_argument("--output", required=True, help="new trace directory")
    p.add_argument("--overwrite", action="store_true", help="replace a trace set already in --output")
    p.add_argument("--no-verify", action="store_true", help="skip the source shards' checksums")
    p.add_argument("--device", default="auto", help="where to encode: auto (a GPU if there is one), cpu, cuda:N")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_writable("--output", args.output, "dir")  # before any input is read
    lock = OutputLock(Path(args.output))
    try:
        transcode(args, lock)
    finally:
        lock.release()


def transcode(args: argparse.Namespace, lock: OutputLock) -> None:
    # --- every input is checked before the output is touched (rules: collection/traces/output.py)
    src = TraceSet(Path(args.traces), verify=not args.no_verify)
    out = Path(args.output)
    if out.resolve() == src.dir.resolve() or src.dir.resolve().is_relative_to(out.resolve()):
        raise UserError("--output must differ from --traces (and not contain it)")
    if args.hidden_dtype and args.hidden_format != LOSSLESS:
        raise UserError("--hidden-dtype applies to --hidden-format lossless only (compact formats decode to any dtype)")
    m = src.manifest
    fmt = FORMATS[args.hidden_format]
    if (why := fmt.check(m.hidden_size)):
        raise UserError(f"--hidden-format {fmt.name}: {why}")
    if not m.hidden_layers:
        raise UserError(f"{src.dir} stores no hidden states: nothing to transcode")
    if fmt.router_weight and not (src.dir / ROUTER_WEIGHTS).is_file():
        raise UserError(f"--hidden-format {fmt.name} is fitted with the model's router weights, which {src.dir} does "
                        f"not hold ({ROUTER_WEIGHTS}); choose pca-3.5bit")
    state = open_output(out, lock, args.overwrite)
    # an existing set is replaced only once the new one is complete: it is written beside it first
    names = [s.file for s in m.shards] + [MANIFEST, ROUTER_WEIGHTS] + ([CODEC_FILE] if fmt.fitted else [])
    hidden_dtype = args.hidden_dtype or str(m.capture.get("hidden_dtype", "float16"))
    dims = {**manifest_dims(m), "hidden_dtype": hidden_dtype, "hidden_format": fmt.name}
    target = start_one_shot(state, lock, args.overwrite, names,
                            sum(s.tokens for s in m.shards) * bytes_per_token(**dims), "choose another --output")
    print(f"transcoding {len(src)} shards of {src.dir} into {fmt.name} at {out} ({target.sizes})")
    written: list[str] = []
    try:
        report = _write(args, src, target.dest, fmt, hidden_dtype, dims, written)
    except BaseException:
        target.abandon(written)  # a refused input leaves the directory as it was found
        raise
    target.finish()
    print(report.format(out=out))  # the set's real place, once it is there (it was written in the staging directory)


def _write(args: argparse.Namespace, src: TraceSet, out: Path, fmt: HiddenFormat, hidden_dtype: str, dims: dict,
           written: list[str]) -> str:
    """The new set into `out`, each file's name appended to `written` before it is created; returns the closing
    line, with `{out}` for the set's final place."""
    m = src.manifest
    device = pick_device(args.device)
    src_fmt = FORMATS[m.hidden_format]
    src_codec = src.hidden_codec(device)

    def source_rows(sh, j: int, rows: slice = slice(None)) -> torch.Tensor:
        """Stored layer j's hidden rows of shard `sh` on the device, decoded if the source is compact (NaN or
        infinite values refused, naming the shard and layer, as every reader refuses them)."""
        stored = src.check_finite(sh, "hidden", sh.tensor("hidden", (slice(j, j + 1), rows)), j)[0]
        if src_fmt.lossless:
            return stored.to(device)
        scale = src.check_finite(sh, "hidden_scale", sh.tensor("hidden_scale", (slice(j, j + 1), rows)), j)[0]
        return src_fmt.decode(stored.to(device), scale.to(device), torch.float32, src_codec, j)
    # the source's capture settings, less what described its own stored format (a fitted codec is the source's)
    kept = {k: v for k, v in m.capture.items() if k != "hidden_codec"}
    capture = {**kept, "hidden_dtype": hidden_dtype, "hidden_format": fmt.name,
               "bytes_per_token": bytes_per_token(**dims),
               "transcoded_from": {"traces": str(src.dir), "hidden_format": m.hidden_format,
                                   "hidden_dtype": m.capture.get("hidden_dtype")}}
    new = Manifest(model=m.model, routing=m.routing, capture=capture, sources=m.sources, plan=m.plan,
                   format_version=FORMAT_VERSION if fmt.lossless else COMPACT_FORMAT_VERSION,
                   router_weights=m.router_weights)
    # files go in after the manifest that lists them, as collection writes them
    # through the descriptor the reader checked: never the name again (collection/traces/locks.py)
    router_bytes = read_fd(src.router_file().fd) if m.router_weights is not None else None
    if router_bytes is not None and hashlib.sha256(router_bytes).hexdigest() != m.router_weights.sha256:
        raise UserError(f"{src.dir / ROUTER_WEIGHTS}: checksum mismatch with its manifest (corrupt or replaced)")
    codec, codec_bytes = None, None
    if fmt.fitted:  # fitted as collection fits it: on the first tokens of the first shard
        rows = slice(0, min(FIT_TOKENS, src.shard(0).info.tokens))
        xs = [source_rows(src.shard(0), j, rows).double() for j in range(len(m.hidden_layers))]
        routers = src.router_weights().float() if fmt.router_weight else None  # checked present in `transcode`
        codec = fit_codec(fmt, torch.stack([x.T @ x / x.shape[0] for x in xs]), routers, m.hidden_layers)
        codec_bytes, new.capture["hidden_codec"] = encode_codec(codec, rows.stop)
        codec = codec.to(device)
    written.append(MANIFEST)
    write_manifest(out, new)
    for name, data in ((ROUTER_WEIGHTS, router_bytes), (CODEC_FILE, codec_bytes)):
        if data is not None:
            written.append(name)
            atomic_write_bytes(set_file(out, name), data)

    for i in tqdm(range(len(src)), desc="transcode", unit="shard", dynamic_ncols=True):
        sh = src.shard(i)
        info = sh.info
        specs = shard_specs(info.tokens, info.sequences, **dims)
        written.append(info.file)
        w = ShardWriter(set_file(out, info.file), specs, {**sh.metadata, "format_version": str(new.format_version)})
        try:
            for name in specs:
                if name not in ("hidden", "hidden_scale"):
                    w.write(name, sh.numpy(name))
            for j in range(len(m.hidden_layers)):
                h = source_rows(sh, j)
                if fmt.lossless:
                    w.write("hidden", h.to(getattr(torch, hidden_dtype)), (j,))
                else:
                    payload, scale = fmt.encode(h, codec, j)
                    w.write("hidden", payload, (j,))
                    w.write("hidden_scale", scale, (j,))
            nbytes, digest = w.commit()
        except BaseException:
            w.abort()
            raise
        new.shards.append(ShardInfo(file=info.file, sequences=info.sequences, tokens=info.tokens, bytes=nbytes,
                                    sha256=digest))
        new.complete = m.complete and len(new.shards) == len(src)
        write_manifest(out, new)
    total = sum(s.bytes for s in new.shards)
    before = sum(s.bytes for s in m.shards)
    return (f"wrote {len(new.shards)} shards to {{out}}: {total / 2**20:.1f} MiB ({before / max(total, 1):.2f}x "
            f"smaller than the source's {before / 2**20:.1f} MiB), hidden states in {fmt.name}"
            f"{f' ({hidden_dtype})' if fmt.lossless else ''}")


if __name__ == "__main__":
    with one_line_errors("transcode_traces"):
        main()
