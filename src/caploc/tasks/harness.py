"""Any lm-evaluation-harness task as a caploc task (`--task lmeval:NAME`).

lm-eval builds the requests itself (its YAML: dataset, prompt template, few-shot sampling, target delimiter),
so the strings caploc scores are exactly the ones lm-eval would send a model; caploc then runs them through
its one evaluator (batched masks, shared prefixes, the store) and hands the raw log-likelihoods or generations
back to the task's own `process_results`, so every metric (acc, acc_norm, TruthfulQA's MC2 mass, exact_match)
is lm-eval's. Besides those, choice and target tasks get caploc's continuous `logprob` (of the gold answer),
the identification metric.

- `multiple_choice` -> a multiple-choice task (one context per choice where lm-eval varies the context, as
  WinoGrande does);
- `loglikelihood` -> a target task (the gold continuation);
- `generate_until` -> a generation task with the request's stop strings and token limit.
`loglikelihood_rolling` (perplexity corpora) has no item structure for ablation and is refused.

`data` is lm-eval's include path: a directory (or YAML file) of task configs, e.g. one whose `dataset_path:
json` and `dataset_kwargs.data_files` point at local files; without it the hub is used (online). Needs the
`lmeval` extra (`pip install caploc[lmeval]`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from caploc.errors import CaplocError, ParameterError
from caploc.files import content_key
from caploc.tasks.base import GenerationTask, Item, MultipleChoiceTask, TargetTask, Task

LOADED: dict[tuple, object] = {}  # one lm-eval TaskManager per include path: indexing its YAMLs takes seconds


def _harness():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise CaplocError("lmeval: tasks need lm-evaluation-harness: pip install 'caploc[lmeval]'") from exc
    return TaskManager


def _load(name: str, include: str | None):
    key = (include,)
    if key not in LOADED:
        for noisy in ("lm_eval", "datasets"):  # progress chatter on every load
            logging.getLogger(noisy).setLevel(logging.ERROR)
        LOADED[key] = _harness()(include_path=include)
    manager = LOADED[key]
    try:
        loaded = manager.load([name])
    except Exception as exc:  # unknown name, a YAML error, a dataset it cannot reach
        raise CaplocError(f"lmeval:{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    tasks = loaded["tasks"]
    leaves = list(tasks.values()) if isinstance(tasks, dict) else list(tasks)
    if not leaves:
        raise CaplocError(f"lmeval:{name}: lm-eval found no task of that name")
    return leaves


def _requests(harness_task, shots: int | None, limit: int | None):
    if shots is not None:
        harness_task.set_config(key="num_fewshot", value=shots)
    try:
        harness_task.build_all_requests(limit=limit, rank=0, world_size=1)
    except Exception as exc:
        raise CaplocError(f"lmeval:{harness_task.config.task}: cannot build its requests: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    by_doc: dict[int, list] = {}
    for instance in harness_task.instances:
        by_doc.setdefault(instance.doc_id, []).append(instance)
    return [sorted(group, key=lambda i: i.idx) for _, group in sorted(by_doc.items())]


class _Harness:
    """What the three kinds share: the lm-eval tasks and, per item, the doc lm-eval scores it with."""

    harness_name = ""

    def _setup(self, name: str, data: str | None, shots: int | None, limit: int | None, leaves, items, docs):
        self.name = f"lmeval:{name}"
        self.harness_name, self.data, self.lm_shots, self.limit = name, data, shots, limit
        self.leaves = {leaf.config.task: leaf for leaf in leaves}
        self._items, self._docs = items, docs
        self.metrics = tuple(dict.fromkeys(m for leaf in leaves for m in _metric_names(leaf)))
        self.default_metric = self.metrics[0] if self.metrics else "acc"

    def config(self) -> dict:
        digest = content_key([(i.id, i.context, i.choices, i.contexts, i.target) for i in self._items], 16)
        return {"task": self.name, "kind": self.kind, "data": self.data, "num_fewshot": self.lm_shots,
                "limit": self.limit, "requests": digest}

    def pool(self, seed: int, needed: int) -> list[Item]:
        return self.shuffled(self._items, seed, self.name)

    def _results(self, item: Item, results: list) -> dict[str, float]:
        leaf, doc = self.leaves[item.meta["harness_task"]], self._docs[item.id]
        return {k: float(v) for k, v in leaf.process_results(doc, results).items() if _is_number(v)}


def _metric_names(leaf) -> list[str]:
    return [m["metric"] if isinstance(m, dict) else str(m) for m in (leaf.config.metric_list or [])
            if isinstance(m, (dict, str))]


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer, bool)) and not isinstance(value, str)


class LmEvalChoice(_Harness, MultipleChoiceTask):
    def metric_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.metrics, "logprob", "logprob_all"]))

    def process_loglikelihoods(self, items, logprob, greedy, lengths=None):
        out = super().process_loglikelihoods(items, logprob, greedy, lengths)  # logprob, logprob_all (and caploc's acc)
        harness = {m: np.zeros_like(out["logprob"]) for m in self.metrics}
        for i, (item, lp, g) in enumerate(zip(items, logprob, greedy)):
            for row in range(lp.shape[0]):
                for metric, value in self._results(item, list(zip(lp[row].tolist(), g[row].tolist()))).items():
                    if metric in harness:
                        harness[metric][row, i] = value
        return out | harness


class LmEvalTarget(_Harness, TargetTask):
    def metric_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([m for m in self.metrics if m != "perplexity"] + ["acc", "logprob"]))

    def process_loglikelihoods(self, items, logprob, greedy, lengths=None):
        out = super().process_loglikelihoods(items, logprob, greedy, lengths)  # acc = greedy match, logprob
        for metric in self.metric_names():
            if metric in out:
                continue
            out[metric] = np.array([[self._results(item, [(float(lp[row, 0]), bool(g[row, 0]))]).get(metric, 0.0)
                                     for item, lp, g in zip(items, logprob, greedy)]
                                    for row in range(logprob[0].shape[0])])
        return out


class LmEvalGeneration(_Harness, GenerationTask):
    def metric_names(self) -> tuple[str, ...]:
        return self.metrics[:1] or ("exact_match",)

    def score(self, item: Item, generated: str) -> float:
        return self._results(item, [generated]).get(self.metric_names()[0], 0.0)


def lmeval_task(name: str, data: str | None = None, shots: int | None = None, limit: int | None = None,
                **unused) -> Task:
    """The lm-eval task (or group: its tasks together) `name` as a caploc task."""
    if unused:
        raise ParameterError(f"lmeval:{name} does not take option(s): " + ", ".join("{%s}" % u for u in unused),
                             *unused)
    if data is not None and not Path(data).expanduser().exists():
        raise CaplocError(f"lmeval:{name}: include path not found: {data}")
    include = str(Path(data).expanduser().resolve()) if data else None
    cwd = os.getcwd()
    try:
        if include:  # relative data_files in a YAML are read from beside it
            os.chdir(include if Path(include).is_dir() else str(Path(include).parent))
        leaves = _load(name, include)
        groups = [(leaf, _requests(leaf, shots, limit)) for leaf in leaves]
    finally:
        os.chdir(cwd)
    kinds = {leaf.config.output_type for leaf in leaves}
    if len(kinds) != 1:
        raise CaplocError(f"lmeval:{name}: its tasks mix output types ({', '.join(sorted(kinds))}); name one task")
    kind = kinds.pop()
    items, docs = [], {}
    for leaf, per_doc in groups:
        for instances in per_doc:
            doc = instances[0].doc
            item_id = f"{leaf.config.task}/{instances[0].doc_id}"
            docs[item_id] = doc
            items.append(_item(leaf, kind, item_id, doc, instances))
    if not items:
        raise CaplocError(f"lmeval:{name}: no documents")
    cls = {"multiple_choice": LmEvalChoice, "loglikelihood": LmEvalTarget, "generate_until": LmEvalGeneration}.get(kind)
    if cls is None:
        raise CaplocError(f"lmeval:{name}: output type {kind} is not supported (perplexity corpora have no items "
                          f"to localize on); multiple_choice, loglikelihood and generate_until are")
    task = cls.__new__(cls)
    Task.__init__(task, shots=0, chat=False)
    task._setup(name, data, shots, limit, leaves, items, docs)
    if kind == "generate_until":
        gen = instances[0].arguments[1] if len(instances[0].arguments) > 1 else {}
        task.stop = tuple(gen.get("until") or ())
        task.max_new_tokens = int(gen.get("max_gen_toks") or 256)
        task.has_references = all(item.meta.get("reference") for item in items)
    return task


def _item(leaf, kind: str, item_id: str, doc, instances) -> Item:
    meta = {"harness_task": leaf.config.task}
    if kind == "multiple_choice":
        contexts = [i.arguments[0] for i in instances]
        choices = tuple(i.arguments[1] for i in instances)
        gold = leaf.doc_to_target(doc)
        if isinstance(gold, list):
            gold = gold[0]
        if isinstance(gold, str):
            options = leaf.doc_to_choice(doc)
            gold = options.index(gold) if gold in options else int(gold)
        same = len(set(contexts)) == 1
        return Item(id=item_id, context=contexts[0], choices=choices, label=int(gold),
                    contexts=() if same else tuple(contexts), meta=meta)
    if kind == "loglikelihood":
        context, target = instances[0].arguments[:2]
        return Item(id=item_id, context=context, target=target, meta=meta)
    return Item(id=item_id, context=instances[0].arguments[0], answer="", meta=meta | {"reference": _target(leaf, doc)})


def _target(leaf, doc) -> str | None:
    """A generate_until document's target as a continuation (lm-eval's target delimiter before it), if the
    task has one: the reference the identification metric scores."""
    try:
        target = leaf.doc_to_target(doc)
    except Exception:  # a task without a usable target: identified by generation
        return None
    if isinstance(target, list):
        target = target[0] if target else None
    if target is None:
        return None
    text = str(target).strip()
    return (getattr(leaf.config, "target_delimiter", " ") or "") + text if text else None
