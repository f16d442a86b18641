"""Packaging for lightning_idrs: input-dependent randomized smoothing with PyTorch Lightning."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
REQUIREMENTS = [
    line.strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="lightning_idrs",
    version="0.2.0",
    description="Train and certify classifiers with input-dependent randomized smoothing (IDRS).",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["lightning_idrs", "lightning_idrs.*"]),
    package_data={"lightning_idrs": ["configs/*.yaml"]},
    install_requires=REQUIREMENTS,
    extras_require={
        "test": ["pytest>=7", "wandb-workspaces>=0.4"],  # the dashboard's spec is tested offline
        "wandb": ["wandb-workspaces>=0.4"],  # `python -m lightning_idrs dashboard`: W&B's package for workspaces
        # A CUDA 13 build of faiss, matching pip's torch 2.14 (CUDA 13.0); faiss-cpu stays the default.
        # Uninstall faiss-cpu first (both provide the faiss module).
        "gpu": ["faiss-cuda>=1.14"],
    },
    entry_points={"console_scripts": ["lightning-idrs=lightning_idrs.commands:main"]},
)
