"""`coolfusion eval` end to end against a small fake OpenAI-compatible server.

The fake answers deterministically per model id, returns a `fusion_trace` whose winners'
mean PPLs are known, counts requests and measures how many are in flight at once. It runs
in-process (uvicorn on a free loopback port); no model is loaded.
"""

import io
import json
import math
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvicorn
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from coolfusion.evaluation import cli
from coolfusion.evaluation.columns import Column
from coolfusion.evaluation.report import PPL_ROW, build_report, write_report
from coolfusion.evaluation.runner import ResultsMismatch, answer_ppl, find_trace, load_results, run_task
from coolfusion.evaluation.tasks import load_task


# Trace of "oracle" in the server's shape (coolfusion/server/response_bodies.py: `winner` is the winning
# candidate's first proposer): winners' mean PPLs 2.0, (unscored: all agreed), 4.0 -> 3.0.
ORACLE_TRACE = [
    {"text": "The", "winner": "oracle-a", "eos": False, "candidates": [
        {"text": "The", "proposed_by": ["oracle-a"], "ppl": {"a": 1.5, "b": 2.5}, "mean_ppl": 2.0},
        {"text": "A", "proposed_by": ["oracle-b"], "ppl": {"a": 3.0, "b": 5.0}, "mean_ppl": 4.0}]},
    {"text": " total", "winner": "oracle-a", "eos": False, "candidates": [
        {"text": " total", "proposed_by": ["oracle-a", "oracle-b"], "ppl": {}, "mean_ppl": None}]},
    {"text": " is", "winner": "oracle-b", "eos": False, "candidates": [
        {"text": " was", "proposed_by": ["oracle-a"], "ppl": {"a": 1.0, "b": 1.0}, "mean_ppl": 1.0},
        {"text": " is", "proposed_by": ["oracle-b"], "ppl": {"a": 3.0, "b": 5.0}, "mean_ppl": 4.0}]},
]


class FakeServer:
    """Models: "oracle" (always right, with a trace), "wrong" (never right, no trace),
    "slow" (right, sleeps longer). Any other model id gets a 404 like the real server."""

    MODELS = ("oracle", "wrong", "slow")

    def __init__(self):
        self.answers: dict[str, str] = {}  # prompt -> correct answer text
        self.lock = threading.Lock()
        self.reset()
        app = FastAPI()
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat)
        self.app = app

    def reset(self, delay: float = 0.0):
        self.delay = delay
        self.failing: set[str] = set()  # model ids answered with a 400 error
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    # -- endpoints (plain `def`: FastAPI runs them in worker threads, so they overlap)
    def models(self):
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake"} for m in self.MODELS]}

    def completions(self, body: dict = Body(...)):
        return self._answer(body, body["prompt"], chat=False)

    def chat(self, body: dict = Body(...)):
        return self._answer(body, body["messages"][-1]["content"], chat=True)

    def _answer(self, body, prompt, chat):
        model = body["model"]
        if model not in self.MODELS:
            return JSONResponse({"error": {"message": f"model {model!r} not found", "type": "invalid_request_error",
                                           "param": "model", "code": "model_not_found"}}, status_code=404)
        if model in self.failing:
            return JSONResponse({"error": {"message": "broken on purpose", "type": "invalid_request_error",
                                           "param": None, "code": None}}, status_code=400)
        with self.lock:
            self.bodies.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay * (3 if model == "slow" else 1))
            text = " I do not know." if model == "wrong" else self.answers[prompt]
            choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            resp = {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0,
                    "model": model, "choices": [choice],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}
            if model == "oracle" and body.get("fusion", {}).get("trace"):
                resp["fusion_trace"] = ORACLE_TRACE
            return resp
        finally:
            with self.lock:
                self.in_flight -= 1

    @property
    def requests(self) -> int:
        return len(self.bodies)


@pytest.fixture(scope="module")
def fake():
    server = FakeServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not uv.started:
        assert time.time() < deadline, "fake server did not start"
        time.sleep(0.01)
    server.root = f"http://127.0.0.1:{port}"
    yield server
    uv.should_exit = True
    thread.join(5)


