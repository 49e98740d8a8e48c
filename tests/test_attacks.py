"""Attacks, as an adversary would make them: hand-made manifests, symbolic links, wedged folders, a set replaced
while it is read, memory bombs in checkpoints, destinations that cannot be written, NaN in stored data and in
flags. Every reproduction of the second trust review is here, with variants (each file field of a manifest with
each bad value, each script's output flags, each kind of bad number), some of them fuzzed.

Each refusal must be exit 2 and exactly one line on stderr naming the file or flag, no traceback, nothing outside
the trace folder touched (a sentinel file and a sibling folder are checksummed before and after) and the set that
was there byte-identical. Scripts run in forked children (tests/isolated_cli.py): milliseconds each.

    pytest -q tests/test_attacks.py
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import struct
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collection.traces.format import (
    FILE_FIELDS,
    FOREIGN_FILE_FIELDS,
    MANIFEST,
    ROUTER_WEIGHTS,
    STAGING,
    Manifest,
    SafetensorsFile,
    TraceFormatError,
    TraceSet,
)
from collection.traces.hidden_format import CODEC_FILE
from common.errors import UserError
from tests.conftest import REPO
from tests.isolated_cli import Scripts, assert_refused
from tests.test_legacy_import import as_main, legacy  # noqa: F401 - fixtures: legacy shards as the original wrote them
from tests.test_safety import make_checkpoint, run_main, snapshot

C = ["--target_traces", "24", "--shard_size", "6", "--max_length", "32", "--device", "cpu"]  # the reproductions' C
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# bad values for a file name: a path out of the folder, a directory, nothing, not a string, NUL, absolute, too long
BAD_NAMES = ["../sentinel.txt", "..", ".", "", 5, None, True, "a\0b", "sub/x", "x" * 300, ["x"], {"a": 1}]


@pytest.fixture(scope="module")
def scripts():
    yield Scripts()
    os.environ.pop("TQDM_DISABLE", None)


class Scene(types.SimpleNamespace):
    """root/T (a copy of the tiny traces), root/sentinel.txt, root/sibling/ (another user's files, one of them a
    shard), root/FILE (a plain file), and where a run's stderr goes (outside root)."""

    def freeze(self) -> "Scene":
        self.before = snapshot(self.root)
        return self

    def run(self, scripts: Scripts, script: str, *argv) -> tuple[int | None, str]:
        return scripts.run(script, list(argv), self.err)

    def assert_untouched(self) -> None:
        assert snapshot(self.root) == self.before

    def assert_outside_untouched(self) -> None:
        now = snapshot(self.root)
        for key in self.before.keys() | now.keys():
            if not key.startswith("T/") and key != "T":
                assert now.get(key) == self.before.get(key), key


@pytest.fixture
def scene(tiny_traces, tmp_path) -> Scene:
    root = tmp_path / "scene"
    root.mkdir()
    shutil.copytree(tiny_traces, root / "T")
    (root / "sentinel.txt").write_text("keep\n")
    (root / "sibling").mkdir()
    shutil.copy(tiny_traces / "shard_00001.safetensors", root / "sibling" / "shard_00000.safetensors")
    (root / "sibling" / "notes.txt").write_text("mine\n")
    (root / "FILE").write_text("a file\n")
    return Scene(root=root, T=root / "T", sentinel=root / "sentinel.txt", sibling=root / "sibling",
                 err=tmp_path / "stderr", tiny=tiny_traces)


def set_field(directory: Path, path: tuple, value, name: str = MANIFEST) -> None:
    """Put `value` at JSON `path` of `directory`/`name` (dicts on the way made when absent)."""
    p = directory / name
    d = json.loads(p.read_text())
    node = d
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    node[path[-1]] = value
    p.write_text(json.dumps(d))


def concrete(field: tuple) -> tuple:
    """A FILE_FIELDS path with its list wildcard made an index: the second shard's entry."""
    return tuple(1 if k == "*" else k for k in field)


def label(field: tuple) -> str:
    return ".".join(str(k) for k in concrete(field)).replace(".1.", "[1].")


def plant_bytes(directory: Path, name: str, offset: int, data: bytes) -> None:
    """Overwrite bytes of a listed file and record its new checksum in the manifest: damage no checksum sees."""
    import hashlib

    path = directory / name
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))
    d = json.loads((directory / MANIFEST).read_text())
    for entry in d["shards"] + [d.get("router_weights") or {}]:
        if entry.get("file") == name:
            entry["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    (directory / MANIFEST).write_text(json.dumps(d))


def writer_commands(scene: Scene, legacy_input: Path) -> dict[str, tuple[str, list]]:
    """Every command that replaces the set in scene.T, with inputs that are themselves fine."""
    return {"collect --overwrite": ("collect_traces", [*C, "--output", scene.T, "--overwrite"]),
            "collect --resume": ("collect_traces", [*C, "--output", scene.T, "--resume"]),
            "transcode --overwrite": ("transcode_traces", ["--traces", scene.tiny, "--hidden-format", "lossless",
                                                           "--hidden-dtype", "bfloat16", "--output", scene.T,
                                                           "--overwrite", "--device", "cpu"]),
            "import --overwrite": ("import_specmoe_shards", ["--input", legacy_input, "--output", scene.T,
                                                             "--num-layers", "3", "--overwrite"])}


@pytest.fixture
def legacy_input(tmp_path) -> Path:
    """A file the importer accepts as input (it is refused only after --output has been judged)."""
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "s.pkl").write_bytes(b"\x80\x04N.")
    return d


# ----------------------------------------------------------------------------------------------
# file names in a manifest (one check, FILE_FIELDS, for every field; every writer and reader)


