"""Rewrite a trace set's hidden states in another format (e.g. a lossless set into a compact one).

Every shard is read, its hidden states are re-encoded by collection/hidden_format.py (the same code that
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
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from collection.device import pick_device
from collection.errors import UserError, one_line_errors
from collection.format import (COMPACT_FORMAT_VERSION, FORMAT_VERSION, MANIFEST, ROUTER_WEIGHTS, Manifest, ShardInfo,
                               ShardWriter, TraceSet, bytes_per_token, manifest_dims, save_codec, shard_specs,
                               write_manifest)
from collection.hidden_format import FORMATS, LOSSLESS, fit_codec
from scripts.collect_traces import FIT_TOKENS


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
    src = TraceSet(Path(args.traces), verify=not args.no_verify)
    out = Path(args.output)
    if out.resolve() == src.dir.resolve():
        raise UserError("--output must differ from --traces")
    if (out / MANIFEST).exists() and not args.overwrite:
        raise UserError(f"--output {out} already holds traces; --overwrite replaces them")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise UserError(f"--output {out} exists, is not empty and is not a trace directory; choose another")
    if args.hidden_dtype and args.hidden_format != LOSSLESS:
        raise UserError("--hidden-dtype applies to --hidden-format lossless only (compact formats decode to any dtype)")
    m = src.manifest
    fmt = FORMATS[args.hidden_format]
    if (why := fmt.check(m.hidden_size)):
        raise UserError(f"--hidden-format {fmt.name}: {why}")
    if not m.hidden_layers:
        raise UserError(f"{src.dir} stores no hidden states: nothing to transcode")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    device = pick_device(args.device)
    src_fmt = FORMATS[m.hidden_format]
    src_codec = src.hidden_codec(device)

    def source_rows(sh, j: int, rows: slice = slice(None)) -> torch.Tensor:
        """Stored layer j's hidden rows of shard `sh` on the device, decoded if the source is compact."""
        if src_fmt.lossless:
            return sh.tensor("hidden", (j, rows)).to(device)
        return src_fmt.decode(sh.tensor("hidden", (j, rows)).to(device), sh.tensor("hidden_scale", (j, rows)).to(device),
                              torch.float32, src_codec, j)
    hidden_dtype = args.hidden_dtype or str(m.capture.get("hidden_dtype", "float16"))
    dims = {**manifest_dims(m), "hidden_dtype": hidden_dtype, "hidden_format": fmt.name}
    capture = {**m.capture, "hidden_dtype": hidden_dtype, "hidden_format": fmt.name,
               "bytes_per_token": bytes_per_token(**dims),
               "transcoded_from": {"traces": str(src.dir), "hidden_format": m.hidden_format,
                                   "hidden_dtype": m.capture.get("hidden_dtype")}}
    new = Manifest(model=m.model, routing=m.routing, capture=capture, sources=m.sources, plan=m.plan,
                   format_version=FORMAT_VERSION if fmt.lossless else COMPACT_FORMAT_VERSION)
    if (src.dir / ROUTER_WEIGHTS).is_file():
        shutil.copyfile(src.dir / ROUTER_WEIGHTS, out / ROUTER_WEIGHTS)
    codec = None
    if fmt.fitted:  # fitted as collection fits it: on the first tokens of the first shard
        rows = slice(0, min(FIT_TOKENS, src.shard(0).info.tokens))
        xs = [source_rows(src.shard(0), j, rows).double() for j in range(len(m.hidden_layers))]
        codec = fit_codec(fmt, torch.stack([x.T @ x / x.shape[0] for x in xs]))
        new.capture["hidden_codec"] = save_codec(out, codec, rows.stop)
        codec = codec.to(device)
    write_manifest(out, new)

    for i in tqdm(range(len(src)), desc="transcode", unit="shard", dynamic_ncols=True):
        sh = src.shard(i)
        info = sh.info
        specs = shard_specs(info.tokens, info.sequences, **dims)
        w = ShardWriter(out / info.file, specs, {**sh.metadata, "format_version": str(new.format_version)})
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
    print(f"wrote {len(new.shards)} shards to {out}: {total / 2**20:.1f} MiB ({before / max(total, 1):.2f}x smaller "
          f"than the source's {before / 2**20:.1f} MiB), hidden states in {fmt.name}"
          f"{f' ({hidden_dtype})' if fmt.lossless else ''}")


if __name__ == "__main__":
    with one_line_errors("transcode_traces"):
        main()
