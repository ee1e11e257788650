"""lm-evaluation-harness as an outside client of the server (issue 5), on the real embedded pair.

`lm_eval` runs as a subprocess, exactly as a user would run it, against a real uvicorn on
loopback: once with `local-completions` (prompt strings to /v1/completions) and once with
`local-chat-completions --apply_chat_template` (messages to /v1/chat/completions). The tasks
are tests/lm_eval_tasks/coolfusion_qa.yaml and its chat twin coolfusion_qa_chat.yaml,
generate_until tasks over a local JSONL (the server refuses logprobs/echo, so loglikelihood
tasks cannot run), with the datasets/hub offline.

Each test checks: exit code 0; the results JSON holds the task's metric; the samples file has
one response per item that respects the task's stop strings; and the server's own
/metrics counted exactly one successful POST per item on the route lm_eval should have used.
Most of each test's time is lm_eval's start-up (it indexes all its built-in task YAMLs: about
15 s of CPU, 30-50 s on 2 busy cores); generation is at most 8 tokens per item.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import httpx
import pytest

from fusion.config import ServerConfig
from server.app import create_app
from server.testing import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
INCLUDE_PATH = "tests/lm_eval_tasks"  # relative to ROOT, as in the README's command
METRIC = "exact_match,last-word"  # metric,filter as lm_eval names it in results.json
LIMIT = 3

pytestmark = pytest.mark.skipif(
    not all(find_spec(m) for m in ("lm_eval", "aiohttp", "tenacity", "requests")),
    reason="lm-evaluation-harness with its API extra is not installed (pip install 'lm-eval[api]')",
)

_SAMPLE = re.compile(r"^coolfusion_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@pytest.fixture(scope="module")
def base_url(engine):
    with serve_in_thread(create_app(engine, ServerConfig())) as url:
        yield url


def request_counts(base_url: str) -> dict[tuple[str, str, str], float]:
    """coolfusion_requests_total from the server's /metrics, keyed by (method, route, status)."""
    text = httpx.get(base_url + "/metrics", timeout=30).text
    counts = {}
    for m in _SAMPLE.finditer(text):
        labels = dict(_LABEL.findall(m["labels"]))
        counts[(labels["method"], labels["route"], labels["status"])] = float(m["value"])
    return counts


def run_lm_eval(tmp_path: Path, task: str, model: str, model_args: str, *extra: str) -> Path:
    """Run lm_eval against the server; returns its output folder after checking the exit code."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"),  # the JSONL's arrow cache stays here
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable, "-m", "lm_eval",
        "--model", model,
        "--model_args", model_args,
        *extra,
        "--tasks", task,
        "--include_path", INCLUDE_PATH,
        "--limit", str(LIMIT),
        "--output_path", str(out),
        "--log_samples",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"lm_eval exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out


def check_outputs(out: Path, task_name: str) -> list[str]:
    """The results JSON has the task's metric for LIMIT items; returns the raw responses."""
    results = sorted(out.rglob("results_*.json"))
    assert len(results) == 1, f"expected one results file under {out}: {list(out.rglob('*'))}"
    report = json.loads(results[0].read_text())
    row = report["results"][task_name]
    assert METRIC in row, f"{METRIC} not in {row}"
    assert 0.0 <= row[METRIC] <= 1.0
    assert row["sample_len"] == LIMIT

    samples = sorted(out.rglob(f"samples_{task_name}_*.jsonl"))
    assert len(samples) == 1
    lines = [json.loads(line) for line in samples[0].read_text().splitlines() if line.strip()]
    assert len(lines) == LIMIT
    responses = [s["resps"][0][0] for s in lines]
    assert all(isinstance(r, str) for r in responses)
    # the task's stop strings (both tasks stop at "\n") reached the server, which cut before them
    assert not any("\n" in r for r in responses), responses
    assert any(r.strip() for r in responses), f"the server returned only empty texts: {responses}"
    return responses


def check_server_saw(base_url: str, before: dict, route: str) -> None:
    after = request_counts(base_url)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    route_delta = {k: v for k, v in delta.items() if k[1] == route}
    # one successful request per item (batch_size 1, no retries), and no failed ones
    assert route_delta == {("POST", route, "200"): LIMIT}, delta


def test_lm_eval_local_completions_runs_against_the_server(base_url, tmp_path):
    before = request_counts(base_url)
    model_args = (
        f"model=cool-fusion,base_url={base_url}/v1/completions,tokenizer_backend=None,"
        "tokenized_requests=False,num_concurrent=1,max_retries=1,max_gen_toks=8"
    )
    out = run_lm_eval(tmp_path, "coolfusion_qa", "local-completions", model_args)
    check_outputs(out, "coolfusion_qa")
    check_server_saw(base_url, before, "/v1/completions")


def test_lm_eval_local_chat_completions_runs_against_the_server(base_url, tmp_path):
    before = request_counts(base_url)
    model_args = f"model=cool-fusion,base_url={base_url}/v1/chat/completions,num_concurrent=1,max_retries=1,max_gen_toks=8"
    out = run_lm_eval(tmp_path, "coolfusion_qa_chat", "local-chat-completions", model_args, "--apply_chat_template")
    check_outputs(out, "coolfusion_qa_chat")
    check_server_saw(base_url, before, "/v1/chat/completions")
