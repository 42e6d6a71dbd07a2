#!/usr/bin/env python
r"""Train or fine-tune an encoder-decoder translation model (T5/BART/Marian style) with MultiMax attention
(Accelerate, no Trainer); translates the validation set with beam search and reports sacreBLEU (via `evaluate`).

With no data argument it trains a tiny T5 from scratch on 16,823 English→German pairs shipped with hf-multimax
(UI strings and names from twelve packages' catalogs; see `hf_multimax/data/NOTICE.md`): offline, four epochs of
batches of 64 grouped by length (948 steps; 2 min 33 s on one thread of a 2-core AMD EPYC here, while another job ran;
--no_group_by_length for random batches, --max_train_steps to stop sooner).

    python examples/run_translation.py --output_dir out/translation
    python examples/run_translation.py --model_name_or_path google-t5/t5-small --dataset_name wmt16 \
        --dataset_config_name de-en --source_lang en --target_lang de \
        --source_prefix "translate English to German: " --output_dir out/t5-multimax
    # pairs.jsonl: one {"translation": {"en": ..., "de": ...}} per line
    python examples/run_translation.py --train_file pairs.jsonl --output_dir out/mine

The shared steps are in `hf_multimax.finetune`; what is particular to translation (source/target tokenization,
padding of labels, beam search and BLEU) is `hf_multimax.finetune.tasks.TranslationTask`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from hf_multimax import finetune
from hf_multimax.cli import run_script
from hf_multimax.finetune.tasks import TranslationTask

TASK = TranslationTask()


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the script with command-line arguments ``argv``; return the results written to ``all_results.json``."""
    args = finetune.parse_args(TASK, argv, description=__doc__)
    return finetune.run(TASK, args)


if __name__ == "__main__":
    sys.exit(run_script(main))
