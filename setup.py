from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="prompt-ris",
    version="0.1.0",
    description="Prompt-RIS (CVPR 2024): referring image segmentation bridging prompt-tuned CLIP and SAM",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["prompt_ris", "prompt_ris.*"]),
    # Each floor is a version the test suite has passed on (scripts/check_floors.sh installs
    # exactly these and runs the tiny tests; the result is in CONTRIBUTING.md).
    install_requires=[
        "torch>=2.14.1",  # the one release the tests run on
        # segment_anything imports torchvision on import but does not declare it.
        "torchvision>=0.29.1",
        "open_clip_torch>=2.32.0",  # VisionTransformer._embeds (models/cross_modal_prompting.py)
        "segment-anything>=1.0",  # 1.0 is the only release
        "accelerate>=1.1.0",  # loads its RNG states under torch.load(weights_only=True)
        "datasets>=4.0.0",  # datasets.List (data/prepare.py)
        "pycocotools>=2.0.8",  # the first built for numpy 2
        "einops>=0.7.0",
        "safetensors>=0.4.3",  # what accelerate 1.1.0 asks for
        "numpy>=2.0.0",  # the pyarrow that datasets gets needs numpy 2
        "pillow>=10.1.0",  # ImageFont.load_default(size=...) (overlays.py)
        "pyyaml>=6.0.1",
        "tqdm>=4.66.3",  # what datasets 4.0.0 asks for
        "tensorboard>=2.14.0",  # train.tracker's default, through accelerate
        "huggingface_hub>=2.4.0",  # loading by hub id, push_to_hub, model cards (models/hub.py)
    ],
    extras_require={
        # `prompt-ris app` (prompt_ris/app/): Gradio Blocks; gradio_client for scripts and tests
        "app": ["gradio>=6.31.0", "gradio_client>=2.7.2"],
        # the browser test drives Debian's chromium + chromedriver (scripts/setup_env.sh)
        "dev": ["pytest>=7.4.0", "selenium>=4.51.0", "gradio>=6.31.0", "gradio_client>=2.7.2"],
    },
    entry_points={"console_scripts": ["prompt-ris=prompt_ris.cli:main"]},
)
