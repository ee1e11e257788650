"""The configuration file (config.yaml): schema, defaults and strict validation.

Config is strict and frozen: an unknown key or a bad value fails at start-up with a
message that names the key (`models.1.device: ...`). Defaults live here and nowhere else.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coolfusion.core.errors import ConfigError
from coolfusion.runtime.packages import package_dir

_STRICT = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(BaseModel):
    """One source model.

    Where the weights come from, one of:
    - `path`: a Hugging Face id or a local directory (with `gguf_file` for a GGUF inside it);
    - `package`: an installed Python package that ships a GGUF (`gguf_file` names the file in
      the package folder) or assembles one (a package with an `assemble()` function, whose
      output is cached outside the repository).
    """

    model_config = _STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    path: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    chat_template: str | None = None  # a built-in name (see coolfusion/core/chat.py) or a Jinja template
    stop_tokens: tuple[str, ...] = ()  # extra tokens that end a turn, besides the EOS token
    context_limit: int | None = Field(default=None, gt=0)  # default: the model's own maximum

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
    """How the fusion loop runs."""

    model_config = _STRICT

    max_segment_tokens: int = Field(default=16, gt=0, le=256)  # cap on one proposal
    score: Literal["mean_nll", "nll_sum"] = "mean_nll"  # PPL = exp(mean NLL) (paper text) or exp(sum)
    parallel: bool = True  # run the models' propose/score/commit in parallel threads
    # False turns every shortcut off (lookahead and KV reuse, skipped scoring, tail-only
    # re-tokenization, threads): a slow reference that must give the same text.
    fast_paths: bool = True
    default_max_tokens: int = Field(default=256, gt=0)
    batching: bool = Field(default=True, description=(
        "Per model, the forwards of every running request in one forward over preallocated KV slots "
        "(coolfusion/runtime/batched_runner.py, docs/batching.md). False: one forward at a time, a "
        "growing cache per request."))
    kv_slots: int = Field(default=16, gt=0, description=(
        "With batching: KV slots per model, each kv_max_tokens long (a request holds 1, 2 with judge; "
        "16 = two per server.max_concurrent generation). Reserved at start-up; on the CPU the pages are "
        "touched only as requests fill them."))
    kv_max_tokens: int = Field(default=4096, gt=0, description=(
        "With batching: tokens per KV slot; caps every model's context."))
    max_batch_tokens: int = Field(default=2048, gt=0)  # new tokens in one batched forward, at most
    # Selection (coolfusion/core/selection.py; each can be overridden per request in `fusion`)
    select: Literal["mean_ppl", "geo_mean_ppl", "max_ppl", "min_ppl", "weighted"] = "mean_ppl"
    weights: dict[str, float] | Literal["auto"] = {}  # per model, for select: weighted (default 1)
    auto_temperature: float = Field(default=1.0, gt=0)  # T of `weights: auto`
    # how a candidate that ends the turn is scored; `text` (the paper's reading) by measurement:
    # README "Selection rules", ending a turn
    end_scoring: Literal["end_token", "text"] = "text"
    score_end: dict[str, bool] = {}  # per model: false = its end predictions do not count


class ServerConfig(BaseModel):
    """HTTP server settings; every one can be overridden on the command line."""

    model_config = _STRICT

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = None  # also COOLFUSION_API_KEY
    max_concurrent: int = Field(default=8, gt=0, description=(
        "Generations running at once; with fusion.batching their forwards meet in one batch per model "
        "(8: the batch limit of a 2-core CPU on the embedded pair, docs/batching.md)."))
    max_queue: int = Field(default=32, ge=0)  # requests waiting for a slot; beyond: 429
    request_timeout_s: float = Field(default=600.0, gt=0)
    max_body_bytes: int = Field(default=1_048_576, gt=0)


class RayResources(BaseModel):
    """What one model's Ray actor asks the cluster for (unset: the `ray:` section's value)."""

    model_config = _STRICT

    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)


class RayConfig(BaseModel):
    """`backend: ray`: every source model runs in its own Ray actor (coolfusion/workers/ray_proxy.py)."""

    model_config = _STRICT

    address: str | None = None  # "auto" (running cluster), "local" (start one), "ray://host:10001"; None: Ray's default
    runtime_env: dict[str, Any] | None = None  # passed to ray.init (e.g. working_dir, pip)
    num_cpus: float = Field(default=1.0, ge=0)  # per actor, unless set under `models`
    num_gpus: float = Field(default=0.0, ge=0)  # per actor, unless set under `models`
    models: dict[str, RayResources] = {}  # per model name: {num_cpus, num_gpus}
    max_restarts: int = Field(default=-1, ge=-1)  # Ray restarts of a dead actor (-1: always)
    start_timeout_s: float = Field(default=900.0, gt=0)  # wait for an actor to load its model

    def resources(self, name: str) -> RayResources:
        own = self.models.get(name) or RayResources()
        return RayResources(num_cpus=self.num_cpus if own.num_cpus is None else own.num_cpus,
                            num_gpus=self.num_gpus if own.num_gpus is None else own.num_gpus)


class Config(BaseModel):
    model_config = _STRICT

    models: tuple[ModelConfig, ...] = Field(min_length=1)
    fusion: FusionConfig = FusionConfig()
    server: ServerConfig = ServerConfig()
    backend: Literal["local", "ray"] = "local"  # where the source models run
    ray: RayConfig = RayConfig()

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
        from coolfusion.core import selection
        from coolfusion.core.errors import InvalidRequest

        try:  # the same checks as a request's `fusion` settings
            if isinstance(self.fusion.weights, dict):
                selection.check_weights(self.fusion.weights, names, "fusion.weights")
            selection.check_names(self.fusion.score_end, names, "fusion.score_end")
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
        raise ConfigError("backend: 'ray' needs the Ray package, which is not installed "
                          "(pip install 'coolfusion[ray]')")
    for i, m in enumerate(cfg.models):
        check_source(i, m, devices=cfg.backend == "local")  # Ray actors pick their devices on their nodes
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


def check_source(i: int, m: ModelConfig, *, devices: bool = True) -> None:
    """Fail early (before any weights load) on a missing package, file or impossible device."""
    import torch

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
    if devices and m.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"models.{i}.device: {m.device!r} requested but CUDA is not available")
        idx = int(m.device[5:]) if ":" in m.device else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"models.{i}.device: {m.device!r} but only {torch.cuda.device_count()} CUDA devices")
