"""Tiny random-weight models for the batched-forward tests, and the no-cache reference."""

from __future__ import annotations

import torch

TOL_TINY = 1e-5  # measured ~3e-7 (logits ~0.4); a wrong mask or position gives > 1e-2


def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_gemma3():
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=5,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                           query_pre_attn_scalar=16, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(cfg).eval()


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """The truth: logits (T, V) of a forward of the whole sequence, no cache."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def rand_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (n,), generator=g).tolist()
