"""Background commits: every shard fsynced, hashed and renamed, the callbacks in submission order, errors
raised to the caller, and nothing committed after a failure."""
import threading
import time

import numpy as np
import pytest

import collection.traces.durable as durable
from collection.traces.durable import HashProcesses, OpenAhead, ShardCommitter, sha256_of
from collection.traces.format import SafetensorsFile, ShardWriter, TensorSpec
from common.atomic import sha256_file


def filled_writer(path, value, n=50_000):
    w = ShardWriter(path, {"x": TensorSpec("int32", (n,))}, writeback=True)
    w.write("x", np.full(n, value, dtype=np.int32))
    return w


def test_commits_in_order_with_the_right_hashes(tmp_path):
    committer = ShardCommitter(max_pending=2, hash_threads=2)
    done = []
    for i in range(6):
        w = filled_writer(tmp_path / f"s{i}.safetensors", i, n=50_000 * (6 - i))  # later shards hash faster
        committer.submit(*w.hand_off(), lambda nbytes, sha, i=i: done.append((i, nbytes, sha)))
    committer.join()
    committer.close()
    assert [i for i, _, _ in done] == list(range(6))  # the manifest order, whatever finished first
    for i, nbytes, sha in done:
        path = tmp_path / f"s{i}.safetensors"
        assert path.stat().st_size == nbytes and sha256_file(path) == sha == sha256_of(path)
        assert int(SafetensorsFile(path).numpy("x")[0]) == i
    assert not list(tmp_path.glob("*.partial"))


def test_submit_waits_when_max_pending_commits_are_unfinished(tmp_path):
    committer = ShardCommitter(max_pending=1, hash_threads=1)
    gate, events = threading.Event(), []

    def first_done(n, s):
        gate.wait(60)
        events.append("first commit finished")
    committer.submit(*filled_writer(tmp_path / "a.safetensors", 1).hand_off(), first_done)
    threading.Timer(0.3, gate.set).start()
    committer.submit(*filled_writer(tmp_path / "b.safetensors", 2).hand_off(), lambda n, s: None)
    events.append("second submit returned")
    assert events == ["first commit finished", "second submit returned"]  # blocked until the first commit finished
    committer.join()
    committer.close()


def test_a_failed_commit_is_raised_and_stops_later_ones(tmp_path):
    committer = ShardCommitter(max_pending=3)
    done = []

    def boom(nbytes, sha):
        raise OSError("disk full")
    committer.submit(*filled_writer(tmp_path / "a.safetensors", 1).hand_off(), lambda n, s: done.append("a"))
    committer.submit(*filled_writer(tmp_path / "b.safetensors", 2).hand_off(), boom)
    committer.submit(*filled_writer(tmp_path / "c.safetensors", 3).hand_off(), lambda n, s: done.append("c"))
    with pytest.raises(OSError, match="disk full"):
        committer.join()
    committer.close()
    assert done == ["a"]
    assert (tmp_path / "a.safetensors").exists() and not (tmp_path / "c.safetensors").exists()


def test_open_ahead_opens_one_key_early_in_order_and_lists_everything_it_opened():
    calls = []
    gate = threading.Event()

    def open_one(key):
        if key == 2:
            gate.wait(5)  # the third open is held back: take() of key 1 must not wait for it
        calls.append(key)
        return f"w{key}"

    ahead = OpenAhead(open_one, [0, 1, 2])
    assert ahead.take() == "w0"
    assert ahead.take() == "w1"  # opened while w0 was in use
    assert not gate.is_set() and 2 not in calls  # returned while key 2's open is still held back
    time.sleep(0.05)
    assert calls == [0, 1]  # key 2 is being opened (one ahead), not yet done
    gate.set()
    assert ahead.take() == "w2"
    with pytest.raises(StopIteration):
        ahead.take()
    ahead.close()
    assert calls == [0, 1, 2] and ahead.opened == ["w0", "w1", "w2"]


def test_open_ahead_raises_an_open_error_at_the_take_that_needed_it_and_keeps_what_it_opened():
    def open_one(key):
        if key == 1:
            raise OSError(28, "No space left on device")
        return f"w{key}"

    ahead = OpenAhead(open_one, [0, 1, 2])
    assert ahead.take() == "w0"
    with pytest.raises(OSError):
        ahead.take()
    ahead.close()
    assert ahead.opened == ["w0"]  # what an aborting caller must remove


def test_helper_processes_hash_like_hashlib_and_report_errors(tmp_path):
    """Known answers: the helpers' digests are hashlib's, for an empty file, one of several 8 MiB chunks, and a name
    with a newline and non-ASCII letters; a missing file is the OSError it would be here."""
    import hashlib

    files = {"empty": b"", "big": np.random.default_rng(0).bytes((8 << 20) * 2 + 7), "odd\nnamé": b"abc"}
    hasher = HashProcesses(2)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert hasher.sha256(tmp_path / name) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError):
        hasher.sha256(tmp_path / "missing")
    assert hasher.sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()  # still answering after an error
    hasher.close()
    assert not hasher.procs


def test_a_helper_that_died_is_dropped_and_its_file_hashed_here(tmp_path):
    """A helper killed (by the out-of-memory killer, say) neither hangs the commit nor fails the collection: that
    file is hashed in this process, the helper is dropped, and the others carry on."""
    import hashlib

    (tmp_path / "f").write_bytes(b"x" * 100)
    want = hashlib.sha256(b"x" * 100).hexdigest()
    hasher = HashProcesses(2)
    first, second = hasher.procs
    first.kill()
    first.wait()
    got = [hasher.sha256(tmp_path / "f") for _ in range(3)]  # the dead one is met within the first two
    assert got == [want] * 3 and hasher.procs == [second] and second.poll() is None
    second.kill()
    second.wait()
    assert [hasher.sha256(tmp_path / "f") for _ in range(2)] == [want] * 2 and hasher.procs == []
    hasher.close()


def test_commits_hash_in_helper_processes_not_in_this_one(tmp_path, monkeypatch):
    """A hashing thread here takes the GIL from the thread that feeds the GPU: commits must not hash in-process."""
    monkeypatch.setattr(durable, "sha256_of", lambda *a, **k: pytest.fail("hashed in this process"))
    committer = ShardCommitter(max_pending=2, hash_threads=2)
    assert len(committer.hasher.procs) == 2
    done = []
    w = filled_writer(tmp_path / "s.safetensors", 7)
    committer.submit(*w.hand_off(), lambda nbytes, sha: done.append(sha))
    committer.join()
    committer.close()
    assert done == [sha256_file(tmp_path / "s.safetensors")]


def test_helpers_run_outside_the_terminals_process_group(tmp_path):
    """Ctrl-C reaches every process of the terminal's foreground group: the hashing processes, started outside that
    group, neither die mid-commit nor print a traceback; the collector handles it and closes them."""
    import os

    hasher = HashProcesses(2)
    for p in hasher.procs:
        assert os.getpgid(p.pid) != os.getpgid(0) and os.getsid(p.pid) == p.pid
    hasher.close()
