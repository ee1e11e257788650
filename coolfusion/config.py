"""The configuration file (config.yaml): schema, defaults and strict validation.

Config is strict and frozen: an unknown key or a bad value fails at start-up with a
message that names the key (`models.1.device: ...`). Defaults live here and nowhere else.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coolfusion.core import selection
from coolfusion.core.errors import ConfigError, InvalidRequest
from coolfusion.extras import install_command
from coolfusion.runtime.packages import package_dir

_STRICT = ConfigDict(extra="forbid", frozen=True)
_ORIGIN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]+$")  # scheme://host[:port], as browsers send it
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


class ModelConfig(BaseModel):
    """One source model.

    Where the weights come from, one of:
    - `path`: a Hugging Face id or a local directory (with `gguf_file` for a GGUF inside it);
    - `package`: an installed Python package that ships a GGUF (`gguf_file` names the file in
      the package folder) or assembles one (a package with an `assemble()` function, whose
      output is cached outside the repository).
    """

    model_config = _STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
                      description="the model id clients ask for (/v1/models); unique, not a fused id")
    path: str | None = Field(None, description="a Hugging Face id or a local directory (give `path` or `package`)")
    package: str | None = Field(None, description="an installed Python package that ships or assembles a GGUF "
                                                  "(give `path` or `package`)")
    gguf_file: str | None = Field(None, description="the GGUF file inside `path` or the package folder")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="the weights' dtype; auto: bfloat16 on CUDA, float32 on CPU and for GGUF")
    chat_template: str | None = Field(None, description="a built-in name (coolfusion/core/chat.py) or a Jinja "
                                                        "template; unset: the tokenizer's own")
    stop_tokens: tuple[str, ...] = Field((), description="extra tokens that end a turn, besides the EOS token")
    context_limit: int | None = Field(None, gt=0, description="prompt plus answer tokens, at most; unset: the "
                                                              "model's own maximum")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of 'path' or 'package'")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {v!r}")


class FusionConfig(BaseModel):
    """How the fusion loop runs. The selection keys (`select`, `weights`, `auto_temperature`,
    `end_scoring`, `score_end`; coolfusion/core/selection.py) can be overridden per request in
    the request's `fusion` object."""

    model_config = _STRICT

    max_segment_tokens: int = Field(16, gt=0, le=256, description="cap on one proposal's tokens")
    score: Literal["mean_nll", "nll_sum"] = Field(
        "mean_nll", description="PPL = exp(mean NLL) (the paper's text) or exp(sum of NLL)")
    parallel: bool = Field(True, description="run the models' propose, score and commit in parallel threads")
    fast_paths: bool = Field(True, description="false turns every shortcut off (lookahead and KV reuse, skipped "
                                               "scoring, tail-only re-tokenization, threads): a slow reference "
                                               "that must give the same text")
    default_max_tokens: int = Field(256, gt=0, description="max_tokens of a request that gives none")
    batching: bool = Field(True, description="per model, the forwards of every running request in one forward "
                                             "over preallocated KV slots (coolfusion/runtime/batched_runner.py, "
                                             "docs/batching.md); false: one forward at a time, a growing cache per request")
    kv_slots: int = Field(32, gt=0, description="with batching: KV slots per model, each kv_max_tokens long (a request "
                                                "holds 1, 2 with judge or rerank, and a fused log-likelihood's walks up "
                                                "to half the free ones; 32 = four per server.max_concurrent generation); "
                                                "reserved at start-up, on the CPU touched only as requests fill them")
    kv_max_tokens: int = Field(4096, gt=0, description="with batching: tokens per KV slot; caps every model's context")
    max_batch_tokens: int = Field(2048, gt=0, description="with batching: new tokens in one batched forward, at most")
    select: selection.Rule = Field(selection.DEFAULT_RULE, description="the selection rule: how a candidate's "
                                   "per-model perplexities make its score (coolfusion/core/selection.py)")
    weights: dict[str, float] | Literal["auto"] = Field(
        {}, description="with select: weighted, per model (unlisted: 1); auto: per request, from how well "
                        "each model predicts the prompt")
    auto_temperature: float = Field(selection.DEFAULT_AUTO_TEMPERATURE, gt=0, description="T of `weights: auto`")
    end_scoring: selection.EndScoring = Field(
        selection.DEFAULT_END_SCORING, description="how a candidate that ends the turn is scored: on its text "
        "(the paper's reading) or with each model's end token appended")
    score_end: dict[str, bool] = Field({}, description="per model: false = its end predictions do not count")
    # Speculative proposals (docs/speculative.md); overridable per request in `fusion`
    speculative: bool = Field(default=False, description=(
        "greedy requests of the fused ids: one model drafts its proposal and the others check the "
        "draft in one forward each instead of decoding their own; the text is the same"))
    drafter: str = Field(default="winner", description=(
        "who drafts with `speculative`: winner (the last step's winner; the fastest on the first step), "
        "fastest (cheapest measured forward), or a model's name; winner by measurement, docs/speculative.md"))
    speculative_max_requests: int = Field(default=1, ge=1, description=(
        "with `speculative`: a step speculates only while at most this many requests are generating "
        "on the engine; under more load it proposes plainly, whose forwards batch better "
        "(measured in docs/speculative.md)"))


