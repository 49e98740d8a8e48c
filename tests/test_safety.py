"""Trust: no user file lost, one writer at a time, checksummed router weights, and one line for every bad input.

Each reproduction command of the trust defects found on 2026-11-28 (a user file lost, two writers, unverified router
weights, tracebacks) runs here and must end with exit 2, one line on stderr,
and every file that was there before still there, byte for byte.

    pytest -q tests/test_safety.py
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collection.traces.format import ROUTER_WEIGHTS, TraceFormatError, TraceSet
from common.errors import UserError, one_line_errors
from tests.conftest import REPO, run_script
from tests.test_errors import assert_one_line_error

# a seconds-long collection on the tiny model: 2 shards of 6 sequences of at most 32 tokens
SMALL = ["--datasets", "bundled", "--target_traces", "12", "--shard_size", "6", "--batch_size", "4",
         "--max_length", "32", "--device", "cpu", "--dtype", "float32"]
USER_FILES = {"shard_notes.txt": b"my notes\n", "my.partial": b"mine\n", "shard_00042.safetensors": b"not ours\n",
              "notes.partial": b"also mine\n"}


def run_main(capsys, prog: str, main, *argv) -> types.SimpleNamespace:
    """A script's main in this process, wrapped exactly as its `__main__` block wraps it."""
    capsys.readouterr()
    code = 0
    try:
        with one_line_errors(prog):
            main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


def collect(model: Path, out: Path, *extra: str) -> None:
    from scripts.collect_traces import main

    main(["--model", str(model), *SMALL, "--output", str(out), *extra])


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones too) with its SHA-256, every subdirectory, and every symbolic link
    with its target (never followed)."""
    return {str(p.relative_to(directory)): f"link to {os.readlink(p)}" if p.is_symlink() else
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(directory).rglob("*"))}


def plant_user_files(directory: Path) -> None:
    for name, data in USER_FILES.items():
        (directory / name).write_bytes(data)


def assert_user_files(directory: Path) -> None:
    for name, data in USER_FILES.items():
        assert (directory / name).read_bytes() == data, name


@pytest.fixture(scope="module")
def small(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "traces"
    collect(tiny_model, out)
    return out


@pytest.fixture(scope="module")
def small3(tiny_model, tmp_path_factory) -> Path:
    """Another set of the same model with three shards (18 sequences)."""
    out = tmp_path_factory.mktemp("small3") / "traces"
    collect(tiny_model, out, "--target_traces", "18")
    return out


@pytest.fixture
def held(small, tmp_path) -> tuple[Path, dict[str, str]]:
    """A copy of the small set with the user's own files beside it, and its snapshot."""
    d = tmp_path / "held"
    shutil.copytree(small, d)
    plant_user_files(d)
    return d, snapshot(d)


def edit_manifest(directory: Path, **changes) -> None:
    path = directory / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


# ----------------------------------------------------------------------------------------------
# defect 2: data loss on --overwrite and --resume


def test_the_reported_overwrite_command_deletes_nothing(held):
    """cp -r <traces> x; python scripts/collect_traces.py --model Qwen/Qwen1.5-MoE-A2.7B --output x --overwrite"""
    out, before = held
    proc = run_script("collect_traces", "--model", "Qwen/Qwen1.5-MoE-A2.7B", "--output", out, "--overwrite",
                      check=False, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "--model Qwen/Qwen1.5-MoE-A2.7B")
    assert proc.returncode == 2 and snapshot(out) == before


@pytest.mark.parametrize("bad", [
    ["--model", "/no/such/model"],
    ["--datasets", "imbd"],
    ["--datasets", "text:/no/such/file.txt"],
    ["--hidden-layers", "0-99"],                 # known bad only once the model says it has 3 layers
    ["--hidden-layers", "x"],
    ["--seed", "-1"],
    ["--batch_size", "0"],
    ["--target_traces", "3"],                    # fewer than the six bundled domains
])
def test_overwrite_or_resume_with_a_bad_input_deletes_nothing(held, tiny_model, capsys, bad):
    from scripts.collect_traces import main

    out, before = held
    for flag in ("--overwrite", "--resume"):
        proc = run_main(capsys, "collect_traces", main, "--model", tiny_model, *SMALL, *bad, "--output", out, flag)
        assert_one_line_error(proc)
        assert proc.returncode == 2 and snapshot(out) == before