@pytest.fixture
def client(fake):
    from openai import OpenAI

    fake.reset()
    return OpenAI(base_url=fake.root + "/v1", api_key="test", max_retries=0, timeout=10)


def _teach(fake, task, items, answer=lambda it: f" The total is {it.target}."):
    for it in items:
        fake.answers[task.prompt(it)] = answer(it)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- perplexity from the trace


def test_answer_ppl_averages_the_winners_mean_ppl_over_scored_steps():
    ppl, used, steps, wins = answer_ppl(ORACLE_TRACE)
    assert (ppl, used, steps) == (3.0, 2, 3)  # (2.0 + 4.0) / 2; the unscored step is left out
    assert wins == {"oracle-a": 2, "oracle-b": 2}
    # the winner is not the lowest candidate: " was" (1.0) lost in step 3, so no min() shortcut
    assert answer_ppl([ORACLE_TRACE[2]])[0] == 4.0
    assert answer_ppl(None) == (None, 0, 0, {})
    # a single-model trace whose candidates were never scored has no PPL
    assert answer_ppl([{"text": "x", "winner": "m", "candidates": [{"text": "x", "proposed_by": ["m"], "mean_ppl": None}]}])[0] is None


def test_winner_is_found_by_text_by_proposer_or_by_flag():
    cands = [{"text": "a", "proposed_by": ["m1"], "mean_ppl": 5.0},
             {"text": "b", "proposed_by": ["m2"], "mean_ppl": 7.0}]
    assert answer_ppl([{"text": "b", "winner": "b", "candidates": cands}])[0] == 7.0
    assert answer_ppl([{"text": "b", "winner": "m2", "candidates": cands}])[0] == 7.0   # winner = proposer name
    assert answer_ppl([{"text": "b", "candidates": cands}])[0] == 7.0                  # by the step's text
    flagged = [dict(cands[0]), dict(cands[1], selected=True)]
    assert answer_ppl([{"text": "?", "candidates": flagged}])[0] == 7.0
    # the trace may sit at the top level, in the choice, or under "fusion"
    assert find_trace({"choices": [{"fusion_trace": ORACLE_TRACE}]}) == ORACLE_TRACE
    assert find_trace({"fusion": {"trace": {"steps": ORACLE_TRACE}}, "choices": [{}]}) == ORACLE_TRACE
    assert find_trace({"choices": [{"text": "x"}]}) is None


# ---------------------------------------------------------------- runner


def test_runner_scores_writes_one_line_per_pair_and_shows_progress(fake, client, tmp_path):
    task = load_task("gsm8k")
    items = task.select(4)
    _teach(fake, task, items)
    bar = io.StringIO()
    s = run_task(task, items, ["oracle", "wrong"], client, tmp_path / "r.jsonl", progress_file=bar)
    assert (s.total, s.done, s.skipped, s.failed) == (8, 8, 0, 0)
    assert "8/8" in bar.getvalue()
    lines = _lines(tmp_path / "r.jsonl")
    assert sorted((r["model"], r["item_id"]) for r in lines) == sorted(
        (m, it.id) for it in items for m in ("oracle", "wrong"))
    by = {(r["model"], r["item_id"]): r for r in lines}
    assert by[("oracle", items[0].id)]["scores"] == {"accuracy": 1.0}
    assert by[("wrong", items[0].id)]["scores"] == {"accuracy": 0.0}
    assert by[("oracle", items[0].id)]["ppl"] == 3.0 and by[("wrong", items[0].id)]["ppl"] is None
    assert all(r["settings"] == task.fingerprint() and r["latency_s"] >= 0 for r in lines)
    body = fake.bodies[0]  # what the server was sent: template settings, greedy, trace request
    assert body["fusion"] == {"trace": True, "judge": True} and body["temperature"] == 0.0
    assert body["max_tokens"] == 256 and body["stop"] == ["Question:", "\n\n"]
    assert body["prompt"] in {task.prompt(it) for it in items}


