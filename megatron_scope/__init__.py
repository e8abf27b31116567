"""SCOPE on-policy distillation (arXiv 2604.10688) as a Megatron-core extension."""