class ServerConfig(BaseModel):
    """HTTP server settings; every one can be overridden by a `coolfusion serve` flag."""

    model_config = _STRICT

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' on every route but /health "
                                                  "(unset: no auth); env COOLFUSION_API_KEY overrides it")
    max_concurrent: int = Field(8, gt=0, description="generations running at once; with fusion.batching their "
                                                    "forwards meet in one batch per model (8: the batch limit of a "
                                                    "2-core CPU on the embedded pair, docs/batching.md)")
    max_queue: int = Field(32, ge=0, description="requests waiting for a slot; beyond: 429")
    request_timeout_s: float = Field(600.0, gt=0, description="per-request time limit in seconds, queueing included")
    max_body_bytes: int = Field(1_048_576, gt=0, description="largest request body; beyond: 413")
    shutdown_grace_s: float = Field(10.0, ge=0, description="on SIGINT/SIGTERM, seconds running generations may "
                                                            "finish before they are cancelled")
    # CORS (docs/browser-clients.md): which other origins' pages may call the API from a browser
    cors_allowed_origins: tuple[str, ...] = Field(default=(), description=(
        "origins (scheme://host[:port], no path) whose pages may call the API from a browser, or '*' for any; "
        "empty: no CORS headers, only same-origin pages (the built-in chat page) can call it"))
    cors_allowed_methods: tuple[str, ...] = Field(default=("GET", "POST"), description=(
        "HTTP methods a cross-origin page may use ('*': all); the API needs only GET and POST"))
    cors_allowed_headers: tuple[str, ...] = Field(default=("*",), description=(
        "request headers a cross-origin page may send ('*': whatever its preflight asks for, "
        "Authorization included); JavaScript clients add their own, e.g. the openai package's X-Stainless-*"))
    cors_allow_credentials: bool = Field(default=False, description=(
        "let cross-origin pages send cookies and HTTP auth (a proxy's login, say); the API key as a "
        "Bearer header needs no credentials; not with '*' in cors_allowed_origins"))

    @field_validator("cors_allowed_origins")
    @classmethod
    def _origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"{origin!r} is not an origin: scheme://host[:port], with no path or "
                                 "trailing slash (e.g. http://localhost:3000), or '*'")
        return origins

    @field_validator("cors_allowed_methods")
    @classmethod
    def _methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        methods = tuple(m.upper() for m in methods)
        for m in methods:
            if m != "*" and m not in HTTP_METHODS:
                raise ValueError(f"{m!r} is not an HTTP method ({', '.join(HTTP_METHODS)} or '*')")
        return methods

    @model_validator(mode="after")
    def _no_credentials_for_every_origin(self) -> "ServerConfig":
        if self.cors_allow_credentials and "*" in self.cors_allowed_origins:
            raise ValueError("cors_allow_credentials: true with '*' in cors_allowed_origins would let every "
                             "site send the user's cookies; list the origins instead")
        return self


class RayResources(BaseModel):
    """What one model's Ray actor asks the cluster for (unset: the `ray:` section's value)."""

    model_config = _STRICT

    num_cpus: float | None = Field(None, ge=0, description="CPUs for this model's actor")
    num_gpus: float | None = Field(None, ge=0, description="GPUs for this model's actor")


