"""The source-model workers: the paper's Table 1 contract (protocol.py), the tokenizer side,
the in-process worker (local.py) and the Ray actor with its proxy (the only modules that import ray)."""