def file_keys(node, prefix=()):
    """JSON paths (list indices as "*") of every key named "file" in a manifest."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "file":
                yield prefix + (k,)
            yield from file_keys(v, prefix + (k,))
    elif isinstance(node, list):
        for v in node:
            yield from file_keys(v, prefix + ("*",))


def test_every_file_a_written_manifest_names_is_a_checked_field(tiny_traces, tiny_pca_router_traces, legacy,
                                                                 tmp_path):
    """Manifests as the writers write them (lossless, fitted with a codec, a legacy import) name files only at
    FILE_FIELDS paths (and the provenance of legacy inputs), and Manifest.files() lists exactly the set's files."""
    from scripts.import_specmoe_shards import main
    from tests.test_legacy_import import L

    imported = tmp_path / "imported"
    main(["--input", str(legacy[0]), "--output", str(imported), "--num-layers", str(L)])
    for d in (tiny_traces, tiny_pca_router_traces, imported):
        m = json.loads((d / MANIFEST).read_text())
        assert set(file_keys(m)) <= set(FILE_FIELDS) | set(FOREIGN_FILE_FIELDS), set(file_keys(m))
        files = Manifest.from_json(m, d / MANIFEST).files()
        assert sorted(files) == sorted(p.name for p in d.iterdir() if p.name != MANIFEST)
    assert ("plan", "inputs", "*", "file") in set(file_keys(json.loads((imported / MANIFEST).read_text())))
    assert CODEC_FILE in Manifest.from_json(json.loads((tiny_pca_router_traces / MANIFEST).read_text()), d).files()


@pytest.mark.parametrize("field", list(FILE_FIELDS), ids=label)
@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_a_bad_file_name_in_any_field_is_refused_by_every_writer_and_reader(scene, scripts, legacy_input, field, bad):
    set_field(scene.T, concrete(field), bad)
    scene.freeze()
    for name, (script, argv) in writer_commands(scene, legacy_input).items():
        code, err = scene.run(scripts, script, *argv)
        assert_refused(code, err, script, f"{scene.T / MANIFEST}", label(field))
        scene.assert_untouched()
    code, err = scene.run(scripts, "validate_coverage_analysis", "--traces", scene.T, "--model-type", "random",
                          "--output-dir", scene.root.parent / "v", "--device", "cpu")
    assert_refused(code, err, "validate_coverage_analysis", label(field))
    scene.assert_untouched()


