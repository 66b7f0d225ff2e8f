"""selfdistill: a PyTorch training engine for self-distillation of image classifiers."""
from setuptools import find_packages, setup

setup(
    name="selfdistill",
    version="0.1.0",
    description="Self-distillation (BYOT, CS-KD, Beta smoothing) with multi-exit models, Triton losses and DALI",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "pipelines", "pipelines.*",
                                    "bench", "bench.*"]),
    package_data={"bench": ["*.sh"]},
    install_requires=[
        "torch>=2.5",
        "triton>=3.0",
        "numpy",
        "pyyaml>=6",
        "tqdm",
        "pillow",
        "matplotlib",
        "scikit-learn",
        "nvidia-ml-py",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "timm": ["timm"],
        "bench": ["liger-kernel"],
        "dev": ["pytest>=8", "pytest-benchmark", "pytest-timeout", "scikit-image", "ruff"],
    },
    entry_points={"console_scripts": ["selfdistill=engine.cli:main"]},
)
