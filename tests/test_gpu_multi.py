"""Several GPUs (skipped without 2 CUDA GPUs): a model spread over two GPUs by a device map, torchrun's data-parallel
collection and DDP training each give what one GPU gives.

    pytest -q -m gpu tests/test_gpu_multi.py      # on a machine with >= 2 GPUs
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from collection.compare import compare_trace_sets
from tests.conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

# never NVLink multicast (NVLS): the H100/H200 machines the tests run on keep it off
ENV = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "CUDA_VISIBLE_DEVICES": "0,1"}
PLAN = ["--datasets", "bundled", "--target_traces", "96", "--shard_size", "24", "--batch_size", "8", "--max_length", "64",
        "--dtype", "bfloat16"]


def collect(model, out, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    script = str(REPO / "scripts" / "collect_traces.py")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    proc = subprocess.run([*launcher, script, "--model", str(model), *PLAN, "--output", str(out), *extra], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def one_gpu(embedded_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_gpu") / "traces"
    collect(embedded_model, out, "--gpu", "0")
    return out


def agree(reference, other) -> dict:
    res = compare_trace_sets(reference, other)
    print(json.dumps({k: v for k, v in res.items() if k != "tolerance"}))
    assert res["sequences"] == 96 and res["mismatch_rows"] == 0, res  # ids equal except bf16 near ties
    assert res["within_tolerance"], res
    return res


def test_explicit_device_map_over_two_gpus_equals_one_gpu(embedded_model, one_gpu, tmp_path):
    """The embedded model (8 MoE layers) split by hand: embeddings and layers 0-3 on GPU 0, the rest on GPU 1.
    Capture reads layers 0-3 from GPU 0 and 4-7 from GPU 1 (two copy streams, two events per batch)."""
    device_map = {"model.embed_tokens": 0, **{f"model.layers.{i}": 0 if i < 4 else 1 for i in range(8)},
                  "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    proc = collect(embedded_model, tmp_path / "mapped", "--device-map", json.dumps(device_map))
    assert "cuda:0: MoE layers 0-3" in proc.stdout and "cuda:1: MoE layers 4-7" in proc.stdout
    agree(one_gpu, tmp_path / "mapped")


def test_balanced_device_map_under_a_memory_cap_spreads_and_equals_one_gpu(embedded_model, one_gpu, tmp_path):
    """--device-map balanced with a per-GPU cap below the model's size: accelerate must use both GPUs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(embedded_model), dtype=torch.bfloat16)
    bf16_bytes = sum(p.numel() * 2 for p in model.parameters())
    proc = collect(embedded_model, tmp_path / "balanced", "--device-map", "balanced",
                   "--max-memory", str(int(0.7 * bf16_bytes)))
    assert "cuda:0: MoE layers" in proc.stdout and "cuda:1: MoE layers" in proc.stdout
    agree(one_gpu, tmp_path / "balanced")


def test_two_processes_on_two_gpus_equal_one_gpu(embedded_model, one_gpu, tmp_path):
    collect(embedded_model, tmp_path / "dp", processes=2)
    res = agree(one_gpu, tmp_path / "dp")
    print(f"byte-identical shards: {res['identical_shards']} of {res['shards']}")


def test_ddp_training_on_two_gpus_writes_one_checkpoint_set(one_gpu, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "scripts" / "train_simple_predictor.py"), "--traces", str(one_gpu), "--epochs", "2",
                           "--lr", "1e-3", "--output", str(out)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "DDP, NCCL" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "best_checkpoint.json", "best_checkpoint.pth", "latest_checkpoint.json", "latest_checkpoint.pth", "results.json"]
    assert json.loads((out / "results.json").read_text())["processes"] == 2
