from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="tinylora_kernels",
    version="0.1.0",
    description="TinyLoRA adapters on 4-bit NF4 and 16-bit language models: drop-in modules, "
                "checkpoints, a pure-torch reference and fused Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tinylora_kernels", "tinylora_kernels.*"]),
    python_requires=">=3.10",
    # torch is not pinned: the GPU machines run 2.11, CI 2.13. Install torch first where a bare
    # requirement would pull a multi-GB CUDA build.
    install_requires=[
        "torch>=2.4",
        "triton>=3.6",
        "transformers>=4.45",
        "bitsandbytes>=0.45",
        # transformers needs it to load a 4-bit model (device_map), as `check` does
        "accelerate",
        "tqdm",
    ],
    extras_require={
        "bench": ["pytest-benchmark", "matplotlib"],
        # TRL's GRPOTrainer (tested with 1.16.0) and the datasets it takes
        "trl": ["trl>=1.16", "datasets"],
        "test": ["pytest", "pytest-benchmark", "peft>=0.19", "accelerate", "matplotlib",
                 "trl>=1.16", "datasets"],
    },
    entry_points={"console_scripts": ["tinylora-kernels=tinylora_kernels.cli:main"]},
)
