"""Image classification (ViT/DeiT style): accuracy on held-out images."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from ...data import build_image_processor, digit_images
from .base import Task

__all__ = ["ImageClassificationTask"]

logger = logging.getLogger(__name__)


class ImageClassificationTask(Task):
    """Image classification (ViT/DeiT style); reports accuracy."""

    name = "vit"
    auto_class = "AutoModelForImageClassification"
    default_model_type = "vit"
    model_types = ("vit", "deit")
    metric = "accuracy"
    greater_is_better = True
    peft_task_type = None
    lora_modules_to_save = ("classifier",)
    pipeline_tag = "image-classification"
    default_dataset = "scikit-learn load_digits 8x8 handwritten digits (BSD)"
    text_inputs = False
    scratch_defaults = {"learning_rate": 3e-3, "per_device_train_batch_size": 64, "num_train_epochs": 10}

    def embedded_dataset(self):
        """scikit-learn's digits as ``image`` (PIL, grayscale) and ``label`` (ClassLabel ``"0"``…``"9"``) columns."""
        import datasets
        from PIL import Image

        images, labels = digit_images()
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
        )
        pil = [Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L") for image in images]
        return datasets.Dataset.from_dict({"image": pil, "label": labels.tolist()}, features=features)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("image classification")
        group.add_argument(
            "--image_column_name", default=None, help="column holding the images (default: 'image' or 'img')"
        )
        group.add_argument("--label_column_name", default="label", help="column holding the class labels")
        group.add_argument(
            "--image_size",
            type=int,
            default=8,
            help="side length images are resized to for a from-scratch model (8 = the digits' size)",
        )

    def image_column(self, args, dataset) -> str:
        if args.image_column_name:
            return args.image_column_name
        for name in ("image", "img", "pixel_values"):
            if name in dataset.column_names:
                return name
        raise ValueError(f"no image column among {dataset.column_names}; pass --image_column_name")

    def labels(self, args, raw) -> list[str]:
        feature = raw["train"].features[args.label_column_name]
        if hasattr(feature, "names"):
            return list(feature.names)
        return [str(v) for v in sorted(set(raw["train"][args.label_column_name]))]

    def build_preprocessor(self, args, raw):
        from transformers import AutoConfig, AutoImageProcessor

        if not args.model_name_or_path:
            return build_image_processor(args.image_size)
        try:
            return AutoImageProcessor.from_pretrained(args.model_name_or_path)
        except (OSError, ValueError) as error:  # a model saved without its processor: the scripts' own, at its size
            size = getattr(AutoConfig.from_pretrained(args.model_name_or_path), "image_size", args.image_size)
            logger.warning(
                "%s has no image processor (%s); using a %d×%d resize with mean and std 0.5",
                args.model_name_or_path,
                type(error).__name__,
                size,
                size,
            )
            return build_image_processor(size)

    def preprocess(self, args, raw, processor):
        column = self.image_column(args, raw["train"])
        names = self.labels(args, raw)
        feature = raw["train"].features[args.label_column_name]
        to_id = None if hasattr(feature, "names") else {name: i for i, name in enumerate(names)}

        def transform(examples):
            images = [image.convert("RGB") for image in examples[column]]
            out = processor(images, return_tensors="pt")
            labels = examples[args.label_column_name]
            return {
                "pixel_values": out["pixel_values"],
                "labels": [to_id[str(label)] for label in labels] if to_id else labels,
            }

        train, evaluation = raw["train"], raw["validation"]
        train.set_transform(transform)
        evaluation.set_transform(transform)
        return train, evaluation

    def collator(self, args, processor, model):
        def collate(examples):
            return {
                "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
            }

        return collate

    def config_kwargs(self, args, processor, raw):
        names = self.labels(args, raw)
        return dict(
            image_size=args.image_size,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
        )

    def pretrained_kwargs(self, args, processor, raw):
        kwargs = self.config_kwargs(args, processor, raw)
        kwargs.pop("image_size")
        return dict(kwargs, ignore_mismatched_sizes=True)

    def evaluate(self, accelerator, model, dataloader, args, processor):
        losses, correct, total = [], 0, 0
        model.eval()
        with torch.no_grad():
            for batch in dataloader:
                outputs = model(**batch)
                losses.append(accelerator.gather_for_metrics(self.loss_terms(outputs.logits, batch["labels"])))
                predictions, labels = accelerator.gather_for_metrics((outputs.logits.argmax(-1), batch["labels"]))
                correct += (predictions == labels).sum().item()
                total += labels.numel()
        return {"eval_loss": self.mean_loss(losses), "accuracy": correct / max(total, 1)}