def test_rerun_is_resumed_from_the_results_file(fake, client, tmp_path):
    task = load_task("lambada")
    items = task.select(5)
    _teach(fake, task, items, lambda it: " " + it.target + " and")
    path = tmp_path / "r.jsonl"
    run_task(task, items[:3], ["oracle", "wrong"], client, path, progress=False)
    assert fake.requests == 6
    again = run_task(task, items[:3], ["oracle", "wrong"], client, path, progress=False)
    assert fake.requests == 6 and (again.skipped, again.done) == (6, 0)  # no new request
    # a crash mid-write leaves a torn last line: it is dropped and that pair redone
    with path.open("a") as f:
        f.write('{"model": "oracle", "item_')
    more = run_task(task, items, ["oracle", "wrong", "slow"], client, path, progress=False)
    assert (more.skipped, more.done) == (6, 9)  # 2 new items x 2 models + 5 items of "slow"
    assert fake.requests == 15
    lines = _lines(path)  # every line parses again
    assert len(lines) == 15 == len({(r["model"], r["item_id"]) for r in lines})
    with pytest.raises(ResultsMismatch, match="another --results"):
        run_task(load_task("lambada", shots=1), items, ["oracle"], client, path, progress=False)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_concurrency_bounds_the_requests_in_flight(fake, client, tmp_path, concurrency):
    task = load_task("squad")
    items = task.select(4)
    _teach(fake, task, items, lambda it: " " + it.target[0] + "\n")
    fake.reset(delay=0.1)
    t0 = time.perf_counter()
    s = run_task(task, items, ["oracle", "wrong"], client, tmp_path / "r.jsonl",
                 concurrency=concurrency, progress=False)
    wall = time.perf_counter() - t0
    assert s.done == 8 and fake.max_in_flight == concurrency
    if concurrency == 4:
        assert wall < 8 * 0.1  # overlapped, faster than one at a time
    assert all(r["scores"]["em"] == 1.0 for r in _lines(tmp_path / "r.jsonl") if r["model"] == "oracle")


def test_failed_requests_are_not_recorded_and_are_retried_next_run(fake, client, tmp_path):
    task = load_task("gsm8k")
    items = task.select(3)
    _teach(fake, task, items)
    path = tmp_path / "r.jsonl"
    s = run_task(task, items, ["oracle", "nope"], client, path, progress=False, max_failures=2)
    assert s.failed == 2 and s.stopped and "nope" in s.errors[0]
    assert {r["model"] for r in _lines(path)} == {"oracle"}
    assert s.done + s.failed < 6  # it stopped sending after 2 failures


# ---------------------------------------------------------------- report and CLI


