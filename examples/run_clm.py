#!/usr/bin/env python
r"""Train or fine-tune a causal language model with MultiMax attention (Accelerate, no Trainer); reports perplexity.

With no data argument it trains a tiny Llama from scratch on CPython's own documentation (`pydoc_data.topics`) with a
BPE tokenizer built on the spot: offline, about 10 seconds on a 2-core CPU.

    python examples/run_clm.py --output_dir out/clm                                  # tiny model, embedded text
    python examples/run_clm.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name wikitext \
        --dataset_config_name wikitext-2-raw-v1 --lora --output_dir out/qwen-multimax
    accelerate launch examples/run_clm.py --train_file my_corpus.txt --output_dir out/mine

The shared steps (arguments, Accelerator, model, LoRA, optimizer, loop, checkpoints, saving) are in
`hf_multimax.finetune`; what is particular to language modelling (tokenize, cut into blocks, perplexity) is
`hf_multimax.finetune.tasks.CausalLMTask`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from hf_multimax import finetune
from hf_multimax.cli import run_script
from hf_multimax.finetune.tasks import CausalLMTask

TASK = CausalLMTask()


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the script with command-line arguments ``argv``; return the results written to ``all_results.json``."""
    args = finetune.parse_args(TASK, argv, description=__doc__)
    return finetune.run(TASK, args)


if __name__ == "__main__":
    sys.exit(run_script(main))
