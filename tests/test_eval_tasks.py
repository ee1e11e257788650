"""Task readers and prompts against the real data files (coolfusion/evaluation/tasks.py)."""

import json

import pytest

from coolfusion.evaluation import tasks
from coolfusion.evaluation.tasks import TaskError, load_task

DATA = tasks.default_data_dir()  # found exactly as `coolfusion eval` finds it


def _jsonl(name):
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_gsm8k_few_shot_examples_come_from_the_file_start_and_are_not_evaluated():
    rows = _jsonl("gsm8k_test_public.jsonl")
    task = load_task("gsm8k")
    assert task.shots == 3 and task.mode == "completion"
    assert len(task.items) == len(rows) - 3
    assert task.items[0].id == "gsm8k/3"
    assert task.items[0].fields["question"] == rows[3]["question"]
    assert {it.fields["question"] for it in task.items}.isdisjoint(r["question"] for r in rows[:3])
    prompt = task.prompt(task.items[0])
    assert prompt.count("Question:") == 4
    assert prompt.startswith("Question: " + rows[0]["question"] + "\nAnswer: ")
    assert prompt.endswith("Question: " + rows[3]["question"] + "\nAnswer:")
    assert "<<" not in prompt and "#### 18" in prompt  # calculator notes dropped, answers kept
    for it, row in zip(task.items[:50], rows[3:53]):
        assert it.target == row["answer"].split("#### ")[-1].strip().replace(",", "")
        assert it.target.lstrip("-").replace(".", "").isdigit()
    req = task.request(task.items[0])
    assert req.max_tokens == 256 and "Question:" in req.stop


def test_gsm8k_shots_option_changes_examples_and_items():
    rows = _jsonl("gsm8k_test_public.jsonl")
    zero = load_task("gsm8k", shots=0)
    assert len(zero.items) == len(rows)
    assert zero.prompt(zero.items[0]) == "Question: " + rows[0]["question"] + "\nAnswer:"
    five = load_task("gsm8k", shots=5)
    assert five.items[0].id == "gsm8k/5" and five.prompt(five.items[0]).count("Question:") == 6
    assert five.fingerprint() != load_task("gsm8k").fingerprint()


def test_lambada_prompt_is_the_passage_without_its_last_word_and_no_trailing_space():
    rows = _jsonl("lambada_test_public.jsonl")
    task = load_task("lambada")
    assert len(task.items) == len(rows)
    for it, row in zip(task.items, rows):
        prompt = task.prompt(it)
        assert prompt + " " + it.target == row["text"].rstrip()
        assert not prompt.endswith((" ", "\n")) and " " not in it.target
    req = task.request(task.items[0])
    assert (req.mode, req.max_tokens) == ("completion", 6)
    assert task.score(" " + task.items[0].target + ".", task.items[0]) == {"accuracy": 1.0}


def test_squad_prompt_is_instruction_one_example_then_passage_question_answer():
    rows = _jsonl("squad_dev_public.jsonl")
    task = load_task("squad")
    assert len(task.items) == len(rows) == len({it.id for it in task.items})  # every item, ids unique
    it, row = task.items[0], rows[0]
    prompt = task.prompt(it)
    assert prompt.startswith("Answer each question with a short phrase copied from the passage.\n\n")
    assert prompt.count("Passage: ") == 2 and prompt.count("\nAnswer:") == 2
    assert prompt.endswith(f"Passage: {row['context']}\nQuestion: {row['question']}\nAnswer:")
    req = task.request(it)
    assert (req.max_tokens, req.stop) == (24, ("\n",))
    assert it.target == tuple(row["answers"])
    s = task.score(" the " + row["answers"][0] + "\nQuestion: next", it)  # first line only
    assert s == {"em": 1.0, "f1": 1.0}
    assert task.score(" Nowhere", it) == {"em": 0.0, "f1": 0.0}


def test_mgsm_reads_question_tab_answer():
    task = load_task("mgsm_zh")
    assert len(task.items) == 250 - 3
    assert all(it.target.lstrip("-").isdigit() for it in task.items)
    assert task.prompt(task.items[0]).count("Question:") == 4


def test_template_file_sets_mode_and_prompt(tmp_path):
    tpl = tmp_path / "t.yaml"
    tpl.write_text('mode: chat\nshots: 0\ninstruction: "Solve."\nquery: "Q: {question}\\nA:"\n'
                   'max_tokens: 32\nstop: ["\\n"]\n')
    task = load_task("gsm8k", template=tpl)
    req = task.request(task.items[0])
    assert req.mode == "chat" and req.max_tokens == 32 and req.stop == ("\n",)
    assert req.messages() == [{"role": "user", "content": "Solve.\n\nQ: " + task.items[0].fields["question"] + "\nA:"}]
    assert load_task("gsm8k", template=tpl, mode="completion", max_tokens=8).request(task.items[0]).max_tokens == 8


def test_bad_templates_fail_with_a_message_naming_the_problem(tmp_path):
    bad_field = tmp_path / "f.yaml"
    bad_field.write_text('query: "{passage}"\n')
    with pytest.raises(TaskError, match=r"\{passage\}"):
        load_task("squad", template=bad_field)
    bad_key = tmp_path / "k.yaml"
    bad_key.write_text('query: "{question}"\nmax_token: 5\n')
    with pytest.raises(TaskError, match="max_token"):
        load_task("gsm8k", template=bad_key)
    with pytest.raises(TaskError, match="only 1 worked example"):
        load_task("squad", shots=2)
    with pytest.raises(TaskError, match="unknown task"):
        load_task("trivia")


def test_data_dir_comes_from_coolfusion_data(tmp_path, monkeypatch):
    (tmp_path / "lambada_test_public.jsonl").write_text('{"text": "one two three"}\n{"text": "a b"}\n')
    monkeypatch.setenv("COOLFUSION_DATA", str(tmp_path))
    assert tasks.default_data_dir() == tmp_path
    task = load_task("lambada")
    assert [(task.prompt(it), it.target) for it in task.items] == [("one two", "three"), ("a", "b")]
    monkeypatch.setenv("COOLFUSION_DATA", str(tmp_path / "missing"))
    with pytest.raises(TaskError, match="no data directory"):
        load_task("lambada")


def test_the_data_ships_in_the_package_with_a_licence_for_every_file(monkeypatch):
    """Without --data-dir or COOLFUSION_DATA every task reads the copy inside the package, so
    a clone (or an installed copy) needs no folder beside it; each file names its licence."""
    monkeypatch.delenv("COOLFUSION_DATA", raising=False)
    assert tasks.default_data_dir() == tasks.BUNDLED_DATA_DIR == tasks.PROMPTS_DIR.parent / "data"
    readme = (tasks.BUNDLED_DATA_DIR / "README.md").read_text(encoding="utf-8")
    for name in tasks.TASK_NAMES:
        task = load_task(name)
        assert task.data_path.parent == tasks.BUNDLED_DATA_DIR and len(task.items) > 0, name
    for f in sorted(tasks.BUNDLED_DATA_DIR.iterdir()):
        assert f.stat().st_size < 2_000_000, f  # modest files only
        if f.name.startswith("LICENSE-") or f.name == "README.md":
            continue
        row = next((line for line in readme.splitlines() if line.startswith("| `") and
                    (f"`{f.name}`" in line or (f.name.startswith("mgsm_") and "`mgsm_{" in line))), None)
        assert row is not None, f"{f.name} is not described in data/README.md"
        licence = row.split("`LICENSE-")[1].split("`")[0]
        assert (tasks.BUNDLED_DATA_DIR / f"LICENSE-{licence}").is_file(), (f.name, licence)