def test_cli_end_to_end_writes_table_json_and_png(fake, tmp_path, capsys):
    task = load_task("gsm8k")
    _teach(fake, task, task.select(3))
    fake.reset()
    results = tmp_path / "runs" / "g.jsonl"
    argv = ["--task", "gsm8k", "--limit", "3", "--models", "oracle,wrong",
            "--base-url", fake.root, "--results", str(results), "--concurrency", "2", "--no-progress"]
    assert cli.main(argv) == 0
    assert fake.requests == 6
    out = capsys.readouterr().out
    md = (tmp_path / "runs" / "g.md").read_text()
    assert md in out + "\n" or md.split("\n\n")[0] in out  # the printed table is the written one
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ")}
    assert rows["metric"] == ["oracle", "wrong"]
    assert rows[PPL_ROW] == ["3.00", "-"]
    assert rows["accuracy"] == ["1.0000", "0.0000"]
    assert rows["items"] == ["3", "3"]
    report = json.loads((tmp_path / "runs" / "g.json").read_text())
    assert report["columns"]["oracle"]["accuracy"] == 1.0 and report["columns"]["wrong"]["ppl"] is None
    assert (tmp_path / "runs" / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rerun: nothing new is sent; --report-only rebuilds from the file alone, here into --out-dir
    assert cli.main(argv) == 0 and fake.requests == 6
    assert cli.main(["--task", "gsm8k", "--limit", "2", "--results", str(results), "--report-only",
                     "--out-dir", str(tmp_path / "o")]) == 0
    assert fake.requests == 6
    again = json.loads((tmp_path / "o" / "g.json").read_text())
    assert again["models"] == ["oracle", "wrong"] and again["columns"]["oracle"]["items"] == 2


def test_cli_chat_mode_default_models_and_failures(fake, tmp_path, capsys):
    task = load_task("squad", mode="chat")
    _teach(fake, task, task.select(2), lambda it: it.target[0])
    fake.reset()
    results = tmp_path / "s.jsonl"
    # no --models: every id the server lists
    assert cli.main(["--task", "squad", "--mode", "chat", "--limit", "2", "--base-url", fake.root + "/v1",
                     "--results", str(results), "--no-progress"]) == 0
    assert all("messages" in b for b in fake.bodies) and fake.requests == 2 * len(FakeServer.MODELS)
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["models"] == list(FakeServer.MODELS) and report["metrics"] == ["em", "f1"]
    assert report["columns"]["oracle"]["em"] == 1.0 and report["columns"]["wrong"]["f1"] == 0.0
    # failing requests: exit status 1, the table of what was answered is still written
    fake.failing = {"slow"}
    results2 = tmp_path / "f.jsonl"
    code = cli.main(["--task", "squad", "--mode", "chat", "--limit", "2", "--base-url", fake.root,
                     "--models", "oracle,slow", "--results", str(results2), "--no-progress"])
    assert code == 1
    cols = json.loads((tmp_path / "f.json").read_text())["columns"]
    assert (cols["oracle"]["items"], cols["slow"]["items"]) == (2, 0)
    # a model id the server does not list is refused before any request (exit status 2)
    n = fake.requests
    assert cli.main(["--task", "squad", "--limit", "2", "--base-url", fake.root, "--models", "oracle,missing",
                     "--results", str(tmp_path / "m.jsonl"), "--no-progress"]) == 2
    assert fake.requests == n and "does not serve missing" in capsys.readouterr().err
    # other settings in the same file are refused with exit status 2
    assert cli.main(["--task", "squad", "--limit", "2", "--base-url", fake.root, "--models", "oracle",
                     "--results", str(results), "--no-progress"]) == 2
    assert "another --results" in capsys.readouterr().err


def test_report_writes_md_json_png_for_two_metrics(tmp_path, monkeypatch):
    (tmp_path / "squad_dev_public.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "title": "t", "context": "c", "question": "q", "answers": ["x"]}) + "\n"
                for i in range(3)))
    monkeypatch.setenv("COOLFUSION_DATA", str(tmp_path))
    task = load_task("squad")
    items = task.select()
    recs = [{"model": m, "item_id": it.id, "scores": {"em": em, "f1": em}, "ppl": 2.0, "latency_s": 0.5}
            for it in items for m, em in (("a", 1.0), ("b", 0.0))]
    report = build_report(task, recs + [{"model": "a", "item_id": "squad/other", "scores": {"em": 0, "f1": 0}}],
                          ["b", "a"], items)
    assert report["columns"]["a"]["em"] == 1.0 and report["columns"]["a"]["items"] == 3  # foreign item ignored
    assert report["columns"]["b"]["time_s"] == 1.5
    paths = write_report(report, tmp_path / "out", "sq")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "| metric | b | a |" in paths["md"].read_text()


