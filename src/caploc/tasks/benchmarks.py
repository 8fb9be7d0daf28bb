"""The standard small-model suite (common sense and science; `knowledge` has MMLU, WMDP, TruthfulQA and
LAMBADA), each dataset in the layouts its users have, prompted and scored as lm-evaluation-harness does (task
names are lm-eval's; `caploc.tasks.harness` runs lm-eval's own configs).

The layouts each task reads, and its metric, are tabulated in docs/tasks.md. Layouts are told apart
from the records (`DatasetChoiceTask.detect`); every record is read when the task is built.

Each task reads `--data` (a local file, directory or HF id) and defaults to the dataset's hub id, which needs a
network; offline, point `--data` at a local copy.
"""

from __future__ import annotations

import re
from pathlib import Path

from caploc.errors import CaplocError
from caploc.records import Record, RecordError, read_lines
from caploc.tasks.base import Item, register_task
from caploc.tasks.multiple_choice import DatasetChoiceTask, RecordLayout, lettered_choices, lettered_question, record_id


def spaced(texts) -> tuple[str, ...]:
    return tuple(" " + t for t in texts)


# -- ARC, OpenBookQA, CommonsenseQA: AI2's release nests the question, HF flattens it ---------------------
def _release_choices(r: Record) -> tuple[list[str], list[str]]:
    """AI2 release: question.choices = [{"text", "label"}, ...]."""
    choices = r.value("question.choices")
    if not isinstance(choices, list) or len(choices) < 2 or \
            not all(isinstance(c, dict) and "text" in c and "label" in c for c in choices):
        raise r.fail("question.choices", 'a list of {"text", "label"} objects', choices)
    return [str(c["text"]) for c in choices], [str(c["label"]) for c in choices]


def _hf_choices(r: Record) -> tuple[list[str], list[str]]:
    """HF: choices = {"text": [...], "label": [...]}."""
    texts, labels = r.texts("choices.text"), [str(x) for x in r.texts("choices.label")]
    if len(texts) != len(labels):
        raise r.fail("choices.label", f"{len(texts)} labels, one per choice text", labels)
    return texts, labels


def _nested_question(r: Record) -> bool:
    return isinstance(r.get("question"), dict)


def _flat_question(r: Record) -> bool:
    return isinstance(r.get("question"), str)


def _question_layouts(build, release: str, hub: str, hub_stem: str = "question") -> tuple[RecordLayout, RecordLayout]:
    """AI2's release nests the question (`question.stem`, `question.choices` [{text, label}]); the HF layout
    flattens it (`hub_stem`, `choices` {text, label}). Both end in `build(stem, texts, labels, record)`."""
    return (RecordLayout(release, ("question.stem", "question.choices", "answerKey"),
                   lambda self, r: build(r.text("question.stem"), *_release_choices(r), r), _nested_question),
            RecordLayout(hub, (hub_stem, "choices", "answerKey"),
                   lambda self, r: build(r.text(hub_stem), *_hf_choices(r), r),
                   _flat_question if hub_stem == "question" else None))


def _arc_item(stem: str, texts: list[str], labels: list[str], r: Record) -> Item:
    return Item(id=record_id(r, "id"), context=f"Question: {stem}\nAnswer:", choices=spaced(texts),
                label=r.choice("answerKey", labels))


@register_task()
class ARCEasy(DatasetChoiceTask):
    """ARC-Easy (Clark et al. 2018): grade-school science questions, multiple choice."""

    name = "arc_easy"
    default_metric = "acc"
    hub_id, hub_config = "allenai/ai2_arc", "ARC-Easy"
    layouts = _question_layouts(_arc_item, "AI2 release JSONL", "HF allenai/ai2_arc")


@register_task()
class ARCChallenge(ARCEasy):
    """ARC-Challenge (Clark et al. 2018): the grade-school science questions retrieval and co-occurrence methods fail
    on."""

    name = "arc_challenge"
    default_metric = "acc_norm"
    hub_config = "ARC-Challenge"


def _obqa_item(stem: str, texts: list[str], labels: list[str], r: Record) -> Item:
    answer = str(r.value("answerKey")).strip()  # lm-eval strips it: some keys carry spaces
    if answer not in labels:
        raise r.fail("answerKey", f"one of {' / '.join(labels)}", r.value("answerKey"))
    return Item(id=record_id(r, "id"), context=stem, choices=spaced(texts), label=labels.index(answer))


@register_task()
class OpenBookQA(DatasetChoiceTask):
    """OpenBookQA (Mihaylov et al. 2018): elementary science questions that need a fact and common knowledge."""

    name = "openbookqa"
    default_metric = "acc_norm"
    hub_id, hub_config = "allenai/openbookqa", "main"
    layouts = _question_layouts(_obqa_item, "AI2 release JSONL", "HF allenai/openbookqa", hub_stem="question_stem")


def _csqa_item(stem: str, texts: list[str], labels: list[str], r: Record) -> Item:
    return Item(id=record_id(r, "id"), context="Question: " + lettered_question(stem, texts),
                choices=lettered_choices(len(texts)), label=r.choice("answerKey", labels))


@register_task()
class CommonsenseQA(DatasetChoiceTask):
    """CommonsenseQA (Talmor et al. 2019): five-way questions on everyday concepts."""

    name = "commonsense_qa"
    hub_id, hub_split = "tau/commonsense_qa", "validation"
    layouts = _question_layouts(_csqa_item, "release JSONL", "HF tau/commonsense_qa")


