"""A method and a task defined only in a test module (`plugin_example`) appear in the command line's help and
run through `locate`, from the Python API and from the command line in a process of its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import plugin_example  # noqa: F401 - registers late-sweep and echo
from caploc import Criterion, EvalOptions, LocateOptions, TaskSpec, locate, make_method, wrap_model
from tiny import build, byte_tokenizer

TESTS = Path(__file__).parent


def test_a_registered_method_and_task_are_in_the_help(cli):
    text = " ".join(cli("locate", "--help").stdout.split())  # help is wrapped to the terminal
    assert "--last-layers" in text and "late-sweep: how many of the last layers to sweep" in text
    assert "echo" in text.split("--task", 1)[1].split("--subtask", 1)[0]
    assert "late-sweep" in cli("methods").stdout and "--task-arg words=" in cli("tasks").stdout


def test_every_registered_name_is_described_by_its_own_docstring_not_a_base_class_one():
    # `caploc tasks` once showed Task's "Base class. Subclasses derive..." for 21 tasks without a docstring
    from caploc.methods.base import METHODS
    from caploc.params import Entry
    from caploc.tasks import TASKS, TargetTask

    for registry in (TASKS, METHODS):
        for name, entry in registry.items():
            own = " ".join((entry.cls.__dict__.get("__doc__") or "").split())
            assert entry.summary and " ".join(entry.summary.split()) in own, name
            assert "Base class" not in entry.summary, name
    assert Entry("bare", type("Bare", (TargetTask,), {})).summary == ""  # no docstring: nothing inherited


def test_they_run_through_locate_from_the_api():
    lm = wrap_model(build("llama"), byte_tokenizer(), spec="tiny-llama")
    run = locate(lm, TaskSpec("echo", n=4, options={"words": "3"}), make_method("late-sweep", last_layers=1), k=2,
                 criterion=Criterion(control="none"), options=LocateOptions(bootstrap=3),
                 evaluation=EvalOptions(store=False))
    assert run.method == {"name": "late-sweep", "last_layers": 1}
    last = {f"L{lm.layout.n_layers - 1}H{h}" for h in range(lm.layout.n_heads)}
    assert set(run.top_heads(2)) <= last and run.task["words"] == 3 and run.task_options == {"words": 3}


def test_they_run_through_locate_from_the_command_line(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    build("llama").save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    env = os.environ | {"CAPLOC_PLUGINS": "plugin_example",
                        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "caploc", "locate", "--model", str(model_dir), "--task", "echo",
                           "--task-arg", "words=3", "--method", "late-sweep", "--last-layers", "1", "--n", "4",
                           "--k", "2", "--control", "none", "--store", str(tmp_path / "s.sqlite"),
                           "--out", str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["method"] == {"name": "late-sweep", "last_layers": 1} and result["task"]["task"] == "echo"
    unknown = subprocess.run([sys.executable, "-m", "caploc", "locate", "--method", "late-sweep"],
                             capture_output=True, text=True, env=os.environ | {"CAPLOC_PLUGINS": "no_such_plugin"},
                             timeout=600)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: plugin no_such_plugin (from $CAPLOC_PLUGINS)")
