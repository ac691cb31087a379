from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="prompt-ris",
    version="0.1.0",
    description="Prompt-RIS (CVPR 2024): referring image segmentation bridging prompt-tuned CLIP and SAM",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["prompt_ris", "prompt_ris.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "open_clip_torch>=2.24",
        "segment-anything>=1.0",
        "timm>=0.9",
        "accelerate>=0.30",
        "datasets>=2.18",
        "pycocotools>=2.0.7",
        "einops>=0.7",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10.1",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "tensorboard>=2.14",
    ],
    extras_require={"dev": ["pytest>=7.4"]},
    entry_points={"console_scripts": ["prompt-ris=prompt_ris.cli:main"]},
)
