"""The command line: in this process (the `cli` fixture), and once as a real process."""

import json
import os
import subprocess
import sys

import pytest


def test_the_entry_point_is_one_line_and_nonzero_in_a_process_of_its_own():
    proc = subprocess.run([sys.executable, "-m", "caploc", "locate", "--k", "0"], capture_output=True, text=True,
                          timeout=600, env=os.environ.copy())
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --k must be positive (or auto)", proc.stderr


@pytest.mark.parametrize("args, message", [
    (["eval", "--ablate", "L99H3"], "head L99H3 does not exist: this model has layers L0..L29"),
    (["eval", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["eval", "--model", "/nowhere/model.gguf"], "GGUF file not found"),
    (["eval", "--task", "gsm8k", "--data", "/nowhere/gsm8k.jsonl"], "dataset file not found"),
    (["eval", "--task", "no_such_task"], "unknown task 'no_such_task'"),
    (["eval", "--task", "humaneval", "--no-code-execution"], "runs model-written code"),
    (["specificity", "--from", "/nowhere/run"], "run directory not found"),
    (["specificity", "--heads", "L0H0", "--data", "mmlu"], "--data takes TASK=VALUE"),
    (["report", "/nowhere/run"], "run directory not found"),
    (["compare", "/nowhere/a", "/nowhere/b"], "run directory not found"),
    (["export", "--ablate", "L0H99", "--out", "/tmp/caploc-never-written"], "head L0H99 does not exist"),
    (["neurons", "--task", "rhyme", "--n", "2"], "CNL needs a known answer"),
    (["compress", "--target", "1.5", "--n", "2"], "--target must be a fraction"),
    (["locate", "--method", "atp", "--masks", "20"], "method atp does not take --masks"),
    (["locate", "--method", "nope"], "unknown --method 'nope'"),
    (["locate", "--seeds", "0,x"], "--seeds: not a comma-separated list of integers"),
    (["locate", "--task", "induction", "--task-arg", "length=1"], "--task-arg length must be between 2 and"),
    # the library names its parameters; the CLI says which flag sets them
    (["locate", "--k", "0"], "--k must be positive"),
    (["locate", "--method", "css", "--sparsity", "2"], "--sparsity must be between 0 and 1"),
    (["eval", "--task", "humaneval"], "enable it with --allow-code-execution"),
    (["universal", "--tasks", "general", "--min-tasks", "3"], "--min-tasks must be between 1 and 1"),
])
def test_bad_input_is_one_line_and_nonzero(smollm, cli, args, message):
    # smollm: the dequantized cache is warm, so the one-time "dequantizing" note is not in stderr
    proc = cli(*args)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_corrupt_gguf_is_one_line(cli, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    proc = cli("eval", "--model", str(bad))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read GGUF file")


def test_corrupt_run_file_is_one_line(cli, tmp_path):
    (tmp_path / "result.json").write_text('{"heads": [1, 2')
    for command in (["report", str(tmp_path)], ["specificity", "--from", str(tmp_path)]):
        proc = cli(*command)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'result.json'} is corrupt "
                                                    f"(not valid JSON: Expecting ',' delimiter: line 1 column 16 "
                                                    f"(char 15))"], proc.stderr


@pytest.mark.parametrize("command", [[], ["eval"], ["heads"], ["locate"], ["specificity"], ["universal"],
                                     ["compare"], ["report"], ["export"], ["neurons"], ["density"], ["compress"],
                                     ["doctor"], ["tasks"], ["methods"]])
def test_help_on_every_command(cli, command):
    proc = cli(*command, "--help")
    assert proc.returncode == 0 and "Usage" in proc.stdout


def test_locate_help_has_every_registered_method_parameter_once(cli):
    from caploc.methods import METHODS

    text = cli("locate", "--help").stdout
    for name, (declared, owners) in METHODS.parameters().items():
        if name != "seed":
            flag = declared.flag.split("/")[0]  # a switch shows as --on / --off
            assert text.count(f"{flag} ") + text.count(f"{flag}\n") >= 1, flag
    for flag in ("--model", "--dtype", "--task", "--subtask", "--n", "--seed", "--control", "--penalty", "--bootstrap",
                 "--seeds", "--mode", "--store", "--masks", "--candidates", "--exchange"):
        assert f"{flag} " in text, flag


def test_tasks_and_methods_list_the_registries(cli):
    tasks = cli("tasks").stdout
    assert "induction" in tasks and "--task-arg length=" in tasks and "gsm8k" in tasks
    methods = cli("methods").stdout
    assert "refine" in methods and "--candidates" in methods and "css" in methods


@pytest.mark.slow
def test_heads_lists_kv_groups(cli):
    proc = cli("heads", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert len(info["heads"]) == 270
    assert info["heads"][5] == {"head": "L0H5", "layer": 0, "index": 5, "kv_group": 1}


@pytest.mark.slow
def test_eval_layer0_ablation_shows_large_drop(cli, tmp_path):
    out = tmp_path / "eval.json"
    proc = cli("eval", "--subtask", "2D+", "--n", "50", "--ablate",
               ",".join(f"L0H{h}" for h in range(9)), "--json-file", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    acc = report["metrics"]["acc"]
    assert acc["baseline"] >= 0.1 and acc["relative_drop"] >= 0.5
    assert acc["baseline_low"] <= acc["baseline"] <= acc["baseline_high"]
    assert acc["drop_low"] > 0  # the paired interval excludes no effect
    assert "relative drop" in proc.stdout


@pytest.mark.slow
def test_locate_on_embedded_model_writes_result(cli, tmp_path):
    out = tmp_path / "run"
    # csb with the paper's plain objective (the default method is `refine` with a control since issue 10)
    proc = cli("locate", "--method", "csb", "--control", "none", "--subtask", "2D+", "--n", "12", "--n-validate",
               "12", "--masks", "24", "--k", "3", "--seeds", "0,1", "--store", str(tmp_path / "evals.sqlite"),
               "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert [h["rank"] for h in result["heads"]] == [1, 2, 3]
    assert all(h["head"].startswith("L") for h in result["heads"])
    assert len(result["head_scores"]) == 270 and len(result["ranking"]) == 270
    assert result["method"]["name"] == "csb" and result["method"]["seed"] == 0
    assert result["budget"]["evaluations"] == 24 and result["budget"]["wall_seconds"] > 0
    assert len(result["validation"]["acc"]) == 3
    # the default Bernoulli design at p=0.05: about 24 x 0.05 = 1.2 ablations per head
    coverage = result["details"]["coverage"]
    assert 0 <= coverage["min_ablations_per_head"] <= coverage["max_ablations_per_head"]
    assert 5 <= coverage["mean_heads_per_mask"] <= 25
    assert "drop on held-out items" in proc.stdout
    # each seed's set scored on both seeds' items, printed as a table
    cross = result["stability"]["cross_seed"]
    assert len(cross["criterion"]) == 2 and all(len(row) == 2 for row in cross["criterion"])
    assert cross["beats_own"][0][0] is None and 0 <= cross["beats_own"][0][1] <= 1
    assert cross["best_seed"] in (0, 1) and "each seed's set scored on each seed's items" in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_missing_device_is_one_line(cli):
    proc = cli("eval", "--device", "cuda", "--n", "2")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --device cuda is not available here"), proc.stderr
    from caploc import ParameterError, load_model

    with pytest.raises(ParameterError, match="^device cuda:3 is not available here"):
        load_model("smollm2-135m", device="cuda:3")
    proc = cli("heads", "--device", "tpu")
    assert proc.returncode == 2 and "unknown --device 'tpu'" in proc.stderr
