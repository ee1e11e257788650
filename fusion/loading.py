"""Loading source models and tokenizers from a ModelConfig: the one loading path.

Resolves where the weights are (HF id, local directory, GGUF file, or a GGUF shipped in a
Python package), picks the device and dtype, and caches what the first start computes
(the assembled Gemma file, converted GGUF tokenizers) under ~/.cache/coolfusion, outside
the repository. Nothing here downloads anything the user did not configure. `load` is used
by the engine, by each Ray actor on its node, and by the benchmark (`random_weights`: the
configured architecture and tokenizer with random weights).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import ConfigError

log = logging.getLogger("coolfusion.loading")

CACHE_DIR = Path(os.environ.get("COOLFUSION_CACHE", Path.home() / ".cache" / "coolfusion"))


@dataclass(frozen=True)
class Source:
    """Where to load one model from: `directory` (or HF id) plus an optional GGUF file name."""

    directory: str
    gguf_file: str | None


def resolve_source(m: ModelConfig) -> Source:
    if m.path is not None:
        return Source(m.path, m.gguf_file)
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package: Python package {m.package!r} is not installed")
    pkg_dir = Path(spec.submodule_search_locations[0])
    if m.gguf_file is not None:
        return Source(str(pkg_dir), m.gguf_file)
    module = importlib.import_module(m.package)
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        ggufs = sorted(pkg_dir.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ConfigError(f"gguf_file: package {m.package!r} needs gguf_file (found {len(ggufs)} .gguf files)")
        return Source(str(pkg_dir), ggufs[0].name)
    target = CACHE_DIR / "gguf" / m.package / getattr(module, "MODEL_NAME", f"{m.package}.gguf")
    path = Path(assemble(target))  # verifies the checksum; reuses an existing file
    return Source(str(path.parent), path.name)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, is_gguf: bool) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda" and not is_gguf:
        return torch.bfloat16
    return torch.float32  # GGUF weights dequantise to float32; CPU is fastest in float32


def _tokenizer_cache_dir(src: Source) -> Path | None:
    if src.gguf_file is None:
        return None
    f = Path(src.directory) / src.gguf_file
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    import transformers

    return CACHE_DIR / "tokenizers" / f"{f.stem}-{key}-tf{transformers.__version__}"


def load_tokenizer(src: Source):
    """Tokenizer of a source. GGUF tokenizers take ~25 s to convert, so the converted one is
    saved once under CACHE_DIR and reloaded from there (same vocabulary, same rules)."""
    from transformers import AutoTokenizer

    cache = _tokenizer_cache_dir(src)
    if cache is not None and (cache / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cache))
        except Exception as err:  # a stale or partial cache: rebuild it
            log.warning("ignoring tokenizer cache %s: %s", cache, err)
    tok = AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)
    if cache is not None:
        try:
            tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
            tok.save_pretrained(str(tmp))
            tmp.rename(cache)
        except OSError as err:
            log.warning("could not cache tokenizer at %s: %s", cache, err)
    return tok


def load_model(src: Source, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if src.gguf_file is not None:
        kwargs["gguf_file"] = src.gguf_file
    model = AutoModelForCausalLM.from_pretrained(src.directory, **kwargs)
    model.to(device)
    model.eval()
    return model


@dataclass(frozen=True)
class LoadedModel:
    """A model in memory, with what its worker needs beside it (`LocalWorker.from_loaded`)."""

    name: str
    model: Any
    tokenizer: Any
    device: torch.device
    stop_tokens: tuple[str, ...] = ()
    context_limit: int | None = None


def random_model(config, device: torch.device, seed: int = 0):
    """A model of `config`'s architecture with random weights (bf16 on CUDA, else float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load(m: ModelConfig, *, tokenizer=None, device: torch.device | None = None, random_weights: bool = False,
         seed: int = 0) -> LoadedModel:
    """Tokenizer (unless given) and model of one configured source model, on `device`
    (default: the config's, `auto` meaning CUDA when present)."""
    src = resolve_source(m)
    device = resolve_device(m.device) if device is None else device
    tok = load_tokenizer(src) if tokenizer is None else tokenizer
    if random_weights:
        from transformers import AutoConfig

        model = random_model(AutoConfig.from_pretrained(src.directory, gguf_file=src.gguf_file), device, seed)
    else:
        dtype = resolve_dtype(m.dtype, device, src.gguf_file is not None)
        log.info("loading %s from %s%s on %s (%s)", m.name, src.directory,
                 f"/{src.gguf_file}" if src.gguf_file else "", device, dtype)
        model = load_model(src, device, dtype)
    return LoadedModel(m.name, model, tok, device, tuple(m.stop_tokens), m.context_limit)