def test_the_critical_reproduction(scene, scripts):
    """C --output T; echo keep > v.txt; (codec file '../v.txt'); C --output T --overwrite; ls v.txt"""
    set_field(scene.T, ("capture", "hidden_codec"), {"file": "../sentinel.txt"})
    scene.freeze()
    code, err = scene.run(scripts, "collect_traces", *C, "--output", scene.T, "--overwrite")
    assert_refused(code, err, "collect_traces", "capture.hidden_codec.file '../sentinel.txt'", "nothing was touched")
    scene.assert_untouched()
    assert scene.sentinel.read_text() == "keep\n"


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=True)
                    | st.text(max_size=8) | st.sampled_from(["..", "../sentinel.txt", "/", "a/b", "\0"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=5)


@SLOW
@given(data=st.data())
def test_fuzzed_file_fields_never_reach_a_writer(scene, scripts, data):
    """Any JSON value in any file field (or in place of its section) is refused before the old set is touched."""
    field = data.draw(st.sampled_from(list(FILE_FIELDS)))
    # the name itself, its entry, or the section holding the entries (the shard list, router_weights, hidden_codec)
    depth = data.draw(st.integers(field.index("*") if "*" in field else len(field) - 1, len(field)))
    path = concrete(field)[:depth]
    value = data.draw(JSON.filter(lambda v: v not in ("shard_00001.safetensors", ROUTER_WEIGHTS, CODEC_FILE)))
    shutil.rmtree(scene.T)
    shutil.copytree(scene.tiny, scene.T)
    if path == ("shards",) and isinstance(value, list) and not value:
        value = None  # an empty shard list is a valid manifest of a set not yet begun
    if depth < len(field) and value is None and path[0] != "shards":
        value = 7  # null means "absent" for an optional section
    set_field(scene.T, path, value)
    scene.freeze()
    code, err = scene.run(scripts, "collect_traces", *C, "--output", scene.T, "--overwrite")
    assert_refused(code, err, "collect_traces", str(scene.T / MANIFEST))
    scene.assert_untouched()


@SLOW
@given(data=st.data())
def test_any_field_replaced_is_one_line_or_read_by_a_script(scene, scripts, data):
    """Any field of the manifest replaced by any JSON value: a reading script fails with one line or works; nothing
    outside the folder and nothing inside it changes."""
    from tests.test_safety import manifest_paths

    shutil.rmtree(scene.T)
    shutil.copytree(scene.tiny, scene.T)
    m = json.loads((scene.T / MANIFEST).read_text())
    path = data.draw(st.sampled_from([p for p in manifest_paths(m) if p]))
    set_field(scene.T, path, data.draw(JSON))
    scene.freeze()
    out = scene.root.parent / "v"
    code, err = scene.run(scripts, "validate_coverage_analysis", "--traces", scene.T, "--model-type", "router-reuse",
                          "--lookahead", "1", "--output-dir", out, "--device", "cpu", "--allow-incomplete")
    if code != 0:
        assert_refused(code, err, "validate_coverage_analysis")
    scene.assert_untouched()
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("spec,says", [
    ("a string", "routing.router must be an object"),
    ({"scoring": "cubic"}, "scoring 'cubic'"),
    ({"scoring": "softmax", "groups": 3}, "groups must be an object"),
    ({"scoring": "softmax", "groups": {"n_group": 7, "topk_group": 1, "group_score": "max"}}, "n_group 7"),
    ({"scoring": "softmax", "groups": {"n_group": 6, "topk_group": 9, "group_score": "max"}}, "topk_group 9"),
    ({"scoring": "sigmoid", "groups": {"n_group": 60, "topk_group": 4, "group_score": "sum of top-2"}}, "group_score"),
    ({"scoring": "softmax", "groups": {"n_group": 6, "topk_group": 2, "group_score": None}}, "group_score None"),
])
def test_a_routing_rule_that_cannot_drive_the_router_baselines_is_refused(scene, scripts, spec, says):
    set_field(scene.T, ("routing", "router"), spec)
    scene.freeze()
    code, err = scene.run(scripts, "validate_coverage_analysis", "--traces", scene.T, "--model-type", "router",
                          "--output-dir", scene.root.parent / "v", "--device", "cpu")
    assert_refused(code, err, "validate_coverage_analysis", str(scene.T / MANIFEST), says)
    scene.assert_untouched()


@pytest.mark.parametrize("key,value", [("num_layers", 10**9), ("hidden_size", 10**7), ("num_experts", 40000)])
def test_manifest_sizes_beyond_any_model_are_refused_before_use(scene, scripts, key, value):
    set_field(scene.T, ("routing", key), value)
    scene.freeze()
    code, err = scene.run(scripts, "train_simple_predictor", "--traces", scene.T, "--epochs", "1", "--device", "cpu",
                          "--output", scene.root.parent / "ck")
    assert_refused(code, err, "train_simple_predictor", f"routing.{key} {value}")
    scene.assert_untouched()


def test_a_partial_manifest_naming_a_file_outside_is_refused(scene, scripts):
    """A killed torchrun run's partial manifest listing another folder's valid shard, checksum and all: it is
    never folded in (a name is a plain file name or nothing)."""
    import hashlib

    set_field(scene.T, ("complete",), False)
    d = json.loads((scene.T / MANIFEST).read_text())
    outside = scene.sibling / "shard_00000.safetensors"
    entry = {**d["shards"][1], "file": "../sibling/shard_00000.safetensors",
             "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}
    (scene.T / "manifest.rank00001.json").write_text(json.dumps(
        {"rank": 1, "world": 2, "tokens_sha256": d["plan"]["tokens_sha256"], "shards": [entry]}))
    scene.freeze()
    args = ["--datasets", "bundled", "--target_traces", "72", "--shard_size", "24", "--batch_size", "8",
            "--max_length", "64", "--device", "cpu", "--dtype", "float32"]  # the tiny traces' own plan
    code, err = scene.run(scripts, "collect_traces", *args, "--output", scene.T, "--resume")
    assert_refused(code, err, "collect_traces", "manifest.rank00001.json", "partial manifest")
    scene.assert_untouched()


# ----------------------------------------------------------------------------------------------
# symbolic links: never followed


@pytest.mark.parametrize("writer", ["collect --overwrite", "collect --resume", "transcode --overwrite",
                                    "import --overwrite"])
def test_a_staging_folder_that_is_a_link_is_refused(scene, scripts, legacy_input, writer):
    """mkdir o; cp T/shard_00001.safetensors o/shard_00000.safetensors; ln -s ../o T/.incoming; C --output T
    --overwrite; ls o (empty before: the other folder's shard was deleted and the set moved in)"""
    (scene.T / STAGING).symlink_to("../sibling")
    scene.freeze()
    script, argv = writer_commands(scene, legacy_input)[writer]
    code, err = scene.run(scripts, script, *argv)
    assert_refused(code, err, script, str(scene.T / STAGING), "symbolic link")
    scene.assert_untouched()


@pytest.mark.parametrize("name", ["shard_00001.safetensors", ROUTER_WEIGHTS, MANIFEST])
def test_a_file_of_the_set_that_is_a_link_is_refused_by_readers_and_writers(scene, scripts, name):
    """A link to another set's file: a reader would read bytes no manifest vouches for, a writer would delete or
    replace the link's target's name."""
    other = scene.root / "other"
    shutil.copytree(scene.T, other)
    (scene.T / name).unlink()
    (scene.T / name).symlink_to(other / name)
    scene.freeze()
    code, err = scene.run(scripts, "validate_coverage_analysis", "--traces", scene.T, "--model-type", "router-reuse",
                          "--lookahead", "1", "--output-dir", scene.root.parent / "v", "--device", "cpu")
    assert_refused(code, err, "validate_coverage_analysis", str(scene.T / name), "symbolic link")
    code, err = scene.run(scripts, "collect_traces", *C, "--output", scene.T, "--overwrite")
    assert_refused(code, err, "collect_traces", str(scene.T / name), "symbolic link")
    scene.assert_untouched()


def test_a_codec_that_is_a_link_is_refused(tiny_pca_traces, tmp_path, scripts):
    d = tmp_path / "pca"
    shutil.copytree(tiny_pca_traces, d)
    (d / CODEC_FILE).rename(tmp_path / "codec")
    (d / CODEC_FILE).symlink_to(tmp_path / "codec")
    code, err = scripts.run("validate_coverage_analysis", ["--traces", d, "--model-type", "router-reuse",
                                                           "--lookahead", "1", "--output-dir", tmp_path / "v",
                                                           "--device", "cpu"], tmp_path / "err")
    assert_refused(code, err, "validate_coverage_analysis", str(d / CODEC_FILE), "symbolic link")


@pytest.mark.parametrize("script,partial", [("collect_traces", "shard_00000.safetensors.partial"),
                                            ("train_simple_predictor", "latest_checkpoint.pth.partial")])
def test_a_link_planted_under_a_temporary_name_is_never_written_through(scene, scripts, script, partial):
    out = scene.root / "new"
    out.mkdir()
    (out / partial).symlink_to(scene.sentinel)
    scene.freeze()
    argv = ([*C, "--output", out, "--resume"] if script == "collect_traces" else
            ["--traces", scene.T, "--epochs", "1", "--device", "cpu", "--output", out, "--no-verify"])
    code, err = scene.run(scripts, script, *argv)
    assert_refused(code, err, script, str(out / partial), "symbolic link")
    scene.assert_untouched()


# ----------------------------------------------------------------------------------------------
# a folder wedged by a swap an older version could not finish


def wedge(scene: Scene, codec_file) -> None:
    """What an older version left when a manifest's hidden_codec.file was `codec_file`: the old manifest moved
    to .incoming (step 1 of the swap), the old files it listed before the codec deleted, the traceback at the
    codec; the complete new set (the tiny traces' own plan) waiting in .incoming."""
    staging = scene.T / STAGING
    shutil.copytree(scene.tiny, staging)
    old = json.loads((scene.T / MANIFEST).read_text())
    old["capture"]["hidden_codec"] = {"file": codec_file}
    (staging / "replaced_manifest.json").write_text(json.dumps(old))
    for name in [s["file"] for s in old["shards"]] + [ROUTER_WEIGHTS, MANIFEST]:
        (scene.T / name).unlink()


TINY_PLAN = ["--datasets", "bundled", "--target_traces", "72", "--shard_size", "24", "--batch_size", "8",
             "--max_length", "64", "--device", "cpu", "--dtype", "float32"]


@pytest.mark.parametrize("codec_file", ["..", "", 5, "a\0b", "../sentinel.txt"], ids=repr)
@pytest.mark.parametrize("then", ["--resume", "--overwrite"])
def test_a_wedged_folder_is_named_by_readers_and_finished_by_the_next_run(scene, scripts, codec_file, then):
    wedge(scene, codec_file)
    scene.freeze()
    code, err = scene.run(scripts, "validate_coverage_analysis", "--traces", scene.T, "--model-type", "random",
                          "--output-dir", scene.root.parent / "v", "--device", "cpu")
    assert_refused(code, err, "validate_coverage_analysis", f"{scene.T / MANIFEST}: missing", "interrupted replacement",
                   "--resume finishes it")
    scene.assert_untouched()
    code, err = scene.run(scripts, "collect_traces", *TINY_PLAN, "--output", scene.T, then)
    assert code == 0, err[-3000:]
    scene.assert_outside_untouched()
    assert not (scene.T / STAGING).exists()
    with TraceSet(scene.T) as ts:  # the new set, whole and verified
        assert ts.manifest.complete and len(ts) == 3 and ts.sequence_table()["seq_id"].size == 72


# ----------------------------------------------------------------------------------------------
# readers: a shared lock while they read, and the bytes they verified


def test_a_set_being_read_is_never_swapped_underneath_its_reader(scene):
    """A reader has the set open (a training run paused after "traces:"); C --output T --overwrite --seed 5
    finishes its new set meanwhile. The swap waits, saying who it waits for, and happens once the reader closes."""
    ts = TraceSet(scene.T)
    first = ts.shard(0).numpy("topk_ids").copy()
    manifest_before = (scene.T / MANIFEST).read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "collect_traces.py"), *C, "--seed", "5",
                             "--output", str(scene.T), "--overwrite"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr] + [lines.put("")], daemon=True).start()
    try:
        said = []
        while not said or "waiting for" not in said[-1]:  # ends at the writer's exit if it never waits
            said.append(lines.get(timeout=600))          # (a guard against a hang, not a timed assertion)
            if not said[-1]:
                break
        assert f"(pid {os.getpid()}), which read this set" in said[-1] and "waiting for" in said[-1], said
        assert (scene.T / MANIFEST).read_bytes() == manifest_before  # not replaced while it is read
        assert np.array_equal(ts.shard(0).numpy("topk_ids"), first)
        assert ts.sequence_table()["seq_id"].size == 72
    finally:
        ts.close()
        proc.wait(timeout=600)
    assert proc.returncode == 0
    with TraceSet(scene.T) as new:
        assert new.manifest.plan["seed"] == 5 and new.manifest.plan["sequences"] == 24