def test_overwrite_replaces_only_the_files_of_the_old_set(small3, small, tiny_model, tmp_path, capsys):
    out = tmp_path / "o"
    shutil.copytree(small3, out)  # the old set has a third shard the new one lacks
    plant_user_files(out)
    collect(tiny_model, out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*USER_FILES, "manifest.json", ROUTER_WEIGHTS, "shard_00000.safetensors", "shard_00001.safetensors"])
    assert_user_files(out)
    new = TraceSet(out)
    assert new.manifest.complete and len(new) == 2 and new.manifest.plan["sequences"] == 12
    assert {k: v for k, v in snapshot(out).items() if k not in USER_FILES} == snapshot(small)


def test_resume_without_a_manifest_removes_only_its_own_partials(tiny_model, small, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    plant_user_files(out)
    (out / "shard_00000.safetensors.partial").write_bytes(b"cut short")  # exactly a name this run writes
    collect(tiny_model, out, "--resume")
    assert not (out / "shard_00000.safetensors.partial").exists()
    assert_user_files(out)
    assert TraceSet(out).manifest.complete


def test_a_users_file_with_a_trace_name_is_never_written_over(tiny_model, tmp_path, capsys):
    from scripts.collect_traces import main

    out = tmp_path / "c"
    out.mkdir()
    (out / "shard_00001.safetensors").write_bytes(b"the user's")
    for flags in ([], ["--overwrite"], ["--resume"]):
        proc = run_main(capsys, "collect_traces", main, "--model", tiny_model, *SMALL, "--output", out, *flags)
        assert_one_line_error(proc, "shard_00001.safetensors", "listed by no manifest")
        assert proc.returncode == 2
    assert sorted(p.name for p in out.iterdir()) == ["shard_00001.safetensors"]


def test_output_that_is_a_file_is_refused(tiny_model, tmp_path, capsys):
    from scripts.collect_traces import main

    f = tmp_path / "file"
    f.write_bytes(b"x")
    proc = run_main(capsys, "collect_traces", main, "--model", tiny_model, *SMALL, "--output", f)
    assert_one_line_error(proc, "is a file")
    assert f.read_bytes() == b"x"


@pytest.mark.parametrize("then", ["--resume", "--overwrite"])
def test_an_overwrite_cut_short_keeps_the_old_set_until_the_next_run_finishes(small3, small, tiny_model, tmp_path,
                                                                               monkeypatch, then):
    out = tmp_path / "o"
    shutil.copytree(small3, out)
    plant_user_files(out)
    before = snapshot(out)
    real = os.pwrite
    calls = [0]

    def pwrite(*a):
        calls[0] += 1
        if calls[0] == 40:  # the second shard of the new set is being written (the first took 29 writes)
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(KeyboardInterrupt):
        collect(tiny_model, out, "--overwrite")
    monkeypatch.setattr(os, "pwrite", real)
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(".incoming")} == before
    assert len(TraceSet(out)) == 3  # the old set is whole and readable while its replacement waits
    assert (out / ".incoming" / "shard_00000.safetensors").is_file()  # the new set's first shard, kept for --resume
    collect(tiny_model, out, then)
    assert {k: v for k, v in snapshot(out).items() if k not in USER_FILES} == snapshot(small)
    assert_user_files(out)


def copy_swap_layout(old: Path, new: Path, out: Path) -> None:
    """`out` holds the old set and the user's files, `out/.incoming` the complete new set: a swap about to start."""
    shutil.copytree(old, out)
    plant_user_files(out)
    shutil.copytree(new, out / ".incoming")


