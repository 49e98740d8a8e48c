r"""Train the hybrid expert predictor: hidden state plus the routing already observed, causal.

The seed's command (its hyperparameters are the defaults):
    python scripts/train_hybrid_predictor.py --shards-per-group 2 --batch-size 12 --lr 3e-5 --epochs 30
Seconds on a CPU, on the collect script's quick traces, with `make demo`'s recipe (validation recall@4 about 0.60;
the seed's lr 3e-5 stays near random, 0.09 against 0.067, in 2 epochs). 120 texts are too few to beat router reuse
(0.63 there), and the trainer says so:
    python scripts/train_hybrid_predictor.py --traces routing_data/traces/quick --epochs 2 --lr 3e-3 --dropout 0 \
        --batch-rows 2048 --output models/hybrid_checkpoints/quick --overwrite

Unlike the original hybrid (a temporal head that saw the tokens it predicted), this one sees only
what exists when layer l runs: h_l, this token's experts at layer l (l-1 when --lookahead 0) and
the previous token's experts at the target layer. It predicts layer l+d, d = --lookahead (default 1).

--routing-only keeps the history part alone and reads no hidden state: this token's experts at its last
--own-layers finished layers and the previous --window tokens' experts at the target layer (1 and 1 unless
given). Routing is then all it needs, so a set of imported routing (scripts/import_routing.py, which holds no
hidden states) trains it, and the checkpoint says so to every reader:
    python scripts/train_hybrid_predictor.py --traces routing_data/traces/qwen3-vllm --routing-only --lr 3e-3 \
        --epochs 5 --output models/hybrid_checkpoints/qwen3-vllm
"""
from __future__ import annotations

import argparse

from common.errors import one_line_errors
from training.trainer import add_training_args, run_training
from validation.coverage.evaluate import epoch_validation, router_reuse_recall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(p, kind="hybrid", shards_per_group=2, batch_size=12, lr=3e-5, epochs=30, lookahead=1,
                      output="models/hybrid_checkpoints")
    run_training(p.parse_args(argv), validate=epoch_validation, reference=router_reuse_recall)


if __name__ == "__main__":
    with one_line_errors("train_hybrid_predictor"):
        main()
