"""Benchmarks read in their own release layouts and their HF layouts (fixtures follow each dataset's
documented layout), in every file format, with one-line errors for bad records."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from caploc import CaplocError
from caploc.records import load_records
from caploc.tasks import GENERAL_TASKS, TASKS, get_task

LAYOUTS = Path(__file__).parent / "fixtures" / "layouts"


def _items(task):
    return [(i.id, i.prefix, i.context, i.choices, i.contexts, i.label, i.target) for i in task.items(100)]


@pytest.mark.parametrize("task, release, hub", [
    ("arc_easy", "ARC-Easy-Test.jsonl", "arc_easy_hf.jsonl"),
    ("arc_challenge", "ARC-Easy-Test.jsonl", "arc_easy_hf.jsonl"),
    ("openbookqa", "openbookqa_test.jsonl", "openbookqa_hf.jsonl"),
    ("commonsense_qa", "commonsenseqa/dev_rand_split.jsonl", "commonsense_qa_hf.jsonl"),
    ("piqa", "physicaliqa-train-dev/valid.jsonl", "piqa_hf.jsonl"),
    ("truthfulqa_mc1", "mc_task.json", "truthfulqa_hf.jsonl"),
    ("truthfulqa_mc2", "mc_task.json", "truthfulqa_hf.jsonl"),
])
def test_release_and_hub_layouts_give_the_same_items(task, release, hub):
    from_release = get_task(task, data=str(LAYOUTS / release))
    from_hub = get_task(task, data=str(LAYOUTS / hub))
    if len(type(from_release).layouts) > 1:  # PIQA and TruthfulQA differ in side files / target encoding only
        assert from_release.layout != from_hub.layout
    assert _items(from_release) == _items(from_hub)
    assert len(from_release.items(100)) == (2 if task.startswith("truthfulqa") else 3)


def test_arc_release_with_numbered_options_and_lm_eval_prompt():
    items = {i.id: i for i in get_task("arc_easy", data=str(LAYOUTS / "ARC-Easy-Test.jsonl")).items(3)}
    numbered = items["NYSEDREGENTS_2012_4_3"]
    assert numbered.label == 0 and numbered.choices[0] == " a meter stick"
    assert items["Mercury_SC_401144"].context == "Question: Which of these is a source of light?\nAnswer:"
    assert TASKS["arc_easy"].cls.default_metric == "acc" and TASKS["arc_challenge"].cls.default_metric == "acc_norm"


def test_prompts_follow_lm_eval():
    csqa = get_task("commonsense_qa", data=str(LAYOUTS / "commonsense_qa_hf.jsonl")).items(3)[0]
    assert csqa.context.startswith("Question: ") and "\nE. " in csqa.context and csqa.context.endswith("\nAnswer:")
    assert csqa.choices == (" A", " B", " C", " D", " E")
    obqa = {i.id: i for i in get_task("openbookqa", data=str(LAYOUTS / "openbookqa_hf.jsonl")).items(3)}
    assert obqa["8-376"].context == "A magnet will stick to" and obqa["8-376"].label == 1
    sciq = get_task("sciq", data=str(LAYOUTS / "sciq_test.json")).items(3)
    assert all(i.label == 3 and i.context.endswith("\nAnswer:") for i in sciq)
    assert any(i.context.startswith("\nQuestion: What phenomenon") for i in sciq)  # empty support
    assert any(i.context.startswith("Entropy measures") for i in sciq)  # support is left-stripped
    piqa = get_task("piqa", data=str(LAYOUTS / "piqa_hf.jsonl")).items(3)
    assert {i.context for i in piqa} >= {"Question: How do you keep bread fresh for longer?\nAnswer:"}
    tqa = get_task("truthfulqa_mc1", data=str(LAYOUTS / "mc_task.json")).items(2)[0]
    assert tqa.prefix.startswith("Q: What is human life expectancy") and tqa.prefix.endswith("Barcelona, Spain.\n\nQ: ")
    assert tqa.context.endswith("?\nA:") and tqa.label == 0


def test_winogrande_partial_scoring():
    items = {i.id: i for i in get_task("winogrande", data=str(LAYOUTS / "winogrande_1.1" / "dev.jsonl")).items(3)}
    item = items["3XWUWJ18TLO2DDRXF83QWLKRJ29UU4-1"]
    assert item.contexts == ("The trophy doesn't fit into the brown suitcase because the trophy",
                             "The trophy doesn't fit into the brown suitcase because the suitcase")
    assert item.choices == (" is too large.", " is too large.") and item.label == 0
    assert items["3QHITW7OYO7Q6B6ISU2UMJB84ZLAQE-2"].label == 1


def test_winogrande_scores_only_the_rest_of_the_sentence(smollm):
    from caploc.evaluator.requests import Requests

    task = get_task("winogrande", data=str(LAYOUTS / "winogrande_1.1" / "dev.jsonl"))
    items = task.items(3)
    requests = Requests(smollm.tokenizer, task, items)
    for seq in requests.sequences:
        item = items[seq.item]
        prompt = smollm.tokenizer.decode(list(seq.prefix) + seq.context)
        assert prompt == item.contexts[seq.choice]
        assert smollm.tokenizer.decode(seq.continuation) == item.choices[0]
    first = [s for s in requests.sequences if s.item == 0]
    assert first[0].prefix == first[1].prefix and first[0].prefix  # the sentence up to the blank runs once


def test_hellaswag_release_and_boolq_layouts():
    hs = get_task("hellaswag", data=str(LAYOUTS / "hellaswag_val.jsonl")).items(3)
    assert {i.id for i in hs} == {"24", "92", "106"}
    assert any(i.context == "Roof shingle removal: A man is sitting on a roof. He" for i in hs)
    google = get_task("boolq", data=str(LAYOUTS / "boolq_dev.jsonl"))
    superglue = get_task("boolq", data=str(LAYOUTS / "superglue_boolq_val.jsonl"))
    assert google.layout.name != superglue.layout.name
    assert sorted(i.label for i in google.items(3)) == sorted(i.label for i in superglue.items(3)) == [0, 1, 1]


@pytest.mark.parametrize("label_values", [[True, False], [1, 0], ["true", "false"], ["True", "False"]])
def test_superglue_boolq_labels_in_every_spelling(tmp_path, label_values):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{n}", "passage": "p", "idx": n, "label": v}) + "\n"
                            for n, v in enumerate(label_values)))
    assert {i.id: i.label for i in get_task("boolq", data=str(path)).items(2)} == {"0": 1, "1": 0}


def test_mmlu_release_csv_file_directory_and_five_shot():
    test_dir = LAYOUTS / "mmlu" / "data" / "test"
    one = get_task("mmlu", data=str(test_dir / "anatomy_test.csv"))
    assert one.layout.name.startswith("release CSV")
    assert {i.meta["subject"] for i in one.items(10)} == {"anatomy"}
    every = get_task("mmlu", data=str(test_dir))
    assert len(every.items(10)) == 4
    assert {i.meta["subject"] for i in every.items(10)} == {"anatomy", "abstract_algebra"}
    item = next(i for i in get_task("mmlu", data=str(test_dir), subtask="abstract_algebra").items(10)
                if i.context.startswith("Find the degree"))
    assert item.prefix == "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    assert item.context.endswith("\nD. 3\nAnswer:") and item.choices == (" A", " B", " C", " D")
    shot = get_task("mmlu", data=str(test_dir), subtask="anatomy", shots=2).items(10)[0]
    # lm-eval's 5-shot format: the dev questions, each followed by " {letter}", separated by blank lines
    assert "What is the name of the bone that forms the lower jaw?" in shot.prefix
    assert "Hyoid bone\nAnswer: B\n\n" in shot.prefix and shot.prefix.endswith("Answer: B\n\n")
    with pytest.raises(CaplocError, match="fewer than 3 dev exemplars"):
        get_task("mmlu", data=str(test_dir), shots=3)


def test_lambada_is_a_target_task():
    task = get_task("lambada_openai", data=str(LAYOUTS / "lambada_test.jsonl"))
    targets = sorted(i.target for i in task.items(2))
    assert targets == [" dock", " signs"]
    assert all(not i.context.endswith(" ") for i in task.items(2))


def test_truthfulqa_mc2_is_the_true_probability_mass():
    import numpy as np

    task = get_task("truthfulqa_mc2", data=str(LAYOUTS / "truthfulqa_hf.jsonl"))
    item = task.items(2)[0]
    lp = np.log(np.array([[0.1, 0.3, 0.4, 0.2]]))
    scores = task.process_loglikelihoods([item], [lp], [np.zeros_like(lp, dtype=bool)])
    assert scores["acc"][0, 0] == pytest.approx(0.4)  # (0.1 + 0.3) / 1.0: the first two answers are true


@pytest.mark.parametrize("fmt", ["jsonl.gz", "json", "json.gz", "csv", "csv.gz", "parquet"])
def test_every_file_format(tmp_path, fmt):
    source = LAYOUTS / "piqa_hf.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    path = tmp_path / f"piqa.{fmt}"
    if fmt.startswith("parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        if fmt.startswith("jsonl"):
            text = "".join(json.dumps(r) + "\n" for r in rows)
        elif fmt.startswith("json"):
            text = json.dumps(rows)
        else:
            import csv
            import io

            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            text = out.getvalue()
        path.write_bytes(gzip.compress(text.encode()) if fmt.endswith(".gz") else text.encode())
    assert _items(get_task("piqa", data=str(path))) == _items(get_task("piqa", data=str(source)))


def test_piqa_release_labels_gzipped_beside_the_records(tmp_path):
    shutil.copy(LAYOUTS / "physicaliqa-train-dev" / "valid.jsonl", tmp_path / "valid.jsonl")
    (tmp_path / "valid-labels.lst.gz").write_bytes(gzip.compress(b"1\n0\n0\n"))
    assert [i.label for i in sorted(get_task("piqa", data=str(tmp_path / "valid.jsonl")).items(3), key=lambda i: i.id)] \
        == [1, 0, 0]


@pytest.mark.parametrize("name, records, extra, message", [
    ("boolq", [{"question": "q", "passage": "p", "idx": 0, "label": "maybe"}], None,
     r"bad.jsonl: record 1: field 'label': expected true/false, 0/1 or \"true\"/\"false\", got 'maybe'"),
    ("arc_easy", [{"id": "x", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}],
     None, r"record 1: field 'answerKey': expected one of A / B or an index 0..1, got 'E'"),
    ("arc_easy", [{"id": "x", "question": {"stem": "q", "choices": "a b"}, "answerKey": "A"}], None,
     r"record 1: field 'question.choices': expected a list of"),
    ("winogrande", [{"sentence": "no blank here", "option1": "a", "option2": "b", "answer": "1"}], None,
     r"record 1: field 'sentence': expected a sentence with a blank"),
    ("winogrande", [{"sentence": "a _ b", "option1": "a", "option2": "b", "answer": ""}], None,
     r"record 1: field 'answer': expected one of 1 / 2, got ''"),  # WinoGrande's unlabelled test split
    ("piqa", [{"goal": "g", "sol1": "a", "sol2": "b"}], None, r"no bad-labels.lst beside bad.jsonl"),
    ("piqa", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2, "0\n", r"bad-labels.lst: 1 labels for 2 records"),
    ("truthfulqa_mc1", [{"question": "q", "mc1_targets": {"a": 0, "b": 0}, "mc2_targets": {"a": 1, "b": 0}}], None,
     r"record 1: field 'mc1_targets': expected at least two answers labelled 0/1, at least one of them 1"),
    ("hellaswag", [{"ctx_a": "a", "ctx_b": "b", "endings": ["x", "y"], "label": 0, "activity_label": "z"},
                   {"ctx_a": "a", "ctx_b": "b", "endings": ["x"], "label": 0, "activity_label": "z"}], None,
     r"bad.jsonl: record 2: field 'endings': expected a list of at least 2 non-empty texts"),
    ("sciq", [{"question": "q", "distractor1": "a", "distractor2": "b", "distractor3": "c", "support": ""}], None,
     r"record 1: field\(s\) 'correct_answer' missing \(sciq"),
])
def test_bad_records_name_file_record_and_field(tmp_path, name, records, extra, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    if extra is not None:
        (tmp_path / "bad-labels.lst").write_text(extra)
    with pytest.raises(CaplocError, match=message):
        get_task(name, data=str(path))


def test_csv_row_with_missing_column_names_its_line(tmp_path):
    path = tmp_path / "anatomy_test.csv"
    path.write_text('"Q1?",a,b,c,d,A\n"Q2?",a,b,c,B\n')
    with pytest.raises(CaplocError, match=r"anatomy_test.csv: line 2: 5 columns, expected 6"):
        get_task("mmlu", data=str(path))


def test_bad_record_is_one_line_and_exit_2_from_the_cli(smollm, tmp_path):
    path = tmp_path / "boolq.jsonl"
    path.write_text(json.dumps({"question": "q", "passage": "p", "label": "true"}) + "\n" +
                    json.dumps({"question": "q", "passage": "p", "label": "sometimes"}) + "\n")
    done = subprocess.run([sys.executable, "-m", "caploc", "eval", "--task", "boolq", "--data", str(path), "--n", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {path}: record 2: field 'label': expected true/false, 0/1 or "
                     "\"true\"/\"false\", got 'sometimes'"], done.stderr


def test_directory_of_files_and_suite_membership():
    records = load_records(str(LAYOUTS / "mmlu" / "data" / "dev"), csv_columns=("question", "A", "B", "C", "D", "answer"))
    assert len(records) == 4 and records[0].source.endswith("abstract_algebra_dev.csv")
    for name in ("arc_easy", "piqa", "winogrande", "openbookqa", "commonsense_qa", "sciq", "lambada_openai",
                 "truthfulqa_mc1", "truthfulqa_mc2"):
        assert name in TASKS and name in GENERAL_TASKS
