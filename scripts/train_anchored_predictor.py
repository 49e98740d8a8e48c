r"""Train the router-anchored expert predictor: predict layer l+d's MoE input, score it with layer l+d's router.

The predictor starts as router reuse (at d = 0 it is the router itself: recall 1.0 before any step) and
learns a correction delta(features) to h_l, plus a residual logit head, from causal features: this
token's earlier MoE inputs and routing, the previous tokens' state at the target layer, its token id.
Its defaults are the best recipe of docs/RESULTS.md ("What mattered"); every idea has a flag to switch it.

The recipe of docs/RESULTS.md (GPU; one lookahead; tools/sweep_predictors.py runs them all):
    python scripts/train_anchored_predictor.py --lookahead 1 --lr 2e-3 --epochs 20 --hidden-dim 512 \
        --batch-rows 32768 --output models/anchored_checkpoints/d1 --overwrite
Seconds on a CPU (traces from the collect script's quick command):
    python scripts/train_anchored_predictor.py --traces routing_data/traces/quick --epochs 1 --hidden-dim 64 \
        --output models/anchored_checkpoints/quick --overwrite
"""
from __future__ import annotations

import argparse

from common.errors import one_line_errors
from training.trainer import add_training_args, run_training
from validation.coverage.evaluate import epoch_validation, router_reuse_recall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, kind="anchored", shards_per_group=4, batch_size=8, lr=2e-3, epochs=20, lookahead=1,
                      output="models/anchored_checkpoints")
    run_training(p.parse_args(argv), validate=epoch_validation, reference=router_reuse_recall)


if __name__ == "__main__":
    with one_line_errors("train_anchored_predictor"):
        main()