@pytest.mark.parametrize("old_new", ["3to2", "2to3"])
def test_a_swap_cut_short_anywhere_is_finished_by_the_next_run(small, small3, tmp_path, monkeypatch, old_new):
    """Kill the swap before each of its file operations in turn; the repeated swap always ends with the new
    set whole, the old set's extra files gone and the user's files untouched."""
    from collection.traces import output

    old, new = (small3, small) if old_new == "3to2" else (small, small3)
    want = {**snapshot(new), **{name: hashlib.sha256(data).hexdigest() for name, data in USER_FILES.items()}}
    real = {name: getattr(os, name) for name in ("replace", "unlink", "rmdir")}
    total = None
    for cut in range(100):
        out = tmp_path / f"{old_new}-{cut}"
        copy_swap_layout(old, new, out)
        calls = [0]

        def counted(name):
            def op(*a, **k):
                calls[0] += 1
                if calls[0] > cut:
                    raise KeyboardInterrupt  # what a kill looks like to the code after it
                return real[name](*a, **k)
            return op
        for name in real:
            monkeypatch.setattr(os, name, counted(name))
        try:
            output.swap_in(out)
            finished = True
        except KeyboardInterrupt:
            finished = False
        finally:
            for name, fn in real.items():
                monkeypatch.setattr(os, name, fn)
        assert snapshot(out).keys() >= {f"{n}" for n in USER_FILES}
        if not finished:
            state = output.inspect_output(out, resume=True, overwrite=False)
            output.finish_swap_cleanup(state)
            if state.interrupted_swap:
                output.swap_in(out)
        assert snapshot(out) == want, cut
        if finished:
            total = cut
            break
    assert total is not None and total >= 6  # every operation of the swap was interrupted once


def test_resume_finishes_an_interrupted_swap(small, small3, tiny_model, tmp_path, monkeypatch):
    from collection.traces import output

    out = tmp_path / "s"
    copy_swap_layout(small3, small, out)
    real = os.replace
    calls = [0]

    def replace(*a):
        calls[0] += 1
        if calls[0] == 3:  # the old manifest is gone, one new shard moved in
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        output.swap_in(out)
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(TraceFormatError):
        TraceSet(out)  # mid-swap: no manifest, so no half-valid set
    collect(tiny_model, out, "--resume")  # the new set's own flags: it only finishes the swap
    assert {k: v for k, v in snapshot(out).items() if k not in USER_FILES} == snapshot(small)
    assert_user_files(out)


# ----------------------------------------------------------------------------------------------
# defect 3: router weights checksummed and readable by all


