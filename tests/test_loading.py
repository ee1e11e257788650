"""The first-start caches of coolfusion/runtime/loading.py (issue 15), on the real SmolLM2 GGUF.

A GGUF model is dequantised once and saved as safetensors under COOLFUSION_CACHE; later
starts load that. It must be the same model: the same tensors and the same logits.
"""

from __future__ import annotations

import torch

from coolfusion.runtime import loading


def _forbid_gguf(monkeypatch):
    """From here on, loading from a GGUF file (instead of the cache) fails the test."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def guarded(path, *args, _real=real, **kwargs):
            assert "gguf_file" not in kwargs, f"{path}: parsed the GGUF instead of reading the cache"
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", guarded)


def test_the_cached_dequantised_weights_give_the_gguf_model_exactly(config, tmp_path, monkeypatch):
    monkeypatch.setenv("COOLFUSION_CACHE", str(tmp_path))
    m = next(m for m in config.models if m.name == "smollm2-135m")
    src = loading.resolve_source(m)
    first = loading.load_model(src, torch.device("cpu"), torch.float32)  # from the GGUF, then cached
    entries = list((tmp_path / "weights").iterdir())
    assert [e.name.endswith("-float32") for e in entries] == [True]
    assert {p.name for p in entries[0].iterdir()} >= {"model.safetensors", "config.json"}
    assert "quantization_config" not in (entries[0] / "config.json").read_text()

    _forbid_gguf(monkeypatch)
    second = loading.load_model(src, torch.device("cpu"), torch.float32)
    a, b = first.state_dict(), second.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert second.get_output_embeddings().weight.data_ptr() == second.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7042, 30, 284, 260]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


def test_a_broken_weights_cache_is_rebuilt_not_fatal(config, tmp_path, monkeypatch):
    monkeypatch.setenv("COOLFUSION_CACHE", str(tmp_path))
    m = next(m for m in config.models if m.name == "smollm2-135m")
    src = loading.resolve_source(m)
    entry = tmp_path / "weights" / f"{loading._gguf_key(src)}-float32"
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"not a safetensors file")
    model = loading.load_model(src, torch.device("cpu"), torch.float32)
    assert model.config.model_type == "llama"
    from safetensors import safe_open

    with safe_open(str(entry / "model.safetensors"), "pt") as f:  # rewritten by the rebuild
        assert "model.layers.0.mlp.down_proj.weight" in set(f.keys())
