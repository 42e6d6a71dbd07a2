"""Length-grouped batches for text tasks (``--group_by_length``): each batch holds sequences of similar length, so
padding to the longest costs little. Short UI strings and a few long sentences padded together waste most of a batch
(the embedded English→German pairs: median 9 tokens, longest 164)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["LengthGroupedSampler", "sequence_lengths"]


def sequence_lengths(dataset) -> list[int]:
    """Per example, the length of its ``input_ids`` or, where ``labels`` are token sequences too (seq2seq), the longer
    of the two; ``ValueError`` naming ``--group_by_length`` when the data set has no ``input_ids`` (images, say)."""
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"--group_by_length groups tokenized text by length, but this data set has no input_ids "
            f"column (its columns: {dataset.column_names})"
        )
    lengths = [len(ids) for ids in dataset["input_ids"]]
    if "labels" in dataset.column_names and len(dataset) and isinstance(dataset[0]["labels"], list):
        lengths = [max(n, len(labels)) for n, labels in zip(lengths, dataset["labels"])]
    return lengths


class LengthGroupedSampler(Sampler[int]):
    """A random order of the examples in which every ``batch_size`` consecutive indices have similar lengths.

    The grouping is Transformers' (``get_length_grouped_indices``, as ``Trainer(group_by_length=True)``: shuffle,
    sort by length within mega-batches of 50 batches, the longest batch first). The order is a function of
    ``(seed, epoch)`` alone, like Accelerate's seedable sampler: every implementation trained from one seed sees the
    same batches, a resumed run sees the batches it would have seen, and all processes agree on the order
    (``set_epoch`` is called by Accelerate's data loader).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    @property
    def batches_per_group(self) -> int:
        """Batches per mega-batch (Transformers' default ``mega_batch_mult``: 50, or fewer so that there are four).
        Within a mega-batch the batches run from long to short sequences, so the training loss has this period."""
        return max(1, min(len(self.lengths) // (self.batch_size * 4), 50))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(
            get_length_grouped_indices(
                self.lengths, self.batch_size, mega_batch_mult=self.batches_per_group, generator=generator
            )
        )