class RayConfig(BaseModel):
    """`backend: ray`: every source model runs in its own Ray actor (coolfusion/workers/ray_proxy.py)."""

    model_config = _STRICT

    address: str | None = Field(None, description="auto (a running cluster), local (start one) or "
                                                  "ray://host:10001; unset: Ray's default")
    runtime_env: dict[str, Any] | None = Field(None, description="passed to ray.init (e.g. working_dir, pip)")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per actor, unless set under `models`")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor, unless set under `models`")
    models: dict[str, RayResources] = Field({}, description="per model name: its own num_cpus and num_gpus")
    max_restarts: int = Field(-1, ge=-1, description="Ray restarts of a dead actor (-1: always)")
    start_timeout_s: float = Field(900.0, gt=0, description="seconds to wait for an actor to load its model")

    def resources(self, name: str) -> RayResources:
        own = self.models.get(name) or RayResources()
        return RayResources(num_cpus=self.num_cpus if own.num_cpus is None else own.num_cpus,
                            num_gpus=self.num_gpus if own.num_gpus is None else own.num_gpus)


class Config(BaseModel):
    """The whole file."""

    model_config = _STRICT

    models: tuple[ModelConfig, ...] = Field(min_length=1, description="the source models, at least one; the "
                                            "first one's tokenizer is the reference for the fused ids")
    fusion: FusionConfig = Field(FusionConfig(), description="how the fusion loop runs")
    server: ServerConfig = Field(ServerConfig(), description="the HTTP server")
    backend: Literal["local", "ray"] = Field("local", description="where the source models run: in this "
                                             "process, or each in its own Ray actor")
    ray: RayConfig = Field(RayConfig(), description="the Ray backend (with backend: ray)")

    @model_validator(mode="after")
    def _checks(self) -> "Config":
        from coolfusion.core.types import VARIANTS

        names = [m.name for m in self.models]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ValueError(f"models.{i}.name: duplicate model name {n!r}")
            if n in VARIANTS:
                raise ValueError(f"models.{i}.name: {n!r} is reserved for a fused variant")
        for n in self.ray.models:
            if n not in names:
                raise ValueError(f"ray.models.{n}: no model named {n!r} in models")
        try:  # the same checks as a request's `fusion` settings
            if isinstance(self.fusion.weights, dict):
                selection.check_weights(self.fusion.weights, names, "fusion.weights")
            selection.check_names(self.fusion.score_end, names, "fusion.score_end")
            if self.fusion.drafter not in ("fastest", "winner") and self.fusion.drafter not in names:
                raise InvalidRequest(f"fusion.drafter: must be fastest, winner or a model name "
                                     f"({', '.join(names)}), not {self.fusion.drafter!r}")
        except InvalidRequest as err:
            raise ValueError(str(err)) from None
        if self.backend == "ray":
            for i, m in enumerate(self.models):
                if m.device.startswith("cuda") and self.ray.resources(m.name).num_gpus <= 0:
                    raise ValueError(f"models.{i}.device: {m.device!r} with backend ray needs "
                                     f"ray.num_gpus or ray.models.{m.name}.num_gpus > 0")
        return self


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(lines)


def parse_config(data: dict) -> Config:
    """Validate a config mapping; raise ConfigError naming the bad key."""
    try:
        cfg = Config.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format(err)) from None
    if cfg.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(f"backend: 'ray' needs the Ray package, which is not installed "
                          f"({install_command('ray')})")
    for i, m in enumerate(cfg.models):
        check_source(i, m)
    return cfg


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping with a 'models' key")
    return parse_config(data)


def check_source(i: int, m: ModelConfig) -> None:
    """Fail early (before any weights load) on a missing package or file. (An impossible
    device is the runtime's to check: coolfusion.runtime.loading.check_devices.)"""
    if m.package is not None:
        pkg_dir = package_dir(m.package, key=f"models.{i}.package")  # names the pip command if missing
        if m.gguf_file is not None:
            f = pkg_dir / m.gguf_file
            if not f.is_file():
                raise ConfigError(f"models.{i}.gguf_file: {m.gguf_file!r} not found in package {m.package!r}")
    elif m.path is not None and Path(m.path).exists():
        if m.gguf_file is not None and not (Path(m.path) / m.gguf_file).is_file():
            raise ConfigError(f"models.{i}.gguf_file: {m.gguf_file!r} not found in {m.path}")
    elif m.path is not None and (m.path.startswith((".", "/", "~")) or m.path.count("/") > 1):
        raise ConfigError(f"models.{i}.path: local directory {m.path!r} does not exist")
