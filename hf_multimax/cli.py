"""The ``hf-multimax`` command line."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import platform
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser", "COMMANDS"]

#: name -> (help, add_arguments(parser), run(args) -> exit code). Later modules add their commands here.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``run(args) -> int`` as ``hf-multimax NAME``."""

    def decorator(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return decorator


@command("info", "Print versions, the registered attention implementations and the MultiMax flags.")
def run_info(args: argparse.Namespace) -> int:
    import torch
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    import hf_multimax
    from hf_multimax.config import FLAG_DEFAULTS

    lines = [
        f"hf-multimax   {hf_multimax.__version__}",
        f"transformers  {transformers.__version__}",
        f"torch         {torch.__version__} (cuda available: {torch.cuda.is_available()})",
        f"python        {platform.python_version()} on {platform.machine()}",
        "",
        "attention implementations: eager, " + ", ".join(sorted(AttentionInterface().valid_keys())),
        "mask functions:            " + ", ".join(sorted(AttentionMaskInterface().valid_keys())),
        "",
        "MultiMax flags (config / from_pretrained keyword arguments):",
    ]
    lines += [f"  {name:<20} default {value!r}" for name, value in FLAG_DEFAULTS.items()]
    print("\n".join(lines))
    return 0


#: Modules that add commands with ``@command``; imported when the parser is built (each is optional until it exists).
COMMAND_MODULES = ("hf_multimax.compare", "hf_multimax.hub", "hf_multimax.analysis")


def load_commands() -> None:
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def build_parser() -> argparse.ArgumentParser:
    load_commands()
    parser = argparse.ArgumentParser(
        prog="hf-multimax",
        description="MultiMax attention for Hugging Face Transformers (`import hf_multimax`, then "
        "`from_pretrained(..., attn_implementation=\"multimax\")`).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    # Run as `python -m hf_multimax.cli`: this file is then `__main__`, and command modules register into the
    # imported `hf_multimax.cli`, so dispatch through that module.
    from hf_multimax.cli import main as package_main

    sys.exit(package_main())
