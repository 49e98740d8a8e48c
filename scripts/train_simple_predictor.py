r"""Stage 2: train the seed's simple expert predictor (3-layer LayerNorm MLP, AdamW) on a trace set.

The seed's command (its hyperparameters are the defaults):
    python scripts/train_simple_predictor.py --shards-per-group 4 --batch-size 8 --lr 5e-5 --epochs 20
Seconds on a CPU, on the collect script's quick traces, with `make demo`'s recipe (the seed's lr 5e-5 barely leaves
random in 2 epochs: validation recall@4 0.11, random 0.067):
    python scripts/train_simple_predictor.py --traces routing_data/traces/quick --epochs 2 --lr 3e-3 --dropout 0 \
        --batch-rows 2048 --output models/simple_checkpoints/quick --overwrite

Same-layer prediction (--lookahead 0, the seed's task) is what the seed measured; a prefetcher needs
--lookahead 1 or more (see scripts/compare_predictors.py and docs/RESULTS.md). An eviction policy needs
a lookahead in tokens: which experts layer l uses in the next W tokens (minutes on a CPU):
    python scripts/train_simple_predictor.py --traces runs/demo/traces --model-type layer-aware \
        --lookahead-tokens 16 --epochs 3 --lr 1e-3 --batch-rows 4096 --output runs/evict/la-w16 --overwrite
"""
from __future__ import annotations

import argparse

from common.errors import one_line_errors
from training.trainer import add_training_args, run_training
from validation.coverage.evaluate import epoch_validation, router_reuse_recall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, kind="simple", shards_per_group=4, batch_size=8, lr=5e-5, epochs=20, lookahead=0,
                      output="models/simple_checkpoints")
    run_training(p.parse_args(argv), validate=epoch_validation, reference=router_reuse_recall)


if __name__ == "__main__":
    with one_line_errors("train_simple_predictor"):
        main()
