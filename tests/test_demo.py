"""`make demo` ends with a controls line, a predictor line and the simulated prefetch lines, and fails when a control
is off; `make test` keeps pytest's "N passed" line.

    pytest -q tests/test_demo.py
"""
import json
import re

import tomllib

from tests.conftest import REPO
from tools import demo_summary


def metrics(model_type: str, recall: float, *, K: int = 4, E: int = 60, lookahead: int = 0, tokens: int = 30_720):
    return {"model_type": model_type, "top_k": K, "num_experts": E, "lookahead": lookahead, "split": "test",
            "sequences": 60, "tokens": tokens, f"recall@{K}": recall}


def sim_row(policy: str, cache: int, hit_rate: float, speedup: float) -> dict:
    return {"policy": policy, "label": policy, "cache_experts": cache, "hit_rate": hit_rate,
            "speedup_vs_on_demand": speedup, "tokens_per_s": 70.0 * speedup}


# what simulate_prefetch.py writes (the fields the summary reads), for two cache sizes
SIMULATION = {"tokens": 3840, "num_experts": 60, "top_k": 4, "lookahead": 1, "fetch_budget": 4,
              "model_config": "qwen1.5-moe-a2.7b", "expert_format": "fp16",
              "cost_model": {"link_bytes_per_s": 55e9},
              "rows": [sim_row("on-demand", 8, 0.1487, 1.0), sim_row("prefetch:router-reuse", 8, 0.6326, 1.1365),
                       sim_row("prefetch:runs/demo/layer-aware-d1/best_checkpoint.pth", 8, 0.6614, 1.1547),
                       sim_row("on-demand", 30, 0.5295, 1.0), sim_row("prefetch:router-reuse", 30, 0.7924, 1.0863),
                       sim_row("prefetch:runs/demo/layer-aware-d1/best_checkpoint.pth", 30, 0.8121, 1.0749)]}


def write_demo(tmp_path, router=1.0, random=0.0666, pred=0.708, reuse=0.674, K=4, E=60):
    rows = 26_880
    files = {"router-d0": metrics("router", router, K=K, E=E),
             "random-d0": metrics("random", random, K=K, E=E),
             "router-reuse-d1": metrics("router-reuse", reuse, K=K, E=E, lookahead=1, tokens=rows),
             "layer-aware-d1": metrics("layer-aware", pred, K=K, E=E, lookahead=1, tokens=rows),
             "previous-token-d0": metrics("previous-token", 0.0810, K=K, E=E)}
    for folder, res in files.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "coverage_metrics.json").write_text(json.dumps(res))
    (tmp_path / "prefetch-d1").mkdir()
    (tmp_path / "prefetch-d1" / "prefetch.json").write_text(json.dumps({**SIMULATION, "top_k": K, "num_experts": E}))
    return tmp_path


def summary(tmp_path, capsys) -> tuple[int, list[str]]:
    """(exit code, [controls line, predictor line, the prefetch lines])"""
    try:
        demo_summary.main([str(tmp_path)])
        code = 0
    except SystemExit as e:
        code = e.code
    lines = capsys.readouterr().out.strip().splitlines()
    return code, lines[next(i for i, l in enumerate(lines) if l.startswith("controls:")):]


def test_good_demo_ends_with_the_two_lines(tmp_path, capsys):
    code, lines = summary(write_demo(tmp_path), capsys)
    assert code == 0
    assert lines[0] == "controls: router recall@4 1.000 (expect 1.0), random 0.067 (expect 0.067 +- 0.003) OK"
    assert lines[1].startswith("predictor: layer-aware at lookahead 1") and "test split" in lines[1]
    assert "recall@4 0.708; beats router reuse 0.674 by +0.034" in lines[1]


