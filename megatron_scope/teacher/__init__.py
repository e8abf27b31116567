"""Teacher scoring: a remote vLLM teacher's log-probs of the rollouts (remote.py); the co-located Megatron
teacher's forward pass runs in the trainer (`ScopeTrainer._scoring_pass`)."""
