r"""Bring a retrained model back from a GPU machine: choose the variant, cut it into pieces, put it together here.

    choose  the first of several trained variants, in the order given, whose training_report.json meets the
            target (its "verdict", tools/train_proxy_moe.py); if none does, the one that misses the fewest of
            the three checks (the earlier on a tie), and exit status 3. Prints the chosen folder.
    pack    a model folder as one tar cut into pieces of at most --piece-mib MiB, plus a manifest giving every
            file's and every piece's size and SHA-256 (the transfer back from the GPU machine takes a few
            files of bounded size; model.safetensors alone is 24 MB)
    unpack  the pieces back into a model folder, each piece and file checked against the manifest, so the
            folder is byte for byte what training wrote (one model.safetensors, the shipped layout)

On the GPU machine (tools/gpu/retrain_default.sh runs these):
    python tools/retrain_bundle.py choose /tmp/retrain-work/a /tmp/retrain-work/b
    python tools/retrain_bundle.py pack /tmp/retrain-work/a OUTDIR
Here, once OUTDIR has come back:
    python tools/retrain_bundle.py unpack OUTDIR models/embedded/qwen2moe-mini --overwrite
Seconds on a CPU (any folder of files round-trips):
    python tools/retrain_bundle.py pack models/embedded/qwen2moe-mini /tmp/pieces --piece-mib 8
    python tools/retrain_bundle.py unpack /tmp/pieces /tmp/copy --overwrite
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes, atomic_write_json, staged_folder
from common.errors import UserError, one_line_errors

REPORT = "training_report.json"  # tools/train_proxy_moe.py's report, beside the model
MANIFEST = "model.manifest.json"
PIECE_PREFIX = "model.tar."
MAX_MANIFEST_BYTES = 1 << 20
MAX_MODEL_BYTES = 4 << 30  # far above a small model; a manifest claiming more is refused before reading
MISSED_TARGET = 3          # exit status of `choose` when no variant meets the target


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="retrain_bundle", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("choose", help="the first variant folder (in the order given) whose report meets the target")
    c.add_argument("variants", nargs="+", help="model folders, most preferred first")
    k = sub.add_parser("pack", help="a model folder as tar pieces and a manifest")
    k.add_argument("model", help="model folder (regular files only)")
    k.add_argument("outdir", help="folder to write the pieces and the manifest into (created)")
    k.add_argument("--piece-mib", type=float, default=15.0, help="largest piece, MiB (15)")
    u = sub.add_parser("unpack", help="pieces and manifest back into a model folder")
    u.add_argument("pieces", help="folder holding the manifest and the pieces")
    u.add_argument("dest", help="model folder to create")
    u.add_argument("--overwrite", action="store_true", help="replace dest if it is a model folder (has config.json)")
    return p.parse_args(argv)


# --- choose

def read_verdict(variant: Path) -> dict[str, Any] | None:
    """The report's verdict, or None when the variant left no report (it failed or was stopped)."""
    path = variant / REPORT
    if not path.is_file() or path.stat().st_size > 64 << 20:
        return None
    return json.loads(path.read_text()).get("verdict")


def choose(variants: list[Path]) -> tuple[int, bool]:
    """(index of the chosen variant, whether it meets the target): the first that meets it; else the one that
    misses the fewest checks, the earlier on a tie."""
    missed = []
    for i, v in enumerate(variants):
        verdict = read_verdict(v)
        if verdict is None:
            continue
        if verdict["meets_target"]:
            return i, True
        missed.append((sum(not verdict[c] for c in ("recall", "no_dead_expert", "perplexity")), i))
    if not missed:
        raise UserError(f"no variant left a {REPORT} ({', '.join(map(str, variants))})")
    return min(missed)[1], False


# --- pack

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_files(model: Path) -> list[Path]:
    if not (model / "config.json").is_file():
        raise UserError(f"{model}: not a model folder (no config.json)")
    files = sorted(model.iterdir())
    odd = [f.name for f in files if not f.is_file() or f.is_symlink()]
    if odd:
        raise UserError(f"{model}: holds {', '.join(odd)}, not a regular file; a model folder holds files only")
    return files


