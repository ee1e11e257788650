"""The requests whose greedy outputs on the real pair are pinned in data/pinned_outputs.json.

The outputs were recorded once, at the commit named in that file, before the engine was
reorganised (issue 13), so that a refactor that changes any fused text, winner or finish
reason fails `test_pinned_outputs.py`. Re-record only for an intended behaviour change.
"""

REQUESTS = [
    {"model": "cool-fusion", "prompt": "The capital of France is", "max_tokens": 32},
    {"model": "cool-fusion", "prompt": "def fibonacci(n):", "max_tokens": 24},
    {"model": "cool-fusion", "messages": [{"role": "user", "content": "Name three primary colours."}],
     "max_tokens": 24},
    {"model": "cool-fusion", "prompt": "Q: What is 12 times 3?\nA:", "max_tokens": 24, "stop": ["\n"]},
    {"model": "cool-fusion-noalign", "prompt": "Multi-tasking is hard because", "max_tokens": 16},
    {"model": "cool-fusion-rerank", "prompt": "The opposite of hot is", "max_tokens": 12},
    {"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": 16},
    {"model": "gemma3-270m", "prompt": "Once upon a time", "max_tokens": 16},
]