def test_router_weights_are_listed_verified_and_world_readable(small, tmp_path, capsys):
    from common.atomic import FILE_MODE
    from scripts.validate_coverage_analysis import main

    m = TraceSet(small).manifest
    rw = small / ROUTER_WEIGHTS
    assert m.router_weights.bytes == rw.stat().st_size
    assert m.router_weights.sha256 == hashlib.sha256(rw.read_bytes()).hexdigest()
    mode = rw.stat().st_mode & 0o777
    assert mode == (small / "shard_00000.safetensors").stat().st_mode & 0o777 == FILE_MODE
    # under the usual umask 022 that is 0644 (safetensors' own writer made it 0600: unreadable to a shared group)
    code = ("import os, sys; from pathlib import Path; from common.atomic import atomic_write_bytes; "
            "p = Path(sys.argv[1]); atomic_write_bytes(p, b'x'); print(oct(p.stat().st_mode & 0o777))")
    proc = subprocess.run(["sh", "-c", f'umask 022 && "{sys.executable}" -c "{code}" "{tmp_path / "m"}"'],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip() == "0o644", proc.stderr

    bad = tmp_path / "bad"
    shutil.copytree(small, bad)
    raw = bytearray((bad / ROUTER_WEIGHTS).read_bytes())
    raw[-3] ^= 0x40  # a weight changes; the size does not
    (bad / ROUTER_WEIGHTS).write_bytes(bytes(raw))
    before = snapshot(bad)
    proc = run_main(capsys, "validate_coverage_analysis", main, "--traces", bad, "--model-type", "router-reuse",
                    "--lookahead", "1", "--output-dir", tmp_path / "v", "--device", "cpu")
    assert_one_line_error(proc, ROUTER_WEIGHTS, "checksum")
    assert proc.returncode == 2 and snapshot(bad) == before and not (tmp_path / "v").exists()


def test_old_sets_without_the_entry_load_with_one_warning(small, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(small, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["router_weights"]
    (old / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    ts = TraceSet(old)
    assert torch.equal(ts.router_weights(), TraceSet(small).router_weights())
    ts.router_weights()
    err = capsys.readouterr().err
    assert err.count("unverified") == 1


# ----------------------------------------------------------------------------------------------
# defect 4: one writer, and readers that refuse an unfinished set


def test_a_second_collector_stops_with_one_line(held, tiny_model):
    out, before = held
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first collector, for as long as this test needs
    try:
        proc = run_script("collect_traces", "--model", tiny_model, *SMALL, "--output", out, "--overwrite",
                          check=False)
    finally:
        os.close(fd)
    assert_one_line_error(proc, f"{out} is being written by another", f"pid {os.getpid()}")
    assert proc.returncode == 2 and snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(n for n in before)  # no lock file left either


def test_the_importer_takes_the_same_lock(held, tmp_path, capsys):
    from scripts.import_specmoe_shards import main

    out, before = held
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "s.pkl").write_bytes(pickle.dumps([1]))
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        proc = run_main(capsys, "import_specmoe_shards", main, "--input", tmp_path / "in", "--output", out,
                        "--num-layers", "3", "--overwrite")
    finally:
        os.close(fd)
    assert_one_line_error(proc, "is being written by another", f"pid {os.getpid()}")
    assert snapshot(out) == before


def test_readers_refuse_an_incomplete_set_unless_allowed(small, tmp_path, capsys):
    from scripts.validate_coverage_analysis import main

    part = tmp_path / "part"
    shutil.copytree(small, part)
    edit_manifest(part, complete=False)
    args = ["--traces", part, "--model-type", "popularity", "--split", "train", "--output-dir", tmp_path / "v",
            "--device", "cpu"]
    proc = run_main(capsys, "validate_coverage_analysis", main, *args)
    assert_one_line_error(proc, "incomplete trace set", "--allow-incomplete")
    assert proc.returncode == 2 and not (tmp_path / "v").exists()
    assert run_main(capsys, "validate_coverage_analysis", main, *args, "--allow-incomplete").returncode == 0
    assert (tmp_path / "v" / "coverage_metrics.json").is_file()


@pytest.mark.parametrize("script", ["train_simple_predictor", "train_hybrid_predictor", "compare_predictors",
                                    "validate_coverage_analysis"])
def test_every_reader_has_allow_incomplete(script, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"scripts.{script}").main(["--help"])
    assert "--allow-incomplete" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# defect 5: one line for everything else


def test_a_full_disk_during_collection_is_one_line_and_leaves_no_partial(tiny_model, tmp_path, monkeypatch, capsys):
    from scripts.collect_traces import main

    real = os.pwrite
    calls = [0]

    def pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] == 12:  # in the middle of the first shard's rows
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "full"
    proc = run_main(capsys, "collect_traces", main, "--model", tiny_model, *SMALL, "--output", out)
    assert_one_line_error(proc, "shard_00000.safetensors", "no space left on device")
    assert proc.returncode == 2 and calls[0] >= 12
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]


def test_a_full_disk_during_training_is_one_line_and_leaves_no_partial(small3, tmp_path, monkeypatch, capsys):
    from scripts.train_simple_predictor import main

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)  # delayed allocation: the disk is found full when the data is flushed
    out = tmp_path / "ck"
    proc = run_main(capsys, "train_simple_predictor", main, "--traces", small3, "--epochs", "1", "--device", "cpu",
                    "--output", out, "--no-verify")
    assert_one_line_error(proc, "latest_checkpoint.pth", "no space left on device")
    assert proc.returncode == 2 and not [p for p in out.rglob("*") if p.name.endswith(".partial")]