def test_the_demo_ends_with_one_simulated_line_per_cache_size_and_the_traces_locality(tmp_path, capsys):
    code, lines = summary(write_demo(tmp_path), capsys)
    assert code == 0 and len(lines) == 2 + 1 + 2
    head, c8, c30 = lines[2:]
    assert head.startswith("simulated prefetch (a cost model, not a measurement): the test split's 3,840 tokens")
    assert "qwen1.5-moe-a2.7b fp16 experts over a 55 GB/s link, layer l+1's top-4" in head
    assert "locality (previous-token recall@4) is 0.081, against 0.35-0.43 for real Qwen MoEs" in head
    assert c8 == ("simulated, C = 8 of 60 experts cached per layer: prefetch with layer-aware d=1 1.15x the tokens/s "
                  "of on-demand LRU, with router reuse 1.14x (hit rate 0.66 / 0.63 / LRU 0.15)")
    assert c30 == ("simulated, C = 30 of 60 experts cached per layer: prefetch with layer-aware d=1 1.07x the "
                   "tokens/s of on-demand LRU, with router reuse 1.09x (hit rate 0.81 / 0.79 / LRU 0.53)")


def test_a_simulation_without_the_predictor_is_one_line(tmp_path):
    from tests.conftest import run_script

    write_demo(tmp_path)
    sim = {**SIMULATION, "rows": [r for r in SIMULATION["rows"] if r["policy"] != "prefetch:router-reuse"]}
    (tmp_path / "prefetch-d1" / "prefetch.json").write_text(json.dumps(sim))
    proc = run_script("demo_summary", tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr == ("demo_summary: error: the simulator's rows at C = 8 lack "
                                                    "on-demand, prefetch:router-reuse or the predictor\n")


def test_the_router_control_must_be_exact(tmp_path, capsys):
    # 0.993: a bf16 set's reading before ties were broken as the model broke them
    code, lines = summary(write_demo(tmp_path, router=0.993), capsys)
    assert code == 1 and lines[0].endswith("FAILED")


def test_random_must_sit_at_chance(tmp_path, capsys):
    # 5 standard errors over 30,720 rows: 5 x sqrt(1/15 x 14/15 x 56/59 / 4 / 30720) = 5 x 0.000693 = 0.0035
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir(), outside.mkdir()
    assert summary(write_demo(inside, random=0.0700), capsys)[0] == 0
    code, lines = summary(write_demo(outside, random=0.0710), capsys)
    assert code == 1 and "FAILED" in lines[0]


def test_k_and_e_come_from_the_json(tmp_path, capsys):
    code, lines = summary(write_demo(tmp_path, random=0.25, K=2, E=8), capsys)
    assert code == 0 and lines[0].startswith("controls: router recall@2 1.000") and "expect 0.250" in lines[0]
    assert "recall@2" in lines[1] and "recall@4" not in "\n".join(lines) and "recall@2) is 0.081" in lines[2]


def test_a_predictor_below_router_reuse_is_said_so(tmp_path, capsys):
    code, lines = summary(write_demo(tmp_path, pred=0.60), capsys)
    assert code == 0 and "does NOT beat router reuse 0.674" in lines[1]


def test_makefile_demo_ends_with_the_summary_and_test_keeps_the_passed_line():
    make = (REPO / "Makefile").read_text()
    demo = make.split("\ndemo: setup\n")[1].split("\n\n")[0]
    assert demo.strip().splitlines()[-1].strip() == "$(BIN)/python tools/demo_summary.py $(DEMO)"
    # pytest prints its "N passed" line at -q and drops it at -qq: -q may be given once, in one place
    addopts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    test_line = next(l for l in make.splitlines() if "pytest" in l and not l.startswith("#"))
    quiet = len(re.findall(r"(?<!\S)-q+\b", addopts + " " + test_line)) + addopts.count("-qq") + test_line.count("-qq")
    assert quiet <= 1, (addopts, test_line)


def test_missing_metrics_is_one_line(tmp_path):
    from tests.conftest import run_script

    proc = run_script("demo_summary", tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("demo_summary: error:") and "make demo" in proc.stderr
