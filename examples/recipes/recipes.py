#!/usr/bin/env python
r"""The paper's three settings as commands of the example scripts under ``accelerate launch``.

    python examples/recipes/recipes.py list
    python examples/recipes/recipes.py print wikitext103-lm --attn_implementation sdpa --seed 1
    python examples/recipes/recipes.py run iwslt14-de-en --train_file iwslt14/train.jsonl \
        --validation_file iwslt14/valid.jsonl --output_dir out/iwslt-multimax
    python examples/recipes/recipes.py jsonl train.de train.en de en > iwslt14/train.jsonl

Each recipe is the architecture, schedule and batch size of the paper's setting, taken from the configurations of
the upstream code the MultiMax authors trained with (fairseq's ``transformer_lm`` and ``transformer_iwslt_de_en``,
facebookresearch/deit's ``deit_small_patch16_224``), mapped onto the flags of ``examples/run_*.py``; where the scripts
have no equivalent the recipe says what differs (``deviations``). Flags after the recipe's name are appended to its
command, so they override it (argparse keeps the last value); ``--own_data`` drops the recipe's data flags for yours.
``tests/integration/test_recipes.py`` runs every recipe
for two steps on small local data, so the flags cannot rot. See ``README.md`` beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent

__all__ = ["Recipe", "RECIPES", "command", "markdown", "main", "write_jsonl"]


@dataclass(frozen=True)
class Recipe:
    """One paper setting: the script, its flags, how many processes, and where each number comes from."""

    name: str
    description: str
    script: str
    #: where the data comes from (replaced by the user's own with ``--own_data``)
    data: tuple[str, ...]
    args: tuple[str, ...]
    num_processes: int
    sources: tuple[str, ...]
    deviations: tuple[str, ...] = field(default=())


#: MultiMax as upstream trains it from scratch: σ in every attention layer and on the output logits, trunc-normal
#: initialisation (std 0.02); the run's --attn_implementation chooses SoftMax (sdpa) or MultiMax.
MULTIMAX_FLAGS = ("--multimax_init", "paper", "--multimax_output", "true")

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="wikitext103-lm",
            description="6-layer Transformer decoder LM on WikiText-103 (fairseq transformer_lm: 512 wide, FFN 2048, "
            "8 heads), 512-token blocks, 64 blocks (32,768 tokens) per update, 50,000 updates",
            script="run_clm.py",
            data=("--dataset_name", "Salesforce/wikitext", "--dataset_config_name", "wikitext-103-raw-v1"),
            args=(
                "--model_type",
                "gpt2",
                "--config_overrides",
                "n_embd=512,n_inner=2048,n_layer=6,n_head=8,n_positions=512,"
                "activation_function=relu,resid_pdrop=0.1,embd_pdrop=0.1,attn_pdrop=0.0",
                "--vocab_size",
                "32000",
                "--block_size",
                "512",
                "--per_device_train_batch_size",
                "8",
                "--gradient_accumulation_steps",
                "1",
                "--per_device_eval_batch_size",
                "8",
                "--learning_rate",
                "5e-4",
                "--weight_decay",
                "0.01",
                "--num_warmup_steps",
                "4000",
                "--lr_scheduler_type",
                "cosine",
                "--max_train_steps",
                "50000",
                "--max_grad_norm",
                "0",
                "--eval_strategy",
                "end",
                "--checkpointing_steps",
                "5000",
                *MULTIMAX_FLAGS,
            ),
            num_processes=8,
            sources=(
                "fairseq examples/language_model/README.md (transformer_lm on wikitext-103: --dropout 0.1, adam "
                "betas (0.9, 0.98), --weight-decay 0.01, --clip-norm 0.0, --lr 0.0005, inverse_sqrt with 4000 "
                "warm-up updates, --tokens-per-sample 512, --max-tokens 2048 --update-freq 16, --max-update "
                "50000, --share-decoder-input-output-embed)",
                "fairseq transformer_lm architecture defaults (6 decoder layers, 512/2048, 8 heads, ReLU)",
                "MultiMax upstream transformer_decoder.py and multihead_attention.py (σ on the attention scores "
                "and on the output projection, trunc-normal std 0.02)",
            ),
            deviations=(
                "8 processes x 8 blocks of 512 tokens = fairseq's 2048 tokens x 16 accumulated updates; with "
                "fewer GPUs raise --gradient_accumulation_steps to keep 64 blocks per update",
                "cosine decay after the 4000-step warm-up instead of fairseq's inverse square root (the "
                "scripts offer linear, cosine, polynomial and constant schedules); AdamW betas (0.9, 0.999) "
                "instead of (0.9, 0.98)",
                "a byte-level BPE tokenizer of 32k tokens trained on the data instead of fairseq's word-level "
                "vocabulary (267k words with adaptive inputs or shared embeddings): perplexities are per BPE "
                "token, not comparable to word-level numbers",
                "GPT-2 blocks (pre-LayerNorm, learned positions) instead of fairseq's post-LayerNorm "
                "decoder with sinusoidal positions",
            ),
        ),
        Recipe(
            name="iwslt14-de-en",
            description="6+6-layer Transformer on IWSLT'14 German→English (fairseq transformer_iwslt_de_en: 512 "
            "wide, FFN 1024, 4 heads, dropout 0.3), joint BPE of 10k, beam 5",
            script="run_translation.py",
            data=("--train_file", "iwslt14/train.jsonl", "--validation_file", "iwslt14/valid.jsonl"),
            args=(
                "--source_lang",
                "de",
                "--target_lang",
                "en",
                "--model_type",
                "marian",
                "--config_overrides",
                "d_model=512,encoder_ffn_dim=1024,decoder_ffn_dim=1024,encoder_layers=6,"
                "decoder_layers=6,encoder_attention_heads=4,decoder_attention_heads=4,"
                "dropout=0.3,attention_dropout=0.0,activation_dropout=0.0,"
                "activation_function=relu,scale_embedding=true",
                "--vocab_size",
                "10000",
                "--max_source_length",
                "256",
                "--max_target_length",
                "256",
                "--per_device_train_batch_size",
                "128",
                "--per_device_eval_batch_size",
                "64",
                "--learning_rate",
                "5e-4",
                "--weight_decay",
                "0.0001",
                "--num_warmup_steps",
                "4000",
                "--lr_scheduler_type",
                "cosine",
                "--num_train_epochs",
                "50",
                "--max_grad_norm",
                "0",
                "--num_beams",
                "5",
                "--eval_strategy",
                "epoch",
                "--checkpointing_steps",
                "epoch",
                *MULTIMAX_FLAGS,
            ),
            num_processes=1,
            sources=(
                "fairseq examples/translation/README.md (IWSLT'14 German to English: --arch "
                "transformer_iwslt_de_en --share-decoder-input-output-embed, adam betas (0.9, 0.98), "
                "--clip-norm 0.0, --lr 5e-4, inverse_sqrt with 4000 warm-up updates, --dropout 0.3, "
                "--weight-decay 0.0001, label smoothing 0.1, --max-tokens 4096 on one GPU, BLEU with beam 5)",
                "fairseq transformer_iwslt_de_en architecture (6+6 layers, 512/1024, 4 heads, ReLU)",
                "MultiMax upstream multihead_attention.py and transformer_decoder.py",
            ),
            deviations=(
                "128 sentence pairs per step on one process, where fairseq fills batches up to 4096 tokens "
                "(the scripts batch by sentences)",
                "no label smoothing (the scripts train with plain cross-entropy); cosine decay instead of "
                "inverse square root; AdamW betas (0.9, 0.999)",
                "fairseq's README gives no stopping rule: 50 epochs here",
                "a byte-level BPE trained on both languages instead of fairseq's prepare-iwslt14.sh "
                "(Moses tokenizer, lower-casing, subword-nmt BPE); BLEU is sacreBLEU on detokenized text, not "
                "fairseq's tokenized BLEU",
                "MarianMT blocks (post-LayerNorm, sinusoidal positions, embeddings scaled by sqrt(d)) with all "
                "embeddings shared, where fairseq shares the decoder's input and output only",
            ),
        ),
        Recipe(
            name="deit-small-imagenet",
            description="DeiT-Small (12 layers, 384 wide, 6 heads, 16x16 patches, 224x224) on ImageNet-1K or any "
            "image folder, batch 1024, AdamW lr 1e-3 (5e-4 x 1024/512), weight decay 0.05, cosine over "
            "300 epochs with 5 warm-up epochs",
            script="run_image_classification.py",
            data=("--train_file", "imagenet/train", "--validation_file", "imagenet/val"),
            args=(
                "--model_type",
                "deit",
                "--image_size",
                "224",
                "--config_overrides",
                "hidden_size=384,intermediate_size=1536,num_hidden_layers=12,"
                "num_attention_heads=6,patch_size=16,hidden_dropout_prob=0.0,"
                "attention_probs_dropout_prob=0.0",
                "--per_device_train_batch_size",
                "256",
                "--per_device_eval_batch_size",
                "384",
                "--learning_rate",
                "1e-3",
                "--weight_decay",
                "0.05",
                "--lr_scheduler_type",
                "cosine",
                "--num_warmup_steps",
                "6255",
                "--num_train_epochs",
                "300",
                "--max_grad_norm",
                "0",
                "--eval_strategy",
                "epoch",
                "--checkpointing_steps",
                "epoch",
                *MULTIMAX_FLAGS,
            ),
            num_processes=4,
            sources=(
                "facebookresearch/deit README_deit.md (DeiT-small: 4 GPUs x --batch-size 256, 300 epochs) and "
                "main.py defaults (AdamW, lr 5e-4 scaled by batch/512, weight decay 0.05, cosine, 5 warm-up "
                "epochs, no gradient clipping)",
                "timm deit_small_patch16_224 (12 layers, 384 wide, 6 heads, patch 16)",
                "MultiMax upstream vision_transformer.py (σ on the attention scores and on the head's logits)",
            ),
            deviations=(
                "none of DeiT's regularisation: the script resizes and normalises only (no RandAugment, "
                "Mixup 0.8, CutMix 1.0, random erasing 0.25, repeated augmentation, label smoothing 0.1, "
                "stochastic depth 0.1 or EMA), so expect well under DeiT-S's 79.9% top-1 with either "
                "attention",
                "the class token as in Transformers' DeiT, where the MultiMax authors pool by global average",
                "6255 warm-up steps = 5 epochs of 1,281,167 images at 1024 per step; change it with the data "
                "set's size",
            ),
        ),
    )
}


def command(
    name: str,
    extra: Sequence[str] = (),
    num_processes: int | None = None,
    launcher: Sequence[str] | None = None,
    own_data: bool = False,
) -> list[str]:
    """The full command of recipe ``name`` with ``extra`` flags appended (they win over the recipe's); ``own_data``
    leaves out the recipe's data flags (``extra`` then says where the data is)."""
    recipe = RECIPES[name]
    processes = num_processes or recipe.num_processes
    if launcher is None:
        launcher = ["accelerate", "launch", "--num_processes", str(processes)]
        if processes > 1:
            launcher += ["--multi_gpu"]
    data = () if own_data else recipe.data
    return [*launcher, str(EXAMPLES / recipe.script), *data, *recipe.args, *extra]


def markdown(name: str) -> str:
    """Recipe ``name``'s command as the README shows it: a shell block, one flag and its value per line."""
    cmd = command(name)
    script = cmd.index(str(EXAMPLES / RECIPES[name].script))
    lines = [cmd[:script], [f"examples/{RECIPES[name].script}"]]
    for word in cmd[script + 1 :]:
        if word.startswith("--"):
            lines.append([])
        lines[-1].append(word)
    head, *rest = (shlex.join(words) for words in lines)
    return "```bash\n" + " \\\n    ".join([head, *rest]) + "\n```"


def write_jsonl(source_file: str, target_file: str, source_lang: str, target_lang: str, out=sys.stdout) -> int:
    """Pair two line-aligned text files (e.g. IWSLT'14 ``train.de`` and ``train.en``) into JSON lines of
    ``{source_lang: ..., target_lang: ...}``, the format ``run_translation.py --train_file`` reads; returns the
    count."""
    count = 0
    with open(source_file, encoding="utf-8") as src, open(target_file, encoding="utf-8") as tgt:
        for source, target in zip(src, tgt, strict=True):
            out.write(
                json.dumps({source_lang: source.rstrip("\n"), target_lang: target.rstrip("\n")}, ensure_ascii=False)
                + "\n"
            )
            count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the recipes, their sources and what differs from the paper's setting")
    for action in ("print", "run"):
        p = sub.add_parser(action, help=f"{action} a recipe's command; further flags are appended to it")
        p.add_argument("name", choices=sorted(RECIPES))
        p.add_argument("--num_processes", type=int, default=None, help="processes (GPUs) for accelerate launch")
        p.add_argument(
            "--own_data",
            action="store_true",
            help="leave out the recipe's data flags; give yours (--train_file, --dataset_name, ...)",
        )
    jsonl = sub.add_parser("jsonl", help="pair two line-aligned files into the JSON lines run_translation.py reads")
    for name in ("source_file", "target_file", "source_lang", "target_lang"):
        jsonl.add_argument(name)
    args, extra = parser.parse_known_args(argv)
    if args.action == "list":
        for recipe in RECIPES.values():
            print(
                f"{recipe.name}: {recipe.description}\n  sources: "
                + "\n           ".join(recipe.sources)
                + "\n  differs: "
                + "\n           ".join(recipe.deviations)
                + "\n"
            )
        return 0
    if args.action == "jsonl":
        write_jsonl(args.source_file, args.target_file, args.source_lang, args.target_lang)
        return 0
    cmd = command(args.name, extra, args.num_processes, own_data=args.own_data)
    if args.action == "print":
        print(shlex.join(cmd))
        return 0
    os.execvp(cmd[0], cmd)  # replaces this process; returns only on failure


if __name__ == "__main__":
    from hf_multimax.cli import run_script

    sys.exit(run_script(main))
