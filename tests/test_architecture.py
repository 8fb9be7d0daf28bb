"""The package's shape: imports point one way down the layers, nothing shadows a submodule, hooks never outlive
their scope, results are typed and versioned, and run directories of caploc 0.1 still load."""

import ast
import importlib
import json
import pkgutil
from pathlib import Path

import numpy as np
import pytest

import caploc
from caploc import CaplocError, ParameterError, wrap_model
from caploc.evaluator import Evaluator
from caploc.files import json_default
from caploc.experiments.results import (SCHEMA_VERSION, LocateResult, SpecificityResult, UniversalResult)
from tiny import build, byte_tokenizer

PACKAGE = Path(caploc.__file__).parent
FIXTURES = Path(__file__).parent / "fixtures"

# Lowest first. A module may import modules of its own layer or below, never above; "data flows model ->
# components -> masks -> evaluator -> methods -> experiments (results, store) -> api -> cli".
LAYERS = [
    {"errors"},
    {"files", "stats", "components", "params", "masks"},
    {"arch", "records", "sandbox", "store", "model_files"},
    {"models", "sites", "hooks", "tasks"},
    {"ablation"},
    {"evaluator"},
    {"methods"},
    {"experiments"},
    {"api", "lmeval", "plugins"},
    {"cli", "__init__", "__main__"},
]


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): path
            for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    parts = module.split(".")[1:] or ["__init__"]
    top = parts[0]
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    raise AssertionError(f"{module} is in no layer of the architecture test: add it to LAYERS")


