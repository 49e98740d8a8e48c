r"""Write a random-weight MoE checkpoint of any supported family's config to a directory, with a tokenizer.

Real weights cannot be downloaded here; a model's exact architecture can be built with random weights
and driven through exactly the user's code path (from_pretrained, 4-bit, ...). Presets
(models/moe_configs.py): full size qwen1.5-moe-a2.7b, qwen3-30b-a3b, mixtral-8x7b, olmoe-1b-7b,
deepseek-v2-lite (public config.json field for field), and tiny-<model_type> for every family in
collection/families.py (docs/FAMILIES.md).

Full size (14.3B parameters, 28.6 GB in bf16; build on a GPU):
    python tools/make_random_checkpoint.py --preset qwen1.5-moe-a2.7b --device cuda --output /tmp/qwen15-random
Seconds on a CPU (a test model; any family: --preset tiny-mixtral, tiny-deepseek_v3, ...):
    python tools/make_random_checkpoint.py --preset qwen2moe-tiny --dtype float32 --output /tmp/tiny-moe
Any config:  --config path/to/config.json  and/or  --set num_hidden_layers=4 --set hidden_size=256
(a --config's "model_type" picks the family's config class, as in transformers)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from collection.model import EMBEDDED_MODEL
from collection.sources import CORPUS_DIR
from common.atomic import staged_folder
from common.device import pick_device, pick_dtype
from common.errors import UserError, one_line_errors
from models.moe_configs import PRESETS, make_config
from models.tokenizer import train_bpe_tokenizer


def corpus_texts(split: str = "lm_train", limit: int | None = None) -> list[str]:
    """Texts of the bundled corpus (lm_train: the model's side of the corpus, never traced)."""
    import gzip

    index = CORPUS_DIR / "corpus.json"
    if not index.is_file():
        raise UserError(f"{index} missing: build the corpus with tools/build_corpus.py")
    texts: list[str] = []
    for _, d in sorted(json.loads(index.read_text())["domains"].items()):
        if split in d["splits"]:
            with gzip.open(CORPUS_DIR / d["splits"][split]["file"], "rt", encoding="utf-8") as f:
                texts += [json.loads(line)["text"] for line in f]
    return texts[:limit] if limit else texts


def load_or_train_tokenizer(path: str | None, vocab_size: int):
    from transformers import AutoTokenizer

    for candidate in ([path] if path else [str(EMBEDDED_MODEL)]):
        if Path(candidate, "tokenizer.json").is_file() or Path(candidate, "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(candidate)
    if path:
        raise UserError(f"--tokenizer {path}: no tokenizer files there")
    print(f"training a {vocab_size}-token byte-level BPE on the bundled corpus")
    return train_bpe_tokenizer(corpus_texts(), vocab_size)


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2moe-tiny", choices=sorted(PRESETS), help="base config (qwen2moe-tiny)")
    p.add_argument("--config", default=None, help="a config.json whose fields override the preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded model's, "
                   "else a BPE trained on the bundled corpus)")
    p.add_argument("--output", required=True, help="directory to write (save_pretrained layout)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (0)")
    p.add_argument("--dtype", default="bfloat16", help="weights dtype (bfloat16)")
    p.add_argument("--device", default="cpu", help="where to build it (cpu; cuda builds the full model in seconds)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = p.parse_args(argv)

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UserError(f"--output {out} exists; --overwrite replaces it")
    overrides = {}
    if args.config:
        try:
            overrides.update(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--config {args.config}: {e}") from None
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: use KEY=VALUE")
        overrides[key] = parse_value(value)
    try:
        config = make_config(args.preset, **overrides)
    except (TypeError, ValueError) as e:
        raise UserError(f"config: {e}") from None
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    tokenizer = load_or_train_tokenizer(args.tokenizer, min(config.vocab_size, 8192))
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens, more than the config's vocab_size {config.vocab_size}")

    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {type(model).__name__}: {n:,} parameters in {dtype} on {device} in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    with staged_folder(out) as tmp:  # the old folder stays until the new one is complete
        model.save_pretrained(tmp, max_shard_size="4GB")
        tokenizer.save_pretrained(tmp)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"saved to {out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    with one_line_errors("make_random_checkpoint"):
        main()