def test_a_stray_disk_full_error_is_one_line_too(capsys):
    proc = run_main(capsys, "x", lambda argv: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded", "f")))
    assert_one_line_error(proc, "f: disk quota exceeded")


def test_capture_buffers_are_sized_by_the_largest_real_batch(tiny_model, tmp_path, monkeypatch, capsys):
    from collection import collector
    from scripts import collect_traces

    # hand-computed: shards of 3 sequences, batches of 2 never crossing them: [3,1] [4] [1,5] [9] [2] -> 9 tokens
    assert collector.largest_batch_tokens(np.array([3, 1, 4, 1, 5, 9, 2]), 3, 2) == 9
    assert collector.largest_batch_tokens(np.array([3, 1, 4, 1, 5, 9, 2]), 3, 100000) == 15

    sizes = []
    real = collector.RoutingCapture

    class Recording(real):
        def __init__(self, model, hidden_layers, hidden_dtype, store_logits, max_rows, *a, **k):
            sizes.append(max_rows)
            super().__init__(model, hidden_layers, hidden_dtype, store_logits, max_rows, *a, **k)
    monkeypatch.setattr(collector, "RoutingCapture", Recording)
    out = tmp_path / "big"
    collect(tiny_model, out, "--batch_size", "100000")  # the reported flag: once 26 GB, now one shard's tokens
    assert sizes == [max(s.tokens for s in TraceSet(out).manifest.shards)]

    monkeypatch.setattr(collector, "host_memory_available", lambda: 10_000)
    proc = run_main(capsys, "collect_traces", collect_traces.main, "--model", tiny_model, *SMALL,
                    "--batch_size", "100000", "--output", tmp_path / "b2")
    assert_one_line_error(proc, "--batch_size 100000", "lower --batch_size")
    assert not (tmp_path / "b2").exists()


def test_resume_of_a_damaged_set_names_no_missing_flag(small, tiny_model, tmp_path, capsys):
    from scripts.collect_traces import main

    out = tmp_path / "dmg"
    shutil.copytree(small, out)
    edit_manifest(out, complete=False)
    raw = bytearray((out / "shard_00001.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0x55
    (out / "shard_00001.safetensors").write_bytes(bytes(raw))
    before = snapshot(out)
    proc = run_main(capsys, "collect_traces", main, "--model", tiny_model, *SMALL, "--output", out, "--resume")
    assert_one_line_error(proc, "shard_00001.safetensors", "checksum", "--overwrite")
    assert "--no-verify" not in proc.stderr  # collect_traces has no such flag
    assert snapshot(out) == before


def make_checkpoint(path: Path, ts: TraceSet, test_ids: list[int], num_experts: int | None = None) -> None:
    from models.checkpoint import save_checkpoint
    from models.predictors import PredictorConfig, build_predictor

    m = ts.manifest
    cfg = PredictorConfig("simple", m.hidden_size, num_experts or m.num_experts, m.top_k, m.num_layers)
    split = {"train": np.array([0]), "val": np.array([1]), "test": np.array(test_ids)}
    save_checkpoint(path, build_predictor(cfg), cfg, split, {"dir": str(ts.dir)}, {}, {})


def test_validate_a_checkpoint_on_a_smaller_or_different_trace_set(small, tmp_path, capsys):
    from scripts.validate_coverage_analysis import main

    ts = TraceSet(small)
    make_checkpoint(tmp_path / "c.pth", ts, [2, 15])  # sequence 15 exists only in a larger set (small has 12)
    proc = run_main(capsys, "validate_coverage_analysis", main, "--checkpoint", tmp_path / "c.pth", "--model-type",
                    "simple", "--traces", small, "--device", "cpu", "--output-dir", tmp_path / "v")
    assert_one_line_error(proc, "lacks 1 of the 2 sequences", "test split")
    make_checkpoint(tmp_path / "e.pth", ts, [2], num_experts=8)
    proc = run_main(capsys, "validate_coverage_analysis", main, "--checkpoint", tmp_path / "e.pth", "--model-type",
                    "simple", "--traces", small, "--device", "cpu", "--output-dir", tmp_path / "v")
    assert_one_line_error(proc, "60 experts", "8 experts")
    assert not (tmp_path / "v").exists()


def test_ks_larger_than_the_expert_count_is_an_error(small, tmp_path, capsys):
    from scripts.validate_coverage_analysis import main

    proc = run_main(capsys, "validate_coverage_analysis", main, "--traces", small, "--model-type", "random",
                    "--ks", "61,100", "--device", "cpu", "--output-dir", tmp_path / "v")
    assert_one_line_error(proc, "--ks 61,100", "60 experts")
    assert proc.returncode == 2 and not (tmp_path / "v").exists()


@pytest.mark.parametrize("lookaheads,says", [("0,x", "comma list of integers"), ("0,3", "0..2"), ("-1", "0..2")])
def test_compare_predictors_bad_lookaheads(small, tmp_path, capsys, lookaheads, says):
    from scripts.compare_predictors import main

    proc = run_main(capsys, "compare_predictors", main, "--traces", small, "--lookaheads", lookaheads,
                    "--output", tmp_path / "c", "--device", "cpu")
    assert_one_line_error(proc, "--lookaheads", says)
    assert proc.returncode == 2 and not (tmp_path / "c").exists()


def test_a_pickled_object_checkpoint_never_suggests_weights_only_false(tmp_path):
    from models.checkpoint import load_checkpoint

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "c.pth"
    path.write_bytes(pickle.dumps({"format": "expert-predictor/1", "x": Exploit()}, protocol=4))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "not a loadable checkpoint" in str(e.value) and "weights_only" not in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("data", [b"hello, not a checkpoint\n", b'{"format": "expert-predictor/1"}', b""])
def test_a_file_torch_never_wrote_is_not_called_a_pickle_of_objects(tmp_path, data):
    """Text, JSON or nothing under a checkpoint's name was refused as "Python objects besides tensors", the wrong
    reason: it is no file torch.save wrote."""
    from models.checkpoint import load_checkpoint

    path = tmp_path / "c.pth"
    path.write_bytes(data)
    with pytest.raises(UserError, match="not a loadable checkpoint \\(not a file torch.save wrote"):
        load_checkpoint(path)


@pytest.mark.parametrize("bad,says", [
    (["--seed", "-1"], "--seed -1"),
    (["--dropout", "2"], "--dropout 2"),
    (["--dropout", "nan"], "--dropout nan"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--lookahead", "-1"], "--lookahead -1"),
    (["--output", "FILE"], "is a file"),
])
def test_training_refuses_bad_flags_before_touching_anything(small3, tmp_path, capsys, bad, says):
    from scripts.train_simple_predictor import main

    (tmp_path / "FILE").write_bytes(b"a file")
    bad = [str(tmp_path / "FILE") if a == "FILE" else a for a in bad]
    out = tmp_path / "ck"
    proc = run_main(capsys, "train_simple_predictor", main, "--traces", small3, "--epochs", "1", "--device", "cpu",
                    "--output", out, *bad)
    assert_one_line_error(proc, says)
    assert proc.returncode == 2 and not out.exists() and (tmp_path / "FILE").read_bytes() == b"a file"


@pytest.mark.parametrize("earlier", ["latest_checkpoint.pth", "best_checkpoint.json", "results.json"])
def test_training_guards_every_file_it_writes_and_overwrites_only_those(small3, tmp_path, capsys, earlier):
    from scripts.train_simple_predictor import main

    out = tmp_path / "ck"
    out.mkdir()
    (out / earlier).write_bytes(b"an earlier run")
    plant_user_files(out)
    before = snapshot(out)
    args = ["--traces", small3, "--epochs", "1", "--device", "cpu", "--output", out, "--no-verify"]
    proc = run_main(capsys, "train_simple_predictor", main, *args)
    assert_one_line_error(proc, earlier, "--overwrite")
    assert snapshot(out) == before
    assert run_main(capsys, "train_simple_predictor", main, *args, "--overwrite").returncode == 0
    assert_user_files(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*USER_FILES, "best_checkpoint.pth", "best_checkpoint.json",
                                                           "latest_checkpoint.pth", "latest_checkpoint.json",
                                                           "results.json"])


def test_training_stops_when_it_diverges(small3, tmp_path, capsys):
    from scripts.train_simple_predictor import main

    out = tmp_path / "ck"
    proc = run_main(capsys, "train_simple_predictor", main, "--traces", small3, "--epochs", "3", "--lr", "1e6",
                    "--batch-rows", "64", "--device", "cpu", "--output", out, "--no-verify")
    assert_one_line_error(proc, "training diverged at epoch 1 (loss nan", "lower --lr")
    assert proc.returncode == 2 and not out.exists()  # stopped before validation, so before any checkpoint


def test_nan_scores_rank_last_instead_of_crashing_the_metrics():
    from validation.coverage.metrics import true_expert_ranks

    scores = torch.tensor([[0.5, float("nan"), 0.1, 0.9]])
    assert true_expert_ranks(scores, torch.tensor([[1, 3]])).tolist() == [[3, 0]]


# ----------------------------------------------------------------------------------------------
# hand-edited manifests


@pytest.mark.parametrize("path,value,says", [
    (("complete",), "yes", "complete must be true or false"),
    (("format_version",), True, "format_version"),
    (("model", "name_or_path"), 7, "model.name_or_path"),
    (("routing", "top_k"), 61, "exceeds routing.num_experts"),
    (("capture", "hidden_dtype"), "int8", "capture.hidden_dtype"),
    (("capture", "hidden_layers"), [1, 1], "increasing"),
    (("capture", "store_logits"), "no", "capture.store_logits"),
    (("sources",), [], "sources must be a non-empty list"),
    (("shards", 0, "bytes"), "153572", "malformed shard entry"),
    (("shards", 0, "sequences"), 6.0, "malformed shard entry"),
    (("shards", 0, "sha256"), "abc", "malformed shard entry"),
    (("shards", 1, "file"), "shard_00000.safetensors", "listed twice"),
    (("shards", 0, "file"), "manifest.json", "plain file name"),
    (("router_weights", "file"), "../x", "router_weights"),
    (("plan", "tokens_sha256"), 5, "plan.tokens_sha256"),
])
def test_hand_edited_manifests_are_one_line(small, tmp_path, path, value, says):
    d = tmp_path / "m"
    shutil.copytree(small, d)
    m = json.loads((d / "manifest.json").read_text())
    node = m
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TraceFormatError, match="not a valid trace manifest") as e:
        TraceSet(d)
    assert says in str(e.value) and "\n" not in str(e.value)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=True) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)


