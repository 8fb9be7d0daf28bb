"""`kill -9` in the middle of `caploc locate`, then the same command again: nothing stored is recomputed."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import torch
import transformers as tf

from tiny import byte_tokenizer


def _stored(path):
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_kill_9_then_rerun_recomputes_nothing_stored(tmp_path):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=8, tie_word_embeddings=False)
    model_dir = tmp_path / "tiny-llama"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    store = tmp_path / "evals.sqlite"
    cmd = [sys.executable, "-m", "caploc.cli", "locate", "--model", str(model_dir), "--task", "arithmetic",
           "--subtask", "2D+", "--method", "1s-greedy", "--n", "120", "--n-validate", "10", "--k", "3",
           "--store", str(store), "--quiet"]
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "first")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while _stored(store) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = _stored(store)
    assert 4 <= stored < 1 + 64, f"run was not interrupted mid-way ({stored} stored)"

    out = tmp_path / "second"
    done = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    budget = json.loads((out / "result.json").read_text())["budget"]
    assert budget["reused_evaluations"] == stored
    assert budget["computed_evaluations"] == _stored(store) - stored  # each computed mask is a new row

    third = subprocess.run(cmd + ["--out", str(tmp_path / "third")], capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr
    again = json.loads((tmp_path / "third" / "result.json").read_text())
    assert again["budget"]["computed_evaluations"] == 0
    assert again["ranking"] == json.loads((out / "result.json").read_text())["ranking"]
