#!/usr/bin/env bash
# The GPU check as one prepared run on a lent device machine (no network there; torch,
# transformers, pytest and pyyaml are in its image, pydantic is not).
#   here:   bash scripts/device_check.sh stage   saves the two embedded tokenizers to .tok/ and
#                                                downloads pydantic's wheels to .whl/ (both ignored)
#   there:  bash scripts/device_check.sh run     with the device tool's carry: [".tok", ".whl"]
# `run` runs the CUDA mechanics tests on tiny random-weight models, then the paper-shape
# benchmark (docs/benchmarks.md) and the speculative-proposals benchmark (docs/speculative.md), and writes the logs and the JSON to $OUT (else runs/device).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  stage)
    .venv/bin/python - <<'PY'
from coolfusion.config import load_config
from coolfusion.runtime.loading import load_tokenizer, resolve_source
for m, d in zip(load_config("config.yaml").models, (".tok/smol", ".tok/gemma")):
    load_tokenizer(resolve_source(m)).save_pretrained(d)
PY
    wheels=$(.venv/bin/python -c "from importlib.metadata import version as v; print(' '.join(f'{p}=={v(p)}' for p in ('pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection')))")
    # shellcheck disable=SC2086
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $wheels
    du -sh .tok .whl
    ;;
  run)
    out=${OUT:-runs/device}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 COOLFUSION_TEST_TOKENIZERS=.tok/smol,.tok/gemma
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    python3 -m pytest -q -p no:cacheprovider tests/unit tests/test_tiny_random.py tests/test_words.py \
      tests/test_batched_forward.py tests/test_runner.py tests/test_speculative_tiny.py -k "not real" 2>&1 | tee "$out/tests.log"
    python3 -m coolfusion.bench.speed --shapes llama3-8b,phi3-mini,glm4-9b --tokenizers .tok/smol,.tok/gemma,.tok/smol \
      --prompts 2 --max-tokens 48 --growth-steps 10 --growth-repeats 2 --speculative skip \
      --json "$out/bench_paper_shapes.json" 2>&1 | tee "$out/bench.log"
    # speculative proposals off/on (docs/speculative.md); random weights rarely agree, so this
    # prices the check forwards on the GPU rather than the acceptance of trained models
    python3 -m coolfusion.bench.speed --shapes llama3-8b,phi3-mini --tokenizers .tok/smol,.tok/gemma \
      --prompts 2 --max-tokens 32 --speculative only \
      --json "$out/bench_speculative.json" 2>&1 | tee "$out/bench_speculative.log"
    python3 -m coolfusion.bench.speed --shapes llama3-8b,phi3-mini,glm4-9b --tokenizers .tok/smol,.tok/gemma,.tok/smol \
      --concurrency 1,8 --max-tokens 32 --json "$out/bench_concurrency.json" 2>&1 | tee "$out/bench_concurrency.log"
    ;;
  *)
    echo "usage: bash scripts/device_check.sh stage|run" >&2
    exit 2
    ;;
esac
