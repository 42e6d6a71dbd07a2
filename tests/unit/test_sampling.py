"""``--group_by_length``: batches of similar length, in an order that is a function of (seed, epoch) alone."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset

from hf_multimax.finetune.sampling import LengthGroupedSampler, sequence_lengths


def lengths_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([2, 3, 4, 5, 8, 9, 40, 120]) + rng.randrange(3) for _ in range(n)]


def padded_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def test_every_example_once_and_batches_of_similar_length():
    lengths, batch_size = lengths_of(2000), 16
    sampler = LengthGroupedSampler(lengths, batch_size, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths))) and len(sampler) == len(lengths)
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    # Padding to the longest of each batch: grouped batches pad a small fraction of what random batches pad.
    real = sum(lengths)
    assert padded_tokens(order, lengths, batch_size) - real < 0.1 * (
        padded_tokens(shuffled, lengths, batch_size) - real
    )


def test_order_depends_on_seed_and_epoch_only():
    lengths = lengths_of(500)
    a, b = LengthGroupedSampler(lengths, 8, seed=1), LengthGroupedSampler(lengths, 8, seed=1)
    torch.manual_seed(123)  # the global generator (which model initialisation consumes) plays no part
    first = list(a)
    torch.rand(1000)
    assert list(b) == first
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)
    assert list(LengthGroupedSampler(lengths, 8, seed=2)) != first


@pytest.mark.parametrize("n, batch_size, groups", [(2000, 16, 31), (20000, 16, 50), (10, 16, 1)])
def test_the_order_is_transformers_grouping_with_its_period(n, batch_size, groups):
    """Transformers' default grouping (mega-batches of min(n // (4 * batch_size), 50) batches, each sorted from long
    to short): the same order, and the period that ``loss_period`` reports."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = lengths_of(n)
    sampler = LengthGroupedSampler(lengths, batch_size, seed=5)
    assert sampler.batches_per_group == groups
    generator = torch.Generator()
    generator.manual_seed(5)
    order = list(sampler)
    assert order == get_length_grouped_indices(lengths, batch_size, generator=generator)
    size = groups * batch_size
    for start in range(0, n, size):  # the first element of one mega-batch is swapped with the longest overall
        chunk = [lengths[i] for i in order[start + 1 : start + size]]
        assert chunk == sorted(chunk, reverse=True)


def test_sequence_lengths_take_the_longer_of_source_and_target():
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3], [1]], "labels": [[5], [5, 6, 7, 8]]})
    assert sequence_lengths(dataset) == [3, 4]
    assert sequence_lengths(Dataset.from_dict({"input_ids": [[1, 2], [3]]})) == [2, 1]
    assert sequence_lengths(Dataset.from_dict({"input_ids": [[1, 2], [3]], "labels": [0, 1]})) == [2, 1]


def test_data_without_tokens_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--group_by_length.*pixel_values"):
        sequence_lengths(Dataset.from_dict({"pixel_values": [[0.0]], "labels": [1]}))
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedSampler([1, 2], 0)
