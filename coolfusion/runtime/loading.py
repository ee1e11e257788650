"""Loading source models and tokenizers from a ModelConfig: the one loading path.

Resolves where the weights are (HF id, local directory, GGUF file, or a GGUF shipped in a
Python package), picks the device and dtype, and caches what the first start computes under
cache_dir() (~/.cache/coolfusion or $COOLFUSION_CACHE, outside the repository):

    gguf/<package>/<file>.gguf          a GGUF assembled from a package's chunks (Gemma)
    tokenizers/<gguf>-<key>-tf<ver>/    the fast tokenizer converted from a GGUF file
    weights/<gguf>-<key>-tf<ver>-<dtype>/  the dequantised weights as safetensors

Each long first-start step shows a progress bar (tqdm) and is logged. A cache entry is keyed
by the GGUF file's path, size and mtime and the transformers version, written to a temporary
folder and renamed into place, and ignored (rebuilt) if it cannot be loaded. Nothing here
downloads anything the user did not configure.

`load` is used by the engine, by each Ray actor on its node, and by the benchmark
(`random_weights`: the configured architecture and tokenizer with random weights).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from coolfusion.config import Config, ModelConfig
from coolfusion.core.errors import ConfigError
from coolfusion.runtime import lm_head
from coolfusion.runtime.packages import package_dir

log = logging.getLogger("coolfusion.loading")


@dataclass(frozen=True)
class Source:
    """Where to load one model from: `directory` (or HF id) plus an optional GGUF file name."""

    directory: str
    gguf_file: str | None


def resolve_source(m: ModelConfig) -> Source:
    if m.path is not None:
        return Source(m.path, m.gguf_file)
    pkg_dir = package_dir(m.package)  # ConfigError naming the pip command when missing
    if m.gguf_file is not None:
        return Source(str(pkg_dir), m.gguf_file)
    module = importlib.import_module(m.package)
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        ggufs = sorted(pkg_dir.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ConfigError(f"gguf_file: package {m.package!r} needs gguf_file (found {len(ggufs)} .gguf files)")
        return Source(str(pkg_dir), ggufs[0].name)
    target = cache_dir() / "gguf" / m.package / getattr(module, "MODEL_NAME", f"{m.package}.gguf")
    # assemble() re-hashes an existing file (about 1 s); a stamp of the verified file skips that
    stamp = target.with_name(target.name + ".verified")
    expected = f"{getattr(module, 'EXPECTED_SHA256', '')}:{_file_id(target)}"
    if target.is_file() and stamp.is_file() and stamp.read_text() == expected:
        return Source(str(target.parent), target.name)
    with _step(f"assembling {target.name} from package {m.package}", target.parent):
        path = Path(assemble(target))  # verifies the checksum; reuses an existing file
    try:
        stamp.write_text(f"{getattr(module, 'EXPECTED_SHA256', '')}:{_file_id(path)}")
    except OSError as err:
        log.warning("could not write %s: %s", stamp, err)
    return Source(str(path.parent), path.name)


def _file_id(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def check_devices(cfg: Config) -> None:
    """Fail early (before any weights load) on a CUDA device this machine does not have
    (`backend: local`; Ray actors pick their devices on their own nodes)."""
    if cfg.backend != "local":
        return
    for i, m in enumerate(cfg.models):
        if not m.device.startswith("cuda"):
            continue
        if not torch.cuda.is_available():
            raise ConfigError(f"models.{i}.device: {m.device!r} requested but CUDA is not available")
        idx = int(m.device[5:]) if ":" in m.device else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(f"models.{i}.device: {m.device!r} but only {torch.cuda.device_count()} CUDA devices")


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


def cache_dir() -> Path:
    """Where first-start work is kept: $COOLFUSION_CACHE, else ~/.cache/coolfusion."""
    return Path(os.environ.get("COOLFUSION_CACHE") or Path.home() / ".cache" / "coolfusion")


def _gguf_key(src: Source) -> str:
    """A cache key for a GGUF file: its resolved path, size and mtime, plus the transformers
    version that converts it (another version may convert differently)."""
    import transformers

    f = Path(src.directory) / src.gguf_file
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{f.stem}-{key}-tf{transformers.__version__}"


@contextmanager
def _step(desc: str, where: Path | None = None) -> Iterator[None]:
    """A progress bar for one long step that reports nothing itself: it shows the step and
    its elapsed time, ticking every second; the log says where the result goes and how long
    the step took."""
    log.info("%s%s ...", desc, f" (once; cached in {where})" if where else "")
    t0 = time.perf_counter()
    bar = tqdm(total=1, desc=desc, bar_format="{desc}: {elapsed}", leave=True)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(1.0):
            bar.refresh()

    ticker = threading.Thread(target=tick, name="coolfusion-progress", daemon=True)
    ticker.start()
    try:
        yield
        bar.update(1)
    finally:
        done.set()
        ticker.join()
        bar.close()
    log.info("%s: done in %.1f s", desc, time.perf_counter() - t0)


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished cache entry into place (atomic); another process may have won."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(src: Source):
    """Tokenizer of a source. Converting a GGUF tokenizer takes 5-50 s (Gemma's 262k
    vocabulary), so the converted one is saved once under cache_dir() and reloaded from there
    (same vocabulary, same rules)."""
    from transformers import AutoTokenizer

    if src.gguf_file is None:
        return AutoTokenizer.from_pretrained(src.directory)
    cache = cache_dir() / "tokenizers" / _gguf_key(src)
    if (cache / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cache))
        except Exception as err:  # a stale or partial cache: rebuild it
            log.warning("rebuilding the tokenizer cache %s, which does not load: %s", cache, err)
            shutil.rmtree(cache, ignore_errors=True)
    with _step(f"converting the tokenizer of {src.gguf_file}", cache):
        tok = AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)
    try:
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        _publish(tmp, cache)
    except OSError as err:
        log.warning("could not cache tokenizer at %s: %s", cache, err)
    return tok


def load_model(src: Source, device: torch.device, dtype: torch.dtype):
    """The model on `device`. A GGUF model is dequantised by transformers, which parses the
    whole file (its 262k-token vocabulary too) several times: about 25 s for SmolLM2-135M and
    90 s for Gemma 3 270M on 2 CPU cores. The dequantised weights are saved once as
    safetensors under cache_dir() (per GGUF file, transformers version and dtype) and later
    starts load those in about a second: the same tensors, so the same logits."""
    from transformers import AutoModelForCausalLM

    if src.gguf_file is None:
        model = AutoModelForCausalLM.from_pretrained(src.directory, dtype=dtype)
    else:
        cache = cache_dir() / "weights" / f"{_gguf_key(src)}-{str(dtype).removeprefix('torch.')}"
        model = _load_cached_weights(cache, dtype)
        if model is None:
            with _step(f"dequantising {src.gguf_file} to {str(dtype).removeprefix('torch.')}", cache):
                model = AutoModelForCausalLM.from_pretrained(src.directory, gguf_file=src.gguf_file, dtype=dtype)
            _save_weights(model, cache)
    model.to(device)
    model.eval()
    lm_head.install(model)  # on the CPU, the LM head's product by oneDNN
    return model


def _load_cached_weights(cache: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if not (cache / "model.safetensors").is_file():
        return None
    try:
        return AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype)
    except Exception as err:  # a stale or partial cache: convert again
        log.warning("rebuilding the weights cache %s, which does not load: %s", cache, err)
        shutil.rmtree(cache, ignore_errors=True)
        return None


def _save_weights(model, cache: Path) -> None:
    """Write a GGUF-loaded model as a plain safetensors checkpoint. transformers refuses
    `save_pretrained` on it (it is marked as quantised although its weights are dequantised),
    so write the state dict (tied embeddings once) and the config without the GGUF marker."""
    from safetensors.torch import save_model

    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        with _step(f"saving the dequantised weights of {cache.name}"):
            tmp.mkdir(parents=True, exist_ok=True)
            config = copy.deepcopy(model.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(str(tmp))
            if model.generation_config is not None:
                model.generation_config.save_pretrained(str(tmp))
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _publish(tmp, cache)
    except OSError as err:
        log.warning("could not cache weights at %s: %s", cache, err)
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(m: ModelConfig, device: str = "cuda") -> None:
    """Build every cache entry a start on `device` will read for model `m`, then let it go
    (the Dockerfile bakes them into the image)."""
    src = resolve_source(m)
    load_tokenizer(src)
    if src.gguf_file is not None:
        dtype = resolve_dtype(m.dtype, torch.device(device), True)
        load_model(src, torch.device("cpu"), dtype)


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