def test_shards_are_read_through_the_descriptor_that_was_verified(scene):
    """A shard's name is pointed at other bytes after the reader verified it: the reader still reads what it
    verified, never the file now under that name."""
    from collection.traces.rows import load_block

    ts = TraceSet(scene.T)
    table = ts.sequence_table()
    ids = table["seq_id"][table["shard"] == 1]
    want = load_block(ts, [1], ids, torch.device("cpu"))
    swapped = scene.root / "swapped"
    shutil.copy(scene.T / "shard_00002.safetensors", swapped)
    os.replace(swapped, scene.T / "shard_00001.safetensors")  # same name, another shard's bytes
    got = load_block(ts, [1], ids, torch.device("cpu"))
    assert torch.equal(got.hidden, want.hidden) and torch.equal(got.topk_ids, want.topk_ids)
    ts.close()


def test_a_reader_waits_for_a_swap_and_then_reads_the_new_set(scene, tmp_path, capsys):
    """The other side of the lock: another process holds the old manifest as the swap does; a reader opening the set
    waits for it (saying who it waits for) and reads the set that is there when the swap ends."""
    import time

    new = json.loads((scene.T / MANIFEST).read_text())
    new["plan"]["seed"] = 99
    (tmp_path / "m.json").write_text(json.dumps(new))
    swap = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('locked', flush=True); sys.stdin.readline(); os.replace(sys.argv[2], sys.argv[1])")
    holder = subprocess.Popen([sys.executable, "-c", swap, str(scene.T / MANIFEST), str(tmp_path / "m.json")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    opened = []
    reader = threading.Thread(target=lambda: opened.append(TraceSet(scene.T)), daemon=True)
    reader.start()
    said = ""
    for _ in range(6000):  # until the reader says it waits (a guard against a hang, not a timed assertion)
        said += capsys.readouterr().err
        if "waiting for" in said or not reader.is_alive():
            break
        time.sleep(0.1)
    assert f"(pid {holder.pid}), which is replacing this trace set" in said and not opened
    holder.communicate("go\n", timeout=600)  # the new manifest moves in, the swap ends
    reader.join(600)
    assert opened[0].manifest.plan["seed"] == 99
    opened[0].close()


# ----------------------------------------------------------------------------------------------
# sizes from files: checked against what is stored before anything is allocated


def test_a_checkpoint_config_is_checked_against_its_weights_before_anything_is_built(tiny_traces, tmp_path,
                                                                                       monkeypatch):
    """A 734 KB checkpoint whose config says hidden_dim 12000 took 1.37 GB before it was refused: now the config
    is laid out on the meta device (no memory) and compared with the stored shapes first."""
    from models import checkpoint

    with TraceSet(tiny_traces) as ts:
        make_checkpoint(tmp_path / "c.pth", ts, [2])
    ckpt = torch.load(tmp_path / "c.pth", weights_only=True)
    ckpt["config"]["hidden_dim"] = 12000
    torch.save(ckpt, tmp_path / "c.pth")
    built = []
    real = checkpoint.build_predictor

    def recording(cfg):
        built.append((cfg.hidden_dim, torch.empty(0).device.type))
        return real(cfg)
    monkeypatch.setattr(checkpoint, "build_predictor", recording)
    with pytest.raises(UserError, match=r"config and weights do not fit \(net.0.bias: the config makes \(12000,\), "
                                        r"the file holds \(256,\)\)"):
        checkpoint.load_checkpoint(tmp_path / "c.pth")
    assert built == [(12000, "meta")]


@pytest.mark.parametrize("edit,says", [
    (lambda c: c.pop("split"), "no split"),
    (lambda c: c["split"].pop("test"), "holds no test split"),
    (lambda c: c.update(split={}), "no split"),
    (lambda c: c.update(split={"train": 1, "val": 2, "test": 3}), "no split"),
    (lambda c: c.pop("traces"), "no traces"),
    (lambda c: c["config"].update(hidden_dim=60000), "hidden_dim 60000"),
    (lambda c: c["config"].update(hidden_dim="256"), "hidden_dim '256'"),
    (lambda c: c["config"].update(kind="cubic"), "kind 'cubic'"),
    (lambda c: c["config"].update(dropout=float("nan")), "dropout nan"),
    (lambda c: c["config"].update(window=10**6), "window 1000000"),
    (lambda c: c.update(state_dict={"x": 1}), "no state_dict"),
])
def test_a_damaged_checkpoint_is_one_line(tiny_traces, tmp_path, scripts, edit, says):
    with TraceSet(tiny_traces) as ts:
        make_checkpoint(tmp_path / "c.pth", ts, [2])
    ckpt = torch.load(tmp_path / "c.pth", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "c.pth")
    code, err = scripts.run("validate_coverage_analysis", ["--checkpoint", tmp_path / "c.pth", "--model-type", "simple",
                                                           "--traces", tiny_traces, "--device", "cpu",
                                                           "--output-dir", tmp_path / "v"], tmp_path / "err")
    assert_refused(code, err, "validate_coverage_analysis", f"--checkpoint {tmp_path / 'c.pth'}", says)
    assert not (tmp_path / "v").exists()


TRAINERS = ["train_simple_predictor", "train_hybrid_predictor", "train_anchored_predictor"]
TRAINING_FLAGS = [("--hidden-dim", "200000"), ("--window", "1000000"), ("--context", "100000"), ("--depth", "1000"),
                  ("--past-layers", "100000"), ("--own-layers", "100000"), ("--lr", "nan"), ("--lr", "inf"),
                  ("--lr", "1e-310"), ("--dropout", "nan"), ("--seed", "-1"), ("--weight-decay", "inf"),
                  ("--grad-clip", "nan"), ("--warmup", "nan"), ("--val-fraction", "nan"), ("--loss-kl", "inf"), ("--hidden-dim", "0")]


@pytest.mark.parametrize("flag,value", TRAINING_FLAGS)
def test_training_flags_out_of_range_are_refused_before_the_traces_are_read(scene, scripts, flag, value):
    scene.freeze()
    code, err = scene.run(scripts, "train_anchored_predictor", "--traces", scene.T, "--epochs", "1", "--device", "cpu",
                          "--output", scene.root / "ck", flag, value)
    assert_refused(code, err, "train_anchored_predictor", flag)
    scene.assert_untouched()


# ----------------------------------------------------------------------------------------------
# destinations: checked before any work, one line naming the flag and the path


def destination_cases(scene: Scene) -> list[tuple[str, list, str, str]]:
    """(script, arguments before the destination, flag, kind) for every output flag of every script."""
    t = scene.tiny
    train = ["--traces", t, "--epochs", "1", "--device", "cpu", "--no-verify"]
    validate = ["--traces", t, "--model-type", "random", "--device", "cpu", "--output-dir", scene.root.parent / "v"]
    simulate = ["--traces", t, "--policies", "on-demand", "--cache-experts", "8", "--output-dir",
                scene.root.parent / "s"]
    return [("collect_traces", C, "--output", "dir"),
            ("collect_traces", [*C, "--output", scene.root.parent / "c"], "--stats-json", "file"),
            ("transcode_traces", ["--traces", t, "--hidden-format", "lossless", "--hidden-dtype", "bfloat16",
                                  "--device", "cpu"], "--output", "dir"),
            ("import_specmoe_shards", ["--input", t, "--num-layers", "3"], "--output", "dir"),
            *[(trainer, train, "--output", "dir") for trainer in TRAINERS],
            ("validate_coverage_analysis", validate[:-2], "--output-dir", "dir"),
            ("validate_coverage_analysis", validate, "--json", "file"),
            ("validate_coverage_analysis", validate, "--plot", "file"),
            ("compare_predictors", ["--traces", t, "--epochs", "1", "--device", "cpu"], "--output", "dir"),
            ("compare_traces", [t, t], "--json", "file"),
            ("simulate_prefetch", simulate[:-2], "--output-dir", "dir"),
            ("simulate_prefetch", simulate, "--json", "file"),
            ("simulate_prefetch", simulate, "--plot", "file"),
            ("generate_offloaded", ["--device", "cpu", "--max-new-tokens", "1"], "--json", "file")]


@pytest.mark.parametrize("bad", ["FILE/sub", "FILE-or-DIR", "empty"])
def test_every_destination_is_checked_before_any_work(scene, scripts, bad):
    scene.freeze()
    for script, argv, flag, kind in destination_cases(scene):
        dest = {"FILE/sub": scene.root / "FILE" / "sub", "empty": "",
                "FILE-or-DIR": scene.root / "FILE" if kind == "dir" else scene.root}[bad]
        code, err = scene.run(scripts, script, *argv, flag, dest)
        assert_refused(code, err, script, flag, str(dest))
        scene.assert_untouched()
        assert not (scene.root.parent / "v").exists() and not (scene.root.parent / "s").exists()


def plant_non_reports(scene: Scene) -> dict[str, Path]:
    """Files a report flag must never replace: a trace set's manifest and a shard, a predictor checkpoint, its
    sidecar and its run's results (in a training run's folder), a checkpoint and a sidecar copied alone, a text
    file, an image's name holding text, a link to a file, a dangling link."""
    from models.checkpoint import save_checkpoint
    from models.predictors import PredictorConfig, build_predictor

    run, alone = scene.root / "run", scene.root / "alone"
    run.mkdir()
    alone.mkdir()
    m = TraceSet(scene.T).manifest
    cfg = PredictorConfig("simple", m.hidden_size, m.num_experts, m.top_k, m.num_layers)
    split = {"train": np.array([0]), "val": np.array([1]), "test": np.array([2])}
    save_checkpoint(run / "best_checkpoint.pth", build_predictor(cfg), cfg, split, {"dir": str(scene.T)}, {}, {})
    (run / "results.json").write_text('{"best": {}}')
    shutil.copy(run / "best_checkpoint.pth", alone / "model.pth")
    shutil.copy(run / "best_checkpoint.json", alone / "model.json")
    (scene.root / "notes.json").write_text("not json\n")
    (scene.root / "figure.png").write_text("a text, not a figure\n")
    (scene.root / "old.json").write_text("{}")
    (scene.root / "link.json").symlink_to(scene.root / "old.json")
    (scene.root / "dangling.json").symlink_to(scene.root / "nowhere.json")
    return {"manifest": scene.T / MANIFEST, "shard": scene.T / "shard_00001.safetensors",
            "checkpoint": run / "best_checkpoint.pth", "sidecar": run / "best_checkpoint.json",
            "results": run / "results.json", "checkpoint alone": alone / "model.pth",
            "sidecar alone": alone / "model.json", "text": scene.root / "notes.json",
            "text as png": scene.root / "figure.png", "link": scene.root / "link.json",
            "dangling link": scene.root / "dangling.json"}


NON_REPORTS = ["manifest", "shard", "checkpoint", "sidecar", "results", "checkpoint alone", "sidecar alone", "text",
               "text as png", "link", "dangling link"]


@pytest.mark.parametrize("target", NON_REPORTS)
def test_a_report_flag_never_replaces_what_is_not_an_earlier_report(scene, scripts, target):
    """`--json` on a trace set's manifest, a checkpoint or a prompts file replaced it without a word (the next run
    on that set failed, the checkpoint was gone); a link was replaced by a file. Every report flag of every
    script refuses them, one line, before any work, and leaves every file as it was."""
    dest = plant_non_reports(scene)[target]
    scene.freeze()
    for script, argv, flag, kind in destination_cases(scene):
        if kind != "file" or (target == "text as png" and flag != "--plot"):
            continue
        code, err = scene.run(scripts, script, *argv, flag, dest)
        assert_refused(code, err, script, flag, str(dest))
        scene.assert_untouched()
        assert not (scene.root.parent / "v").exists() and not (scene.root.parent / "s").exists()


def test_an_earlier_report_is_replaced_and_the_rules_by_hand(tmp_path):
    """The refusals' reasons, and what stays replaceable: an earlier JSON report or figure, a .json of any JSON
    (a report of another script), a file of another name beside a trace set or in a training run's folder."""
    from common.paths import not_a_report

    (tmp_path / "old.json").write_text('{"rows": []}')
    (tmp_path / "old.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "T").mkdir()
    (tmp_path / "T" / MANIFEST).write_text(json.dumps({"format_version": 2,
                                                       "shards": [{"file": "shard_00000.safetensors"}]}))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / MANIFEST).write_text('{"rows": []}')  # a report that happens to be named so
    (tmp_path / "T" / "shard_00000.safetensors").write_bytes(b"x")
    (tmp_path / "T" / "prefetch.json").write_text("{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best_checkpoint.pth").write_bytes(b"PK\x03\x04")
    (tmp_path / "run" / "coverage_metrics.json").write_text("{}")
    (tmp_path / "results.json").write_text("{}")  # a report that happens to share a training run's file name
    for ok in ("old.json", "old.png", "T/prefetch.json", "run/coverage_metrics.json", "results.json",
               "elsewhere/" + MANIFEST):
        assert not_a_report(tmp_path / ok, "--plot" if ok.endswith(".png") else "--json") is None, ok
    says = {"T/" + MANIFEST: "is a file of the trace set in", "T/shard_00000.safetensors": "is a file of the trace set",
            "run/best_checkpoint.pth": "is a file of the training run in"}
    for name, why in says.items():
        assert why in not_a_report(tmp_path / name, "--json"), name
    (tmp_path / "x.pth").write_bytes(b"PK\x03\x04rest")
    (tmp_path / "side.json").write_text('{"format": "expert-predictor/7"}')
    (tmp_path / "notes.txt").write_text("hello")
    assert "archive" in not_a_report(tmp_path / "x.pth", "--json")
    assert "checkpoint's description" in not_a_report(tmp_path / "side.json", "--stats-json")
    assert "does not hold JSON" in not_a_report(tmp_path / "notes.txt", "--json")
    assert "not an image" in not_a_report(tmp_path / "old.json", "--plot")
    assert "not a regular file" in not_a_report(tmp_path / "T", "--json")


@pytest.mark.parametrize("trainer", TRAINERS)
def test_an_unwritable_checkpoint_folder_is_refused_before_training(tiny_traces, tmp_path, capsys, monkeypatch,
                                                                    trainer):
    """Training found an unwritable --output only when it saved, after the training. (Permissions are mimicked:
    these tests may run as root, whom no mode stops.)"""
    import importlib

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == locked else real(p, mode, **k))
    proc = run_main(capsys, trainer, importlib.import_module(f"scripts.{trainer}").main, "--traces", tiny_traces,
                    "--epochs", "1", "--device", "cpu", "--output", locked / "ck", "--no-verify")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"--output {locked / 'ck'} cannot be created: {locked} is not writable" in proc.stderr
    assert "epoch" not in proc.stdout and not (locked / "ck").exists()


# ----------------------------------------------------------------------------------------------
# finite values: NaN and infinities where they would change a result without a word


def plant_nan_hidden(directory: Path, shard: int, layer: int, token: int) -> None:
    """hidden[layer, token, 0] of a lossless float32 shard set to NaN, its checksum in the manifest updated."""
    name = f"shard_{shard:05d}.safetensors"
    f = SafetensorsFile(directory / name)
    dt, shape, begin, _ = f.entries["hidden"]
    assert dt == "F32"
    at = f.data_start + begin + (layer * shape[1] + token) * shape[2] * 4
    f.close()
    plant_bytes(directory, name, at, struct.pack("<f", float("nan")))


def test_nan_hidden_states_with_a_valid_checksum_are_refused_naming_shard_and_layer(scene, scripts):
    """They silently changed router-reuse recall@4 from 0.679 to 0.566, and training blamed --lr."""
    plant_nan_hidden(scene.T, shard=1, layer=2, token=5)
    scene.freeze()
    says = (f"{scene.T / 'shard_00001.safetensors'}: hidden of MoE layer 2 hold NaN or infinite values",
            "--no-verify skips this check")
    v = scene.root.parent / "v"
    code, err = scene.run(scripts, "validate_coverage_analysis", "--traces", scene.T, "--model-type", "router-reuse",
                          "--lookahead", "1", "--output-dir", v, "--device", "cpu", "--split", "train")
    assert_refused(code, err, "validate_coverage_analysis", *says)
    code, err = scene.run(scripts, "train_simple_predictor", "--traces", scene.T, "--epochs", "1", "--device", "cpu",
                          "--output", scene.root.parent / "ck")
    assert_refused(code, err, "train_simple_predictor", *says)
    code, err = scene.run(scripts, "transcode_traces", "--traces", scene.T, "--hidden-format", "hadamard-3.5bit",
                          "--output", scene.root.parent / "tc", "--device", "cpu")
    assert_refused(code, err, "transcode_traces", *says)
    scene.assert_untouched()
    assert not (scene.root.parent / "ck").exists() and not (scene.root.parent / "tc").exists()
    code, err = scene.run(scripts, "validate_coverage_analysis", "--traces", scene.T, "--model-type", "router-reuse",
                          "--lookahead", "1", "--output-dir", v, "--device", "cpu", "--split", "train", "--no-verify")
    assert code == 0 and "--no-verify: checksums and the check for NaN or infinite hidden states are skipped" in err, err


SIMULATE_FLAGS = [("--gpu-gib", "1e300"), ("--gpu-gib", "nan"), ("--gpu-gib", "inf"), ("--gpu-gib", "-1"),
                  ("--link-gbps", "nan"), ("--link-gbps", "0"), ("--link-gbps", "1e-310"), ("--link-gbps", "inf"),
                  ("--link-gbps", "-5"),
                  ("--pre-ms", "nan"), ("--shared-ms", "-1"), ("--expert-ms", "inf"), ("--token-ms", "1e300"),
                  ("--layer-ms", "0"), ("--layer-ms", "nan"), ("--layer-ms", "1e-310"), ("--cpu-expert-ms", "1e-310"),
                  ("--prefill-tflops", "1e-310"), ("--predictor-ms", "nan"), ("--locality", "nan"),
                  ("--locality", "2"), ("--seed", "-1"), ("--max-tokens", "0"), ("--warmup-tokens", "-1"),
                  ("--warmup-tokens", "1000000000")]


@pytest.mark.parametrize("flag,value", SIMULATE_FLAGS)
def test_simulate_refuses_cost_flags_that_are_not_finite_numbers_in_range(scene, scripts, flag, value):
    scene.freeze()
    out = scene.root.parent / "s"
    code, err = scene.run(scripts, "simulate_prefetch", "--traces", scene.T, "--policies", "on-demand,oracle",
                          "--cache-experts", "8", "--output-dir", out, flag, value)
    assert_refused(code, err, "simulate_prefetch", flag)
    scene.assert_untouched()
    assert not out.exists()


def test_json_is_never_written_with_nan_or_infinity(tmp_path):
    from common.atomic import atomic_write_json

    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(UserError, match="NaN or infinite"):
            atomic_write_json(tmp_path / "r.json", {"rows": [{"stall_ms": bad}]})
        assert list(tmp_path.iterdir()) == []
    atomic_write_json(tmp_path / "r.json", {"rows": [{"stall_ms": None}]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"rows": [{"stall_ms": None}]}


NUMBER_FLAGS = {  # (script, flag): the range it takes, for the fuzz below
    ("simulate_prefetch", "--gpu-gib"): (0, 2**20), ("simulate_prefetch", "--link-gbps"): (1e-3, 1e5),
    ("simulate_prefetch", "--pre-ms"): (0, 1e6), ("simulate_prefetch", "--expert-ms"): (0, 1e6),
    ("simulate_prefetch", "--locality"): (0, 1), ("train_anchored_predictor", "--lr"): (1e-12, float("inf")),
    ("train_anchored_predictor", "--dropout"): (0, 1), ("train_anchored_predictor", "--weight-decay"):
    (0, float("inf")), ("compare_traces", "--weights-atol"): (0, 1e6), ("compare_traces", "--hidden-rtol"): (0, 1e6)}
INT_FLAGS = {("train_anchored_predictor", "--hidden-dim"): (1, 16384), ("train_anchored_predictor", "--window"): (0, 64),
             ("train_anchored_predictor", "--context"): (0, 4096), ("simulate_prefetch", "--seed"): (0, 2**63 - 1),
             ("train_anchored_predictor", "--seed"): (0, 2**63 - 1)}


def outside(low: float, high: float) -> st.SearchStrategy[str]:
    """A float outside [low, high] (NaN and infinities included), as a user would type it."""
    return st.one_of(st.sampled_from([float("nan"), float("inf"), -float("inf")]),
                     st.floats(max_value=low, exclude_max=True, allow_nan=False, allow_infinity=False),
                     st.floats(min_value=high, exclude_min=True, allow_nan=False) if high < float("inf")
                     else st.nothing()).map(repr)


def flag_argv(scene: Scene, script: str) -> list:
    return {"simulate_prefetch": ["--traces", scene.T, "--policies", "on-demand", "--cache-experts", "8",
                                  "--output-dir", scene.root.parent / "s"],
            "train_anchored_predictor": ["--traces", scene.T, "--epochs", "1", "--device", "cpu",
                                         "--output", scene.root.parent / "ck"],
            "compare_traces": [scene.T, scene.T, "--json", scene.root.parent / "c.json"]}[script]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_numbers_out_of_range_are_refused_naming_the_flag(scene, scripts, data):
    if data.draw(st.booleans()):
        script, flag = data.draw(st.sampled_from(sorted(NUMBER_FLAGS)))
        value = data.draw(outside(*NUMBER_FLAGS[script, flag]))
    else:
        script, flag = data.draw(st.sampled_from(sorted(INT_FLAGS)))
        low, high = INT_FLAGS[script, flag]
        value = str(data.draw(st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1))))
    scene.freeze()
    code, err = scene.run(scripts, script, *flag_argv(scene, script), f"{flag}={value}")  # "=": "-inf" is a value
    assert_refused(code, err, script, flag)
    scene.assert_untouched()


