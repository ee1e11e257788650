"""The model runtime (torch and transformers): loading and weight packages, the runners,
KV storage, the batched forward and log-prob arithmetic."""
