"""Teacher scoring: a co-located Megatron teacher's forward pass (colocated.py) or a remote vLLM teacher's
log-probs and top-k of the rollouts (remote.py)."""
