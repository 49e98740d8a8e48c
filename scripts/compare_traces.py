"""Compare two trace sets of the same plan: ids exact except near ties, weights and hidden states within tolerance.

The check that a collection on several GPUs (--device-map, or torchrun's processes) equals one on one GPU:
same sequences and tokens, the same experts in every (layer, token) row except rows whose choice is a near tie
at bfloat16 precision (counted apart), weights and hidden states within the stated tolerance on the rows not
downstream of a differing choice (collection/compare.py says exactly how). Exit status 0 when within tolerance,
1 when not.

After collecting the same plan twice (docs/BENCHMARKS.md, "Several GPUs"):
    python scripts/compare_traces.py /tmp/w/traces_1gpu /tmp/w/traces_devmap --json results/compare.json
Seconds on a CPU (a set against itself):
    python scripts/compare_traces.py routing_data/traces/quick routing_data/traces/quick
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from collection.compare import Tolerance, compare_trace_sets
from common.atomic import atomic_write_json
from common.errors import number_flag, one_line_errors
from common.paths import check_writable


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", help="trace directory of the reference run (e.g. one GPU)")
    p.add_argument("compared", help="trace directory of the run to check (e.g. --device-map over two GPUs)")
    t = Tolerance()
    p.add_argument("--tie-ulps", type=float, default=t.tie_ulps,
                   help=f"neighbouring selection scores within this many bf16 ulps make a tie ({t.tie_ulps})")
    p.add_argument("--weights-atol", type=float, default=t.weights_atol,
                   help=f"largest |weight difference| allowed on clean rows ({t.weights_atol})")
    p.add_argument("--hidden-rtol", type=float, default=t.hidden_rtol,
                   help=f"largest hidden-state difference allowed, relative to the layer's largest value ({t.hidden_rtol})")
    p.add_argument("--no-verify", action="store_true", help="skip shard checksum verification")
    p.add_argument("--json", default=None, help="write the comparison here")
    args = p.parse_args(argv)
    for name in ("tie_ulps", "weights_atol", "hidden_rtol"):  # NaN would make every row pass or every row fail
        number_flag(name.replace("_", "-"), getattr(args, name), 0, 1e6)
    check_writable("--json", args.json, "file")  # before both sets are read
    res = compare_trace_sets(Path(args.reference), Path(args.compared),
                             Tolerance(args.tie_ulps, args.weights_atol, args.hidden_rtol), verify=not args.no_verify)
    print(f"{res['compared']} vs {res['reference']}: {res['identical_shards']}/{res['shards']} shards byte-identical; "
          f"{res['differing_rows']} of {res['rows']} (layer, token) rows choose other experts, {res['tie_rows']} of them "
          f"near ties (within {args.tie_ulps} bf16 ulps), {res['mismatch_rows']} mismatches; on the "
          f"{res['clean_fraction']:.4%} clean rows: weights max |diff| {res['weights_max_abs_diff']:.3g}, hidden max "
          f"relative diff {res['hidden_max_rel_diff']:.3g}: {'WITHIN' if res['within_tolerance'] else 'OUTSIDE'} tolerance")
    if args.json:
        atomic_write_json(Path(args.json), res)
    return 0 if res["within_tolerance"] else 1


if __name__ == "__main__":
    with one_line_errors("compare_traces"):
        sys.exit(main())
