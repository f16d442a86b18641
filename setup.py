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
        "test": ["pytest>=7"],
        # A CUDA build of faiss; faiss-cpu stays the default. Uninstall faiss-cpu first.
        "gpu": ["faiss-gpu-cu12>=1.8"],
    },
    entry_points={"console_scripts": ["lightning-idrs=lightning_idrs.commands:main"]},
)