# ----------------------------------------------------------------------------------------------
# the rest of the review's list


def test_an_unlisted_router_weights_file_beside_a_legacy_import_is_the_users(legacy, tmp_path, capsys):
    """import --overwrite deleted router_weights.safetensors beside a legacy-import set, which lists none."""
    from scripts.import_specmoe_shards import main
    from tests.test_legacy_import import L

    src, _ = legacy
    out = tmp_path / "traces"
    main(["--input", str(src), "--output", str(out), "--num-layers", str(L)])
    (out / ROUTER_WEIGHTS).write_bytes(b"the user's own router weights")
    assert run_main(capsys, "import_specmoe_shards", main, "--input", src, "--output", out, "--num-layers", L,
                    "--overwrite").returncode == 0
    assert (out / ROUTER_WEIGHTS).read_bytes() == b"the user's own router weights"
    assert TraceSet(out).manifest.complete


def test_token_ids_outside_the_vocabulary_are_refused_before_training(scene, scripts, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 10}))
    set_field(scene.T, ("model", "name_or_path"), str(model))
    scene.freeze()
    code, err = scene.run(scripts, "train_anchored_predictor", "--traces", scene.T, "--epochs", "1", "--device", "cpu",
                          "--output", scene.root.parent / "ck")
    assert_refused(code, err, "train_anchored_predictor", f"--traces {scene.T}", "outside the predictor's table of 10")
    (model / "config.json").write_text(json.dumps({"vocab_size": 10**12}))
    code, err = scene.run(scripts, "train_anchored_predictor", "--traces", scene.T, "--epochs", "1", "--device", "cpu",
                          "--output", scene.root.parent / "ck")
    assert_refused(code, err, "train_anchored_predictor", "vocab_size 1000000000000")
    scene.assert_untouched()