@register_task()
class SciQ(DatasetChoiceTask):
    """SciQ (Welbl et al. 2017): science exam questions, with the supporting passage."""

    name = "sciq"
    hub_id = "allenai/sciq"

    def _item(self, r: Record) -> Item:
        choices = [r.text(f) for f in ("distractor1", "distractor2", "distractor3", "correct_answer")]
        support = r.text("support", allow_empty=True).lstrip()
        return Item(id=record_id(r, "id"), context=f"{support}\nQuestion: {r.text('question')}\nAnswer:",
                    choices=spaced(choices), label=3)

    layouts = (RecordLayout("AI2 release JSON / HF allenai/sciq",
                      ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"), _item),)


# -- PIQA: the release keeps the labels in a separate file ------------------------------------------------
@register_task()
class PIQA(DatasetChoiceTask):
    """PIQA (Bisk et al. 2020): which of two solutions reaches a physical goal."""

    name = "piqa"
    hub_id, hub_split = "baber/piqa", "validation"

    def read(self, data: str, split: str) -> list[Record]:
        records = super().read(data, split)
        path = Path(data).expanduser()
        if path.is_file() and records and "label" not in records[0]:
            stem = path.name.split(".")[0]  # valid.jsonl(.gz) -> valid-labels.lst
            labels_file = next((p for p in (path.with_name(f"{stem}-labels.lst"),
                                            path.with_name(f"{stem}-labels.lst.gz")) if p.is_file()), None)
            if labels_file is None:
                raise RecordError(f"{records[0].where()}: field 'label' is missing and there is no "
                                  f"{stem}-labels.lst beside {path.name} (PIQA's release keeps labels there)")
            labels = [line.strip() for line in read_lines(labels_file) if line.strip()]
            if len(labels) != len(records):
                raise CaplocError(f"{labels_file}: {len(labels)} labels for {len(records)} records in {path}")
            for r, label in zip(records, labels):
                r["label"] = label
        return records

    def _item(self, r: Record) -> Item:
        return Item(id=record_id(r, "id"), context=f"Question: {r.text('goal')}\nAnswer:",
                    choices=spaced([r.text("sol1"), r.text("sol2")]), label=r.choice("label", ["0", "1"]))

    layouts = (RecordLayout("release JSONL (+ labels .lst) / HF", ("goal", "sol1", "sol2"), _item),)


# -- WinoGrande: partial scoring ------------------------------------------------------------------------
@register_task()
class WinoGrande(DatasetChoiceTask):
    """As lm-eval scores it: each option fills the blank, and the log-likelihood of the rest of the sentence
    after the blank decides (the continuation is the same for both; the contexts differ)."""

    name = "winogrande"
    hub_id, hub_config, hub_split = "allenai/winogrande", "winogrande_xl", "validation"

    def _item(self, r: Record) -> Item:
        sentence = r.text("sentence")
        if "_" not in sentence:
            raise r.fail("sentence", "a sentence with a blank '_'", sentence)
        blank = sentence.index("_")
        rest = " " + sentence[blank + 1:].strip()
        options = [r.text("option1"), r.text("option2")]
        return Item(id=record_id(r, "qID", "id"), context=sentence, choices=(rest, rest),
                    contexts=tuple(sentence[:blank] + o for o in options), label=r.choice("answer", ["1", "2"]),
                    meta={"options": options})

    layouts = (RecordLayout("release JSONL / HF allenai/winogrande", ("sentence", "option1", "option2", "answer"), _item),)


# -- HellaSwag ---------------------------------------------------------------------------------------
def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@register_task()
class HellaSwag(DatasetChoiceTask):
    """HellaSwag (Zellers et al. 2019): the most plausible ending of an activity description."""

    name = "hellaswag"
    default_metric = "acc_norm"
    hub_id, hub_split = "Rowan/hellaswag", "validation"

    def _item(self, r: Record) -> Item:
        endings = r.texts("endings")
        context = _hellaswag_clean(f"{r.text('activity_label', allow_empty=True)}: {r.text('ctx_a', allow_empty=True)}"
                                   f" {r.text('ctx_b', allow_empty=True).capitalize()}")
        return Item(id=record_id(r, "ind"), context=context, choices=spaced(_hellaswag_clean(e) for e in endings),
                    label=r.choice("label", [str(j) for j in range(len(endings))]))

    layouts = (RecordLayout("release JSONL / HF Rowan/hellaswag", ("ctx_a", "ctx_b", "endings", "label"), _item),)


# -- BoolQ ---------------------------------------------------------------------------------------------
def _boolq_item(r: Record, answer_field: str) -> Item:
    return Item(id=record_id(r, "idx", "id"),
                context=f"{r.text('passage')}\nQuestion: {r.text('question')}?\nAnswer:",
                choices=(" no", " yes"), label=int(r.boolean(answer_field)))


@register_task()
class BoolQ(DatasetChoiceTask):
    """BoolQ (Clark et al. 2019): yes/no questions about a Wikipedia passage."""

    name = "boolq"
    hub_id, hub_split = "google/boolq", "validation"
    layouts = (
        RecordLayout("Google release / HF google/boolq", ("question", "passage", "answer"),
               lambda self, r: _boolq_item(r, "answer")),
        RecordLayout("SuperGLUE", ("question", "passage", "label"), lambda self, r: _boolq_item(r, "label")),
    )