def pack(model: Path, outdir: Path, piece_bytes: int) -> dict[str, Any]:
    """Write outdir/model.tar.000, .001, ... (each at most piece_bytes) and outdir/model.manifest.json."""
    files = model_files(model)
    buf = io.BytesIO()
    entries = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            data = f.read_bytes()
            info = tarfile.TarInfo(f.name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # the same bytes whenever the files are the same
            tar.addfile(info, io.BytesIO(data))
            entries.append({"name": f.name, "bytes": len(data), "sha256": sha256(data)})
    blob = buf.getvalue()
    outdir.mkdir(parents=True, exist_ok=True)
    pieces = []
    for n, start in enumerate(range(0, len(blob), piece_bytes)):
        name = f"{PIECE_PREFIX}{n:03d}"
        atomic_write_bytes(outdir / name, blob[start:start + piece_bytes])
        pieces.append({"name": name, "bytes": len(blob[start:start + piece_bytes]),
                       "sha256": sha256(blob[start:start + piece_bytes])})
    manifest = {"format": 1, "model": str(model), "files": entries, "pieces": pieces,
                "unpack": f"python tools/retrain_bundle.py unpack {outdir} DEST"}
    atomic_write_json(outdir / MANIFEST, manifest)
    return manifest


# --- unpack

def read_manifest(pieces: Path) -> dict[str, Any]:
    path = pieces / MANIFEST
    if not path.is_file():
        raise UserError(f"{pieces}: no {MANIFEST} (was it written by `retrain_bundle.py pack`?)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UserError(f"{path}: {path.stat().st_size:,} bytes, not a manifest")
    try:
        raw = json.loads(path.read_text())
        manifest = {key: [{"name": str(e["name"]), "bytes": int(e["bytes"]), "sha256": str(e["sha256"])}
                          for e in raw[key]] for key in ("files", "pieces")}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a manifest of pieces ({e.__class__.__name__}: {e})") from None
    names = [e["name"] for e in manifest["files"]] + [p["name"] for p in manifest["pieces"]]
    bad = [n for n in names if "/" in n or "\\" in n or n in ("", ".", "..")]
    bad += [p["name"] for p in manifest["pieces"] if not p["name"].startswith(PIECE_PREFIX)]
    if bad:
        raise UserError(f"{path}: names a file outside its folder ({bad[0]!r})")
    if sum(p["bytes"] for p in manifest["pieces"]) > MAX_MODEL_BYTES:
        raise UserError(f"{path}: claims more than {MAX_MODEL_BYTES >> 30} GiB of pieces")
    return manifest


def joined_pieces(pieces: Path, manifest: dict[str, Any]) -> bytes:
    """The tar, every piece's size checked before it is read and its SHA-256 after."""
    parts = []
    for p in manifest["pieces"]:
        path = pieces / p["name"]
        if not path.is_file():
            raise UserError(f"{path}: missing (the manifest lists {len(manifest['pieces'])} pieces)")
        if path.stat().st_size != p["bytes"]:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes, the manifest says {p['bytes']:,} (cut short?)")
        data = path.read_bytes()
        if sha256(data) != p["sha256"]:
            raise UserError(f"{path}: SHA-256 differs from the manifest's (corrupted in transfer?)")
        parts.append(data)
    return b"".join(parts)


def model_from_tar(blob: bytes, manifest: dict[str, Any]) -> dict[str, bytes]:
    """name -> bytes of every file the manifest lists, each the tar's only member of that name, a regular file,
    of the listed size and SHA-256; anything else in the tar is refused."""
    expected = {e["name"]: (e["bytes"], e["sha256"]) for e in manifest["files"]}
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        for member in tar:
            if member.name not in expected or member.name in out or not member.isreg():
                raise UserError(f"pieces: the tar holds {member.name!r}, which the manifest does not list as a file")
            if member.size != expected[member.name][0]:
                raise UserError(f"pieces: {member.name} is {member.size:,} bytes, the manifest says "
                                f"{expected[member.name][0]:,}")
            data = tar.extractfile(member).read()
            if sha256(data) != expected[member.name][1]:
                raise UserError(f"pieces: {member.name}'s SHA-256 differs from the manifest's")
            out[member.name] = data
    missing = sorted(set(expected) - set(out))
    if missing:
        raise UserError(f"pieces: the tar lacks {', '.join(missing)}")
    return out


def unpack(pieces: Path, dest: Path, overwrite: bool) -> list[str]:
    """Write the model folder dest from the pieces; the old dest (a model folder) is replaced only when complete."""
    if dest.exists() and not overwrite:
        raise UserError(f"{dest} exists; --overwrite replaces it")
    if dest.exists() and not (dest / "config.json").is_file():
        raise UserError(f"{dest}: not a model folder (no config.json); refusing to replace it")
    manifest = read_manifest(pieces)
    files = model_from_tar(joined_pieces(pieces, manifest), manifest)
    with staged_folder(dest) as tmp:  # the old folder stays until the new one is complete
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
    return sorted(files)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "choose":
        variants = [Path(v) for v in args.variants]
        i, meets = choose(variants)
        for v in variants:
            verdict = read_verdict(v)
            print(f"{v}: {verdict['line'] if verdict else 'no report'}", file=sys.stderr)
        print(f"chose {variants[i]} ({'meets the target' if meets else 'NO variant meets the target; closest'})",
              file=sys.stderr)
        print(variants[i])
        if not meets:
            sys.exit(MISSED_TARGET)
    elif args.command == "pack":
        if not 0 < args.piece_mib <= 1024:
            raise UserError(f"--piece-mib {args.piece_mib}: within (0, 1024]")
        m = pack(Path(args.model), Path(args.outdir), int(args.piece_mib * (1 << 20)))
        print(f"packed {len(m['files'])} files of {args.model} into {len(m['pieces'])} pieces in {args.outdir}")
    else:
        names = unpack(Path(args.pieces), Path(args.dest), args.overwrite)
        print(f"unpacked {', '.join(names)} into {args.dest}")


if __name__ == "__main__":
    with one_line_errors("retrain_bundle"):
        main()
