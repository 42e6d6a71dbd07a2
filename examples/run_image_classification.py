#!/usr/bin/env python
r"""Train or fine-tune a ViT/DeiT image classifier with MultiMax attention (Accelerate, no Trainer); reports accuracy.

With no data argument it trains a tiny ViT (2×2 patches) from scratch on scikit-learn's 8×8 handwritten digits
(`load_digits`), with an image processor built locally: offline, about 10 seconds on a 2-core CPU.

    python examples/run_image_classification.py --output_dir out/vit
    python examples/run_image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \
        --dataset_name beans --lora --output_dir out/vit-beans-multimax
    python examples/run_image_classification.py --train_file images/train --validation_file images/val \
        --output_dir out/mine                              # folders of class sub-folders (imagefolder)

The shared steps are in `hf_multimax.finetune`; what is particular to image classification (image transforms,
labels, accuracy) is `hf_multimax.finetune.tasks.ImageClassificationTask`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from hf_multimax import finetune
from hf_multimax.cli import run_script
from hf_multimax.finetune.tasks import ImageClassificationTask

TASK = ImageClassificationTask()


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the script with command-line arguments ``argv``; return the results written to ``all_results.json``."""
    args = finetune.parse_args(TASK, argv, description=__doc__)
    return finetune.run(TASK, args)


if __name__ == "__main__":
    sys.exit(run_script(main))
