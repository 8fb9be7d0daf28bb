"""The evaluation store under several processes at once, killed writers, a full disk, a read-only store and
files that are not stores: every run finishes or says in one line what happened, and nothing stored is lost."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from caploc import CaplocError, Criterion, EvalOptions, LocateOptions, TaskSpec, load_model, locate, make_method
from caploc import store as store_module
from caploc.masks import mask_key
from caploc.store import EvalStore, StoreError
from tiny import build, byte_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model saved as a checkpoint directory, for processes of their own."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    build("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _record(n):
    return {"scores": {"acc": [float(i % 2) for i in range(n)], "logprob": [-float(i) for i in range(n)]}}


def test_processes_that_locate_at_once_on_one_store_all_finish_with_what_they_find_alone(model_dir, tmp_path):
    store = tmp_path / "shared.sqlite"
    seeds = [0, 1, 2, 3]
    args = ["--model", str(model_dir), "--dtype", "float32", "--task", "arithmetic", "--subtask", "2D+", "--shots", "1", "--n", "6",
            "--n-validate", "4", "--n-control", "3", "--k", "2", "--candidates", "4", "--bootstrap", "10",
            "--store", str(store), "--quiet", "--json"]
    procs = [subprocess.Popen([sys.executable, "-m", "caploc", "locate", *args, "--seed", str(s)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in seeds]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    lm = load_model(str(model_dir), dtype="float32")
    for seed, shared in zip(seeds, results):
        alone = locate(lm, TaskSpec("arithmetic", subtask="2D+", shots=1, n=6, n_validate=4, seed=seed),
                       make_method("refine", n_candidates=4), k=2, criterion=Criterion(n_control=3),
                       options=LocateOptions(bootstrap=10), evaluation=EvalOptions(store=False))
        # as JSON: a head whose single-head criterion was never measured has a NaN score (NaN != NaN)
        assert shared["ranking"] == alone.ranking
        assert json.dumps(shared["heads"], sort_keys=True) == json.dumps(alone.to_dict()["heads"], sort_keys=True)
        assert shared["validation"] == json.loads(json.dumps(alone.validation, default=float))
    assert EvalStore(store).count() > 0


def test_a_writer_killed_mid_transaction_leaves_a_store_the_next_run_reads(tmp_path):
    path = tmp_path / "s.sqlite"
    store = EvalStore(path)
    store.put({"k": 1}, mask_key(np.zeros(4, bool)), 0, _record(3))
    writer = textwrap.dedent(f"""
        import sqlite3, sys, time
        db = sqlite3.connect({str(path)!r}, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO evaluations (context, mask, n_ablated, record) VALUES ('c', 'm', 1, '{{}}')")
        print("writing", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = EvalStore(path)  # a new process's view: the uncommitted row is gone, the committed one is there
    assert again.count() == 1
    assert again.get({"k": 1}, mask_key(np.zeros(4, bool))) == _record(3)
    again.put({"k": 1}, mask_key(np.ones(4, bool)), 4, _record(3))
    assert EvalStore(path).count() == 2


def test_a_store_locked_past_the_timeout_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    EvalStore(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT", 0.05)
    monkeypatch.setattr(store_module, "RETRY_FOR", 0.3)
    started = time.monotonic()
    with pytest.raises(StoreError) as error:
        EvalStore(path).put({"k": 1}, mask_key(np.zeros(4, bool)), 0, _record(2))
    assert time.monotonic() - started < 10
    assert str(error.value) == (f"evaluation store {path} stayed locked by another process for more than 0 s; what "
                                f"was stored is kept, rerun to continue")
    holder.rollback()


def test_files_that_are_not_stores_and_newer_stores_are_one_line(tmp_path):
    foreign = tmp_path / "notes.sqlite"
    foreign.write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match=r"^evaluation store .*notes.sqlite is not a caploc store \(not a SQLite "
                                         r"database\): give --store another path$"):
        EvalStore(foreign)
    newer = tmp_path / "newer.sqlite"
    db = sqlite3.connect(newer)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match=r"was written by a newer caploc \(store schema 99, this caploc reads up to "
                                         r"\d+\): upgrade caploc or use another store$"):
        EvalStore(newer)
    assert isinstance(StoreError("x"), CaplocError)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    mount = tmp_path / "fs"
    if not _mount_tmpfs(mount, "1m"):
        pytest.skip("needs root and tmpfs mounts (CI runs as root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_what_was_stored_is_intact(small_fs):
    path = small_fs / "s.sqlite"
    store = EvalStore(path)
    written = 0
    with pytest.raises(StoreError) as error:
        for i in range(100_000):
            row = np.zeros(64, bool)
            row[i % 64] = True
            store.put({"context": i // 64}, mask_key(row), 1, _record(200))
            written += 1
    assert str(error.value).startswith(f"evaluation store {path}: the disk is full; what was stored before is kept")
    assert written > 10
    first = np.zeros(64, bool)
    first[0] = True
    for reader in (store, EvalStore(path)):  # the writer's own connection, and a new one
        assert reader.get({"context": 0}, mask_key(first)) == _record(200)
        assert reader.count() == written


def test_a_read_only_store_is_one_line(small_fs):
    path = small_fs / "s.sqlite"
    store = EvalStore(path)
    store.put({"k": 1}, mask_key(np.zeros(4, bool)), 0, _record(2))
    store.close()
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True).returncode == 0
    with pytest.raises(StoreError, match=r"is read-only or cannot be opened for writing: give --store a writable path"):
        EvalStore(path).put({"k": 1}, mask_key(np.ones(4, bool)), 4, _record(2))