def test_a_malformed_csv_source_is_one_line(scripts, tmp_path):
    (tmp_path / "bad.csv").write_text('text,b\n"unterminated,1\nfoo,2,3,4\n')
    code, err = scripts.run("collect_traces", [*C, "--datasets", f"csv:{tmp_path / 'bad.csv'}", "--output",
                                               tmp_path / "o"], tmp_path / "err")
    assert_refused(code, err, "collect_traces", f"csv:{tmp_path / 'bad.csv'}", "cannot be read")
    assert not (tmp_path / "o").exists()


def test_null_texts_are_skipped_and_counted_never_collected_as_none(tmp_path):
    from collection.sources import null_key, parse_sources, sample_balanced

    real = ["first real text of the file", "second real text of the file"]
    rows = [{"text": None}, {"text": real[0]}, {"text": None}, {"text": real[1]}, {"text": None}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts, skipped = sample_balanced(parse_sources(f"jsonl:{tmp_path / 'd.jsonl'}"), 2, 0, min_chars=0)
    assert sorted(t for _, t in texts) == real
    assert skipped == {"d": 0, null_key("d"): 3}
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(UserError, match="field 'text' holds a int"):
        sample_balanced(parse_sources(f"jsonl:{tmp_path / 'e.jsonl'}"), 1, 0, min_chars=0)


def test_a_reversed_layer_range_is_refused(scripts, tmp_path):
    code, err = scripts.run("collect_traces", [*C, "--hidden-layers", "3-1", "--output", tmp_path / "o"],
                            tmp_path / "err")
    assert_refused(code, err, "collect_traces", "--hidden-layers '3-1'", "runs backwards")
    assert not (tmp_path / "o").exists()


def test_transcode_overwrite_names_the_real_destination(tiny_traces, tiny_pca_traces, tmp_path, capsys):
    from scripts.transcode_traces import main

    out = tmp_path / "t"
    shutil.copytree(tiny_traces, out)
    proc = run_main(capsys, "transcode_traces", main, "--traces", tiny_pca_traces, "--hidden-format", "lossless",
                    "--hidden-dtype", "bfloat16", "--output", out, "--overwrite", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert f"wrote 3 shards to {out}:" in last and STAGING not in last
    assert "hidden_codec" not in TraceSet(out).manifest.capture  # a lossless copy of a fitted set lists no codec


def test_the_manifest_read_through_its_descriptor_refuses_a_fifo(scene, scripts):
    """A FIFO planted as manifest.json would hang a plain open() forever."""
    (scene.T / MANIFEST).unlink()
    os.mkfifo(scene.T / MANIFEST)
    code, err = scene.run(scripts, "validate_coverage_analysis", "--traces", scene.T, "--model-type", "random",
                          "--output-dir", scene.root.parent / "v", "--device", "cpu")
    assert_refused(code, err, "validate_coverage_analysis", str(scene.T / MANIFEST), "not a regular file")


def test_deeply_nested_json_in_a_manifest_is_one_line(scene, scripts):
    (scene.T / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    code, err = scene.run(scripts, "validate_coverage_analysis", "--traces", scene.T, "--model-type", "random",
                          "--output-dir", scene.root.parent / "v", "--device", "cpu")
    assert_refused(code, err, "validate_coverage_analysis", str(scene.T / MANIFEST), "unreadable manifest")


def test_a_trace_format_error_is_what_readers_raise_for_a_bad_name(tiny_traces, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_traces, d)
    set_field(d, ("shards", 0, "file"), "../x")
    with pytest.raises(TraceFormatError, match=r"shards\[0\].file '../x' contains '/'"):
        TraceSet(d)