def manifest_paths(node, prefix=()):
    """Every key path in a manifest, so that any field of it may be replaced."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from manifest_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from manifest_paths(v, prefix + (i,))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_field_of_a_manifest_replaced_is_an_error_or_readable(small, tmp_path_factory, data):
    """Whatever a hand edit puts anywhere in the manifest, a reader fails with one TraceFormatError or works:
    it opens the set, tables its sequences, loads rows and router weights, and prints the model name."""
    from collection.traces.rows import SplitBlocks, block_bytes, split_sequences

    m = json.loads((small / "manifest.json").read_text())
    paths = [p for p in manifest_paths(m) if p]
    path = data.draw(st.sampled_from(paths))
    node = m
    for key in path[:-1]:
        node = node[key]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = data.draw(JSON)
    d = tmp_path_factory.mktemp("mf")
    for f in small.iterdir():
        os.link(f, d / f.name)  # the same files (a symbolic link would be refused, as any reader refuses one)
    (d / "manifest.json").unlink()
    (d / "manifest.json").write_text(json.dumps(m))
    try:
        ts = TraceSet(d, allow_incomplete=True)
        table = ts.sequence_table()
        split = split_sequences(table, 0)
        f"{ts.manifest.model['name_or_path']} {ts.manifest.source_names} {block_bytes(ts, 0.5)}"
        for block in SplitBlocks(ts, split["train"], torch.device("cpu"), 2, keep=False):
            assert block.tokens > 0
        ts.router_weights()
    except TraceFormatError as e:
        assert "\n" not in str(e)


def test_validation_outputs_of_the_wrong_kind_are_refused_first(small, tmp_path, capsys):
    from scripts.validate_coverage_analysis import main

    (tmp_path / "f").write_bytes(b"mine")
    for flag, path in (("--output-dir", tmp_path / "f"), ("--json", tmp_path), ("--plot", tmp_path)):
        proc = run_main(capsys, "validate_coverage_analysis", main, "--traces", small, "--model-type", "random",
                        flag, path)
        assert_one_line_error(proc, flag)
        assert proc.returncode == 2
    assert (tmp_path / "f").read_bytes() == b"mine"


def test_an_unfinished_staged_set_with_a_fitted_codec_is_discarded(tmp_path):
    """A replacement cut short in a fitted hidden format leaves hidden_codec.safetensors in the staging directory
    beside its shards: it is ours and goes with them; a file of any other name stops the discard."""
    from collection.traces.output import OutputState, discard_staging

    staging = tmp_path / ".incoming"
    staging.mkdir()
    for name in ("shard_00000.safetensors", "hidden_codec.safetensors", "manifest.json.partial"):
        (staging / name).write_bytes(b"x")
    discard_staging(OutputState(tmp_path, None, None, True, None))
    assert not staging.exists()
    staging.mkdir()
    (staging / "hidden_codec.safetensors").write_bytes(b"x")
    (staging / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files this program did not write"):
        discard_staging(OutputState(tmp_path, None, None, True, None))
    assert (staging / "notes.txt").read_text() == "mine"


def test_every_scorer_reads_a_checkpoint_through_one_door_that_checks_its_test_split(small, tmp_path, capsys):
    """checkpoint_for_traces: the checkpoint's stored test split must be the sequences scored (sorted order does not
    matter); traces of other tokens get a warning; a checkpoint of another routing shape is refused."""
    from models.checkpoint import checkpoint_for_traces

    ts = TraceSet(small)
    make_checkpoint(tmp_path / "c.pth", ts, [5, 2])
    model, cfg, ckpt = checkpoint_for_traces(tmp_path / "c.pth", ts, "cpu", "here", test_ids=np.array([2, 5]))
    assert cfg.num_layers == ts.manifest.num_layers and not model.training
    assert "not the ones the checkpoint was trained on" in capsys.readouterr().out  # saved without tokens_sha256
    with pytest.raises(UserError, match="here: the checkpoint's held-out test split differs"):
        checkpoint_for_traces(tmp_path / "c.pth", ts, "cpu", "here", test_ids=np.array([2, 6]))
    checkpoint_for_traces(tmp_path / "c.pth", ts, "cpu", "here")  # no split to compare: any sequences
    make_checkpoint(tmp_path / "d.pth", ts, [2], num_experts=ts.manifest.num_experts - 1)
    with pytest.raises(UserError, match="here: routing shape"):
        checkpoint_for_traces(tmp_path / "d.pth", ts, "cpu", "here")


def test_a_checkpoints_report_goes_beside_it_when_its_kind_is_read_from_it(tmp_path):
    """Without --model-type (read from the checkpoint later), the default destination is still the checkpoint's
    folder, not results/None-d0."""
    from scripts.validate_coverage_analysis import parse_args

    args = parse_args(["--checkpoint", str(tmp_path / "ck" / "best_checkpoint.pth")])
    assert args.json_path == tmp_path / "ck" / "coverage_metrics.json"
    assert args.plot_path == tmp_path / "ck" / "coverage_analysis.png"
    assert parse_args(["--model-type", "random"]).json_path == Path("results/random-d0/coverage_metrics.json")