def _imports(path: Path, module: str) -> set[str]:
    """caploc modules imported anywhere in the file (lazy imports inside functions included)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "caploc"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "caploc":
                continue
            for alias in node.names:  # `from caploc import api` imports the submodule caploc.api
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in _modules() else base)
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    if name in modules:
        return name
    return name + ".__init__" if name + ".__init__" in modules else name


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        graph[module] = {_resolve(target, modules) for target in _imports(path, module)} - {module}
        graph[module] = {t for t in graph[module] if t in modules}
    return graph


def test_imports_point_down_the_layers():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, targets in _graph().items() for b in targets
              if _layer(b) > _layer(a) and not b.endswith("__init__")]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ re-exporting its submodules is not a cycle of logic: ignore edges into __init__s
    graph = {m: {t for t in ts if not t.endswith("__init__")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_graph_test_can_fail(tmp_path, monkeypatch):
    # an upward import planted in a copy of a low module is reported
    fake = tmp_path / "errors.py"
    fake.write_text("from caploc.api import locate\n")
    assert "caploc.api" in _imports(fake, "caploc.errors")
    assert _layer("caploc.api") > _layer("caploc.errors")


def test_public_names_shadow_no_submodule():
    submodules = {m.name for m in pkgutil.iter_modules([str(PACKAGE)])}
    shadowed = [name for name in caploc.__all__ if name in submodules]
    assert not shadowed, shadowed
    # what the README promises
    from caploc import density, heads, neurons, report
    assert all(callable(f) for f in (neurons, density, heads, report))
    assert neurons.__module__ == "caploc.experiments.neurons"
    for name in submodules - {"__main__"}:  # every submodule still imports under its own name (not the entry point)
        try:
            importlib.import_module(f"caploc.{name}")
        except ImportError as exc:  # a module of an extra that is not installed (a GPU machine's own environment)
            assert "pip install 'caploc[" in str(exc), (name, exc)


def test_hooks_are_removed_when_an_evaluation_raises():
    model = build("llama")
    lm = wrap_model(model, byte_tokenizer(), spec="tiny")
    from caploc.tasks import get_task

    task = get_task("arithmetic", subtask="2D+", shots=1)
    evaluator = Evaluator(lm, task, task.items(3))
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        raise RuntimeError("boom in the middle of a forward pass")

    layer = model.model.layers[1]
    handle = layer.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            evaluator.evaluate([[0, 5], [3]])
    finally:
        handle.remove()
    assert calls["n"] == 1
    leftover = [name for name, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    assert not leftover, leftover
    # and the evaluator still works afterwards, with the ablation applied
    result = evaluator.evaluate([[], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert not np.array_equal(result.scores["logprob"][0], result.scores["logprob"][1])
    assert not [name for name, m in model.named_modules() if m._forward_pre_hooks]


def test_library_errors_name_parameters_and_the_cli_names_flags():
    with pytest.raises(ParameterError, match=r"^k must be positive \(or auto\)$") as info:
        caploc.locate(wrap_model(build("llama"), byte_tokenizer()), "arithmetic", k=0)
    assert info.value.render(lambda p: f"--{p}") == "--k must be positive (or auto)"
    from caploc.cli import app
    from caploc.cli.expand import flag_of

    app.build()  # the commands' flags, from the specs and registries
    assert flag_of("n_masks") == "--masks" and flag_of("min_tasks") == "--min-tasks" and flag_of("from_run") == "--from"
    assert flag_of("n_candidates") == "--candidates" and flag_of("tolerance") == "--control-tolerance"
    assert flag_of("length") == "--task-arg length" and flag_of("n_tokens") == "--tokens"


def test_results_are_typed_and_versioned(tmp_path):
    lm = wrap_model(build("llama"), byte_tokenizer(), spec="tiny")
    from caploc.store import EvalStore

    store = EvalStore(tmp_path / "s.sqlite")
    spec = caploc.TaskSpec("arithmetic", subtask="2D+", shots=1, n=2, n_validate=2)
    result = caploc.locate(lm, spec, "1s-greedy", k=2, evaluation=caploc.EvalOptions(store=store), out=tmp_path / "run")
    assert isinstance(result, LocateResult)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["schema_version"] == SCHEMA_VERSION and saved["command"] == "locate"
    again = LocateResult.load(tmp_path / "run")
    # JSON forms compared as text: NaN (a relative drop from a zero baseline) equals itself there
    assert json.dumps(again.to_dict(), default=json_default) == json.dumps(result.to_dict(), default=json_default)
    assert again.top_heads() == result.ranking[:2]
    assert result["heads"] == result.heads  # the mapping view reads the JSON form
    evaluated = caploc.evaluate(lm, spec, ablate="L0H1")
    assert evaluated.to_dict()["schema_version"] == SCHEMA_VERSION and evaluated.ablated_heads == ["L0H1"]
    newer = dict(saved, schema_version=SCHEMA_VERSION + 1)
    (tmp_path / "future.json").write_text(json.dumps(newer))
    with pytest.raises(CaplocError, match="upgrade caploc"):
        LocateResult.load(tmp_path / "future.json")
    with pytest.raises(CaplocError, match="is a locate result, not a caploc specificity result"):
        SpecificityResult.load(tmp_path / "run" / "result.json")


def test_run_directories_of_caploc_0_1_still_load(tmp_path):
    old = FIXTURES / "runs_v0_1"
    run = LocateResult.load(old / "locate")
    assert "schema_version" not in json.loads((old / "locate" / "result.json").read_text())
    assert run.top_heads() == ["L1H3", "L2H5", "L3H0"] and run.method["name"] == "1s-greedy"
    assert run.task_options == {} and run.to_dict()["schema_version"] == SCHEMA_VERSION
    spec = SpecificityResult.load(old / "locate")
    assert spec.heads == run.top_heads() and "planted" in spec.tasks
    uni = UniversalResult.load(old / "universal")
    assert uni.universal_heads == [h["head"] for h in uni.heads if h["universal"]]
    # every consumer of run directories reads them: compare, and the report (figures from the old run)
    assert caploc.compare(old / "locate", old / "locate").overlap == 3
    written = caploc.report(old / "locate", out=tmp_path / "report", universal_path=old / "universal")
    assert Path(written.html).exists() and written.specificity
