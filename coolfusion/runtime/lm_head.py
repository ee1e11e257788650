"""The LM head's matrix product on the CPU, by oneDNN.

Every forward ends with the LM head: (rows x hidden) by (hidden x vocabulary), the largest
matrix product of the embedded pair (Gemma 3: 640 x 262,144, 671 MB of float32 weights read
per forward). On this project's CPU (AMD EPYC, 2 cores), `F.linear` (MKL) takes a slow path
for it: 60 ms for 1 row, 113 to 194 ms for 2 to 8, 250 ms for 64; oneDNN's `mkldnn_linear`
over a copy of the weights in its own layout took 29, 38 to 53 and 176 ms
(`python scripts/lm_head_rows.py` prints both, per row count and head; its output, with the
commit, is in docs/batching.md).
A decode step of a batch and a scoring block both pay it once per forward, so it sets much
of what a forward costs.

The values are the same products summed in another order: they differ from F.linear's by
float rounding (about 1e-6 relative), as a batched forward's already differ from one row's.
The copy costs memory once per model: the head's weights again (Gemma 3: 640 MiB, SmolLM2:
108 MiB; their input embeddings share the original with the head).
"""

from __future__ import annotations

import types

import torch


def available(model) -> bool:
    """Whether `install` applies: a float32 Linear head on the CPU, and oneDNN in this torch."""
    head = model.get_output_embeddings()
    return (isinstance(head, torch.nn.Linear) and head.weight.device.type == "cpu"
            and head.weight.dtype == torch.float32 and torch.backends.mkldnn.is_available())


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous().to_mkldnn()
    y = torch._C._nn.mkldnn_linear(rows, self._onednn_weight, self._onednn_bias).to_dense()  # (rows, V)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def install(model) -> None:
    """Give `model`'s output embeddings the oneDNN product, where `available`. The module,
    its parameters and their ties stay as they are; only its forward changes. Idempotent."""
    if not available(model):
        return
    head = model.get_output_embeddings()
    if getattr(head.forward, "__func__", None) is _forward:
        return
    head._onednn_weight = head.weight.detach().to_mkldnn()
    head._onednn_bias = None if head.bias is None else head.bias.detach().to_mkldnn()
    head.forward = types.MethodType(_forward, head)
