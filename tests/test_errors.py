"""Bad input gives one clear line and a non-zero exit, never a traceback, and no finished-looking file."""
import pickle
import shutil
import threading

import pytest
import torch

from common.errors import UserError
from tests.conftest import run_script


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert ": error: " in last, proc.stderr
    for f in fragments:
        assert f in last, last


def test_quantization_needs_cuda(tiny_model, tmp_path):
    proc = run_script("collect_traces", "--model", tiny_model, "--quantization", "4bit", "--device", "cpu", "--target_traces", "6",
                      "--output", tmp_path / "q", check=False)
    assert_one_line_error(proc, "needs a CUDA GPU")
    assert not (tmp_path / "q" / "manifest.json").exists()


def test_unknown_dataset(tiny_model, tmp_path):
    proc = run_script("collect_traces", "--model", tiny_model, "--datasets", "imbd", "--output", tmp_path / "d",
                      check=False)
    assert_one_line_error(proc, "unknown dataset 'imbd'")


@pytest.mark.parametrize("offline_env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}])
def test_hub_unreachable_fails_fast(tiny_model, tmp_path, offline_env):
    """Both fail at the project's own reachability check (its message names the local alternative), before any
    library's retry loop."""
    proc = run_script("collect_traces", "--model", tiny_model, "--datasets", "imdb", "--output", tmp_path / "h",
                      check=False, env=offline_env)
    assert_one_line_error(proc, "Hugging Face hub", "--datasets bundled")
    proc = run_script("collect_traces", "--model", "Qwen/Qwen1.5-MoE-A2.7B", "--output", tmp_path / "h2",
                      check=False, env=offline_env)
    assert_one_line_error(proc, "Hugging Face hub")


def test_existing_output_is_not_overwritten(tiny_traces, tiny_model):
    before = (tiny_traces / "manifest.json").read_bytes()
    proc = run_script("collect_traces", "--model", tiny_model, "--output", tiny_traces, "--target_traces", "6",
                      check=False)
    assert_one_line_error(proc, "--overwrite")
    assert (tiny_traces / "manifest.json").read_bytes() == before


def test_missing_traces(tmp_path):
    proc = run_script("train_simple_predictor", "--traces", tmp_path / "nope", "--output", tmp_path / "o", check=False)
    assert_one_line_error(proc, f"no such trace directory (collect one: python scripts/collect_traces.py --output "
                                f"{tmp_path / 'nope'})")
    assert not (tmp_path / "o" / "best_checkpoint.pth").exists()


def test_paths_of_the_wrong_kind_say_so(tiny_traces, tmp_path):
    """A file where a trace directory, a model directory or a checkpoint is expected is named for what it is,
    not reported missing."""
    from collection.model import resolve_model_path
    from models.checkpoint import load_checkpoint

    note = tmp_path / "README.md"
    note.write_text("a file\n")
    proc = run_script("train_simple_predictor", "--traces", note, "--output", tmp_path / "o", check=False)
    assert_one_line_error(proc, f"{note}: a file, not a trace directory")
    with pytest.raises(UserError, match="a file, not a model directory"):
        resolve_model_path(str(note))
    with pytest.raises(UserError, match="a directory, not a checkpoint file"):
        load_checkpoint(tmp_path, "cpu")


def test_corrupt_shard_names_the_file(tiny_traces, tmp_path):
    bad = tmp_path / "t"
    shutil.copytree(tiny_traces, bad)
    shard = bad / "shard_00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    shard.write_bytes(bytes(raw))
    proc = run_script("validate_coverage_analysis", "--traces", bad, "--model-type", "popularity",
                      "--output-dir", tmp_path / "v", check=False)
    assert_one_line_error(proc, "shard_00001.safetensors", "checksum")
    assert not (tmp_path / "v" / "coverage_metrics.json").exists()


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("kind", ["missing", "garbage", "pickle", "foreign", "mismatch"])
def test_bad_checkpoints(tmp_path, kind):
    path = tmp_path / "c.pth"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"format": "expert-predictor/1", "x": Exploit()}, f)
    elif kind == "foreign":
        torch.save({"state_dict": {}}, path)
    elif kind == "mismatch":
        torch.save({"format": "expert-predictor/1", "config": {"kind": "simple", "input_dim": 8, "num_experts": 60,
                    "top_k": 4, "num_layers": 2}, "state_dict": {"w": torch.zeros(2)}}, path)
    proc = run_script("validate_coverage_analysis", "--checkpoint", path, "--model-type", "simple",
                      "--output-dir", tmp_path / "v", check=False)
    assert_one_line_error(proc, "--checkpoint")
    assert "pwned" not in proc.stdout
    assert "weights_only" not in proc.stderr  # torch's advice to load it unsafely is never passed on


def test_collection_refuses_when_the_disk_cannot_hold_it(tiny_model, tmp_path, monkeypatch):
    from collections import namedtuple

    from collection.traces import output
    from common.errors import UserError
    from scripts import collect_traces

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match=r"needs \d+\.\d [KM]iB but only 1000 B are free"):  # real sizes, not "0.0 GiB"
        collect_traces.main(["--model", str(tiny_model), "--target_traces", "6", "--output", str(tmp_path / "full")])
    assert not (tmp_path / "full").exists()  # checked before anything is written, the manifest included


def test_hub_check_does_not_wait_for_a_hanging_dns_lookup(monkeypatch):
    """Where DNS is blocked, getaddrinfo can hang far past any socket timeout; the check must not."""
    import socket

    from collection import sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    release, finished = threading.Event(), []

    def hanging_lookup(*args, **kwargs):
        release.wait(60)
        finished.append(1)
        raise socket.gaierror("blocked")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    reason = sources.hub_unreachable_reason(timeout=0.5)
    assert "cannot resolve" in reason and not finished  # answered while the lookup still hangs
    release.set()


def test_comma_lists_of_choices_name_the_first_unknown_item():
    from common.errors import UserError, choices_list

    assert choices_list("kinds", "simple,,anchored", ["simple", "anchored"]) == ["simple", "anchored"]
    with pytest.raises(UserError, match=r"^--kinds: unknown 'nope' \(choose from simple, anchored\)$"):
        choices_list("kinds", "simple,nope,bad", ["simple", "anchored"])
    proc = run_script("compare_predictors", "--predictors", "simple,nope", check=False)
    assert proc.returncode == 2 and "--predictors: unknown 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_numbers_bounds_read_as_a_person_writes_them():
    """--cache-gib's bound read "(0, 1.04858e+06]"."""
    from common.errors import number_flag

    with pytest.raises(UserError, match=r"--cache-gib 2000000.0: must be a number in \(0, 1,048,576\]$"):
        number_flag("cache-gib", 2e6, 0, 1 << 20, above_low=True)
    with pytest.raises(UserError, match=r"--x 1.0: must be a number in \[0, 0.5\]$"):
        number_flag("x", 1.0, 0, 0.5)


def test_a_report_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """A --json under /proc passed the pre-flight (permissions allow it) and ended the run with a traceback."""
    import errno
    import os

    import common.atomic as atomic

    real = os.open

    def read_only(p, *a, **k):
        if str(p).endswith(".partial"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))
        return real(p, *a, **k)

    monkeypatch.setattr(atomic.os, "open", read_only)
    target = tmp_path / "report.json"
    with pytest.raises(UserError, match=r"report.json: cannot write it \(read-only file system; nothing partial"):
        atomic.atomic_write_json(target, {"a": 1})
    assert list(tmp_path.iterdir()) == []