def test_python_dash_m_evaluation_runs():
    r = subprocess.run([sys.executable, "-m", "coolfusion.evaluation", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--concurrency" in r.stdout and "--report-only" in r.stdout


def test_report_only_orders_models_as_the_run_did_whatever_order_answers_landed_in():
    from coolfusion.evaluation.runner import models_in_column_order

    landed = [{"model": "wrong", "column": 1}, {"model": "oracle", "column": 0}, {"model": "wrong", "column": 1}]
    assert models_in_column_order(landed) == ["oracle", "wrong"]
    assert models_in_column_order([{"model": "b"}, {"model": "a"}]) == ["b", "a"]  # older files: as they appear


# ---------------------------------------------------------------- columns with fusion settings


def test_column_labels_split_into_a_model_id_and_fusion_settings():
    from coolfusion.evaluation.columns import parse_column, split_columns

    assert parse_column("cool-fusion") == Column("cool-fusion", "cool-fusion")
    assert parse_column("cool-fusion:geo_mean_ppl").fusion == {"select": "geo_mean_ppl"}
    assert parse_column("cool-fusion:select=weighted+weights=auto").fusion == {"select": "weighted", "weights": "auto"}
    c = parse_column('cool-fusion:{"score_end": {"gemma3-270m": false}}')
    assert (c.model, c.fusion) == ("cool-fusion", {"score_end": {"gemma3-270m": False}})
    assert parse_column("org:model").model == "org:model"  # a ':' in a model name is not settings
    assert parse_column("org:model:max_ppl").model == "org:model"
    assert not parse_column("cool-fusion:max_ppl").is_source and parse_column("smollm2-135m").is_source
    assert split_columns('a,b:{"weights": {"x": 1, "y": 2}, "select": "weighted"},a') == [
        "a", 'b:{"weights": {"x": 1, "y": 2}, "select": "weighted"}']


@pytest.mark.parametrize("column", ["oracle:selct=max_ppl", 'oracle:{"select": "max_ppl", "traces": true}',
                                    "oracle:select=weighted+wieghts=auto"])
def test_a_column_with_an_unknown_fusion_key_is_refused_before_anything_is_sent(fake, tmp_path, capsys, column):
    fake.reset()
    argv = ["--task", "gsm8k", "--limit", "1", "--models", f"oracle,{column}",
            "--base-url", fake.root, "--results", str(tmp_path / "u.jsonl"), "--no-progress"]
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert fake.bodies == [] and not (tmp_path / "u.jsonl").exists()
    err = capsys.readouterr().err
    assert "is not a key of the fusion object" in err and "select, weights, end_scoring" in err


def test_a_columns_settings_go_in_every_requests_fusion_object_and_in_its_results(fake, tmp_path, capsys):
    task = load_task("gsm8k")
    _teach(fake, task, task.select(2))
    fake.reset()
    results = tmp_path / "c.jsonl"
    argv = ["--task", "gsm8k", "--limit", "2", "--models", "oracle,oracle:max_ppl,wrong",
            "--base-url", fake.root, "--results", str(results), "--no-progress"]
    assert cli.main(argv) == 0
    sent = [(b["model"], b.get("fusion", {}).get("select") or "") for b in fake.bodies]
    assert sorted(sent) == sorted([("oracle", ""), ("oracle", "max_ppl"), ("wrong", "")] * 2)
    lines = _lines(results)
    assert {(r["model"], r["model_id"], json.dumps(r["fusion"])) for r in lines} == {
        ("oracle", "oracle", "{}"), ("oracle:max_ppl", "oracle", '{"select": "max_ppl"}'), ("wrong", "wrong", "{}")}
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["models"] == ["oracle", "oracle:max_ppl", "wrong"]
    assert report["baseline"] == "oracle"  # the better source model; oracle:max_ppl has settings
    assert report["paired"]["accuracy"]["wrong"] == {"diff": -1.0, "se": 0.0, "n": 2}
    assert "Δ accuracy vs oracle (± SE)" in capsys.readouterr().out


def test_the_paired_difference_is_the_mean_per_item_difference_with_its_standard_error():
    task = load_task("lambada")
    items = task.select(4)

    def rec(model, item, acc, finish="stop"):
        return {"model": model, "item_id": item.id, "scores": {"accuracy": acc}, "ppl": None,
                "latency_s": 0.1, "finish_reason": finish}

    a, b = [1, 0, 1, 1], [1, 1, 0, 0]  # source a: 0.75, source b: 0.5; fused f below
    f = [1, 1, 1, 0]
    records = [rec("a", it, x) for it, x in zip(items, a)] + [rec("b", it, x) for it, x in zip(items, b)]
    records += [rec("cool-fusion", it, x, "length") for it, x in zip(items, f)]
    report = build_report(task, records, ["a", "b", "cool-fusion"], items)
    assert report["baseline"] == "a"
    d = [x - y for x, y in zip(f, a)]  # 0, 1, 0, -1: mean 0, sd sqrt(2/3)
    p = report["paired"]["accuracy"]["cool-fusion"]
    assert p["n"] == 4 and p["diff"] == pytest.approx(sum(d) / 4)
    assert p["se"] == pytest.approx(math.sqrt(sum((x - sum(d) / 4) ** 2 for x in d) / 3) / 2)
    assert report["columns"]["a"]["ended"] == 1.0 and report["columns"]["cool-fusion"]["ended"] == 0.0
