"""The core install works with torch and Transformers alone: run by `.ci/run` in a fresh venv where hf-multimax was
installed without extras (`pip install .`).

It builds a tiny MultiMax Llama, trains a step, saves and reloads it (the same logits), generates, imports
`MultiMaxTrainer`, and checks that every command or script that needs an extra ends in one `error:` line naming the
extra, with exit code 2. Usage: `python .ci/core_check.py REPO_ROOT` (run from outside the repository, so that the
installed package is the one imported).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_multimax
from hf_multimax.extras import EXTRAS, missing

REPO = Path(sys.argv[1]).resolve()
#: Every extra's modules but jinja2, which torch itself requires.
EXTRA_MODULES = sorted({module for modules in EXTRAS.values() for module in modules} - {"jinja2"})


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"core check failed: {what}")
    print(f"ok: {what}")


def main() -> None:
    installed = sorted(set(EXTRA_MODULES) - set(missing(EXTRA_MODULES)))
    check(installed == [], f"no extra's package is installed (found {installed})")
    check(Path(hf_multimax.__file__).resolve().parents[1] != REPO, "the installed package is imported, not the tree")

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config.update({"num_key_value_heads": 2, "vocab_size": 64, "multimax_init": "paper", "multimax_output": True})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="multimax")
    check(len(hf_multimax.multimax_modules(model)) == 3, "two attention layers and the LM head get their σ")
    optimizer = torch.optim.AdamW(hf_multimax.multimax_parameter_groups(model, weight_decay=0.1), lr=1e-2)
    ids = torch.randint(0, 64, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    check(all(g is not None and torch.isfinite(g).all() for g in grads), "every parameter has a finite gradient")
    optimizer.step()

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="multimax")
        model.eval()
        with torch.no_grad():
            same = torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        check(same, "save_pretrained / from_pretrained give the same logits")
        out = reloaded.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        check(tuple(out.shape) == (2, 9), "generate runs")

    from transformers import Trainer

    from hf_multimax import MultiMaxTrainer  # running a Trainer needs accelerate, as in Transformers itself

    check(issubclass(MultiMaxTrainer, Trainer), "MultiMaxTrainer is there (a transformers.Trainer)")
    _extras_are_named()


def _extras_are_named() -> None:
    commands = {
        "hf-multimax compare": (["hf-multimax", "compare", "--task", "lm"], "hf-multimax[train,analysis]"),
        "hf-multimax analyze": (["hf-multimax", "analyze", str(REPO)], "hf-multimax[analysis]"),
        "hf-multimax push": (["hf-multimax", "push", str(REPO), "you/model", "--dry-run"], "hf-multimax[hub]"),
        "examples/run_clm.py": ([sys.executable, str(REPO / "examples" / "run_clm.py")], "hf-multimax[train]"),
    }
    bindir = Path(sys.executable).parent
    for what, (argv, extra) in commands.items():
        if argv[0] == "hf-multimax":
            argv = [str(bindir / "hf-multimax"), *argv[1:]]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir())
        lines = done.stderr.strip().splitlines()
        check(
            done.returncode == 2 and len(lines) == 1 and "error:" in lines[0] and extra in lines[0],
            f"{what} without its extra: one error line naming {extra} (got exit {done.returncode}: {lines[-3:]})",
        )
    done = subprocess.run([str(bindir / "hf-multimax"), "info"], capture_output=True, text=True, timeout=300)
    check(done.returncode == 0 and "multimax" in done.stdout, "hf-multimax info runs on the core")


if __name__ == "__main__":
    main()
