import json
from pathlib import Path

import numpy as np
import pytest

from caploc import CaplocError
from caploc.tasks import get_task
from caploc.tasks.arithmetic import SUBTASKS, make_problem
from caploc.tasks.gsm8k import last_number, reference_answer

FIXTURES = Path(__file__).parent / "fixtures"


def test_arithmetic_is_deterministic_and_nested():
    task = get_task("arithmetic")
    a = task.items(40, seed=3)
    assert a == task.items(40, seed=3)
    assert task.items(20, seed=3) == a[:20]  # a smaller n is a prefix of a larger one
    assert a != task.items(40, seed=4)
    # disjoint offsets give disjoint items (identification vs held-out)
    held_out = task.items(40, seed=3, offset=40)
    assert not {i.context for i in a} & {i.context for i in held_out}


def test_arithmetic_formats_and_answers():
    import random

    rng = random.Random(0)
    for subtask in SUBTASKS:
        for _ in range(50):
            text, answer = make_problem(subtask, rng)
            if subtask == "1DC":
                assert eval(text) == answer  # noqa: S307
            else:
                a, word, b = text.split()
                assert len(a) == len(b) == int(subtask[0])
                op = {"plus": int.__add__, "minus": int.__sub__, "times": int.__mul__}[word]
                assert op(int(a), int(b)) == answer
    item = get_task("arithmetic", subtask="2D-").items(1)[0]
    assert item.context.startswith("Question: What is ") and item.context.endswith("?\nAnswer:")
    assert item.target == " " + str(eval(item.context[18:-9].replace("minus", "-")))  # noqa: S307
    assert item.prefix.count("Question:") == 3  # 3-shot by default


def test_arithmetic_all_subtasks_round_robin_and_aliases():
    items = get_task("arithmetic").items(20)
    assert [i.meta["subtask"] for i in items[:10]] == list(SUBTASKS)
    assert get_task("arithmetic", subtask="2da").subtasks == ["2D+"]
    with pytest.raises(CaplocError, match="unknown arithmetic subtask"):
        get_task("arithmetic", subtask="7D+")


def test_fewshot_exemplars_never_scored():
    task = get_task("arithmetic", subtask="1DC", shots=5)
    exemplars = task.prefix("1DC")
    for item in task.items(500):
        assert item.context not in exemplars


def test_gsm8k_answer_extraction():
    assert reference_answer("blah\n#### 1,234") == "1234"
    assert last_number("so she pays $1,234.00.") == "1234"
    assert last_number("The answer is 72.\n") == "72"
    assert last_number("-5 degrees") == "-5"
    assert last_number("no digits") is None
    assert last_number("0.5 then 2.25") == "2.25"


def test_gsm8k_scores_flexible_and_strict_as_lm_eval_does():
    # acc: the output's last number (lm-eval's flexible-extract); acc_strict: the number after its first
    # "#### " (strict-match). A model that answers and then writes on is right by one and wrong by the other.
    task = get_task("gsm8k", data=str(FIXTURES / "gsm8k_mini.jsonl"), shots=0)
    item = task.items(1)[0]
    answer = item.answer
    outputs = [f" So it is 3 + 4 = {answer}.\n#### {answer}",  # both
               f" 3 + 4 = {answer}.\n#### {answer}\nHuman: and twice that? It is 99",  # strict only
               f" it is {answer}",  # flexible only: no "#### "
               f" #### 9{answer}\nno, #### {answer}",  # the first "#### " counts
               f" #### {int(answer):,}.\n\nQuestion: what next? 12"]  # cut at the stop: both
    scores = task.process_generations([item], [[o] for o in outputs])
    assert scores["acc"][:, 0].tolist() == [1, 0, 1, 1, 1]
    assert scores["acc_strict"][:, 0].tolist() == [1, 1, 0, 0, 1]
    assert task.metric_names() == ("acc", "acc_strict") and task.identification_metric == "ref_logprob"


def test_gsm8k_generations_stored_before_acc_strict_are_scored_from_their_texts(tmp_path):
    from caploc import wrap_model
    from caploc.evaluator import Evaluator
    from caploc.store import EvalStore
    from tiny import build, byte_tokenizer

    lm = wrap_model(build("llama"), byte_tokenizer(), spec="tiny-llama")
    task = get_task("gsm8k", data=str(FIXTURES / "gsm8k_mini.jsonl"), shots=0)
    items, store = task.items(3), EvalStore(tmp_path / "s.sqlite")
    first = Evaluator(lm, task, items, max_new_tokens=8, store=store).evaluate([[], [1]])
    evaluator = Evaluator(lm, task, items, max_new_tokens=8, store=store)
    for mask in first.masks.keys():  # as an earlier version stored them: acc only
        record = store.get(evaluator.cache.key, mask)
        store.put(evaluator.cache.key, mask, 0, {**record, "scores": {"acc": record["scores"]["acc"]}})
    again = evaluator.evaluate([[], [1]])
    assert evaluator.stats.evaluations == 0 and evaluator.stats.reused == 2  # no generation
    assert again.texts == first.texts
    for metric in ("acc", "acc_strict"):
        np.testing.assert_array_equal(again.scores[metric], first.scores[metric])


def test_gsm8k_from_native_jsonl_with_held_out_exemplars():
    path = str(FIXTURES / "gsm8k_mini.jsonl")
    task = get_task("gsm8k", data=path, shots=2)
    items = task.items(6, seed=0)
    assert len(items) == 6
    first_two = [json.loads(line)["question"] for line in open(path)][:2]
    assert all(q not in item.context for q in first_two for item in items)
    assert all(q in items[0].prefix for q in first_two)
    assert task.items(6, seed=0) == items and task.items(6, seed=1) != items
    assert task.score(items[0], f"blah blah {items[0].answer}.\n\nQuestion: next 999") == 1.0
    assert task.score(items[0], "blah 31337") == 0.0


def test_gsm8k_separate_fewshot_file(tmp_path):
    path = FIXTURES / "gsm8k_mini.jsonl"
    lines = path.read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:3]))
    (tmp_path / "test.jsonl").write_text("\n".join(lines[3:]))
    task = get_task("gsm8k", data=str(tmp_path / "test.jsonl"), fewshot_data=str(tmp_path / "train.jsonl"), shots=3)
    assert len(task.items(5)) == 5


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ("{not json\n", "not valid JSON"),
    ('{"question": "q"}\n', r"bad.jsonl: record 1: field\(s\) 'answer' missing"),
])
def test_gsm8k_bad_files_are_clear_errors(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(CaplocError, match=message):
        get_task("gsm8k", data=str(bad))


def test_missing_file_and_unknown_task():
    with pytest.raises(CaplocError, match="not found"):
        get_task("gsm8k", data="/nonexistent/gsm8k.jsonl")
    with pytest.raises(CaplocError, match="unknown task"):
        get_task("no-such-task")
