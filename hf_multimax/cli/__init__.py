"""The ``hf-multimax`` command line: one module per command, imported only when that command runs, so that
``hf-multimax --help`` costs no more than starting Python.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> exit code``. A user
mistake (a wrong path, a folder that is not a model, a bad flag value, a command whose extra is not installed) ends in
one ``error:`` line and exit code 2, never a traceback; ``--verbose`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from ..extras import MissingExtraError, require

__all__ = ["main", "build_parser", "run_script", "COMMANDS", "COMMAND_EXTRAS", "USER_ERRORS"]

#: command -> (one-line help, module that implements it).
COMMANDS: dict[str, tuple[str, str]] = {
    "info": (
        "Print versions, the registered attention implementations and the MultiMax flags.",
        "hf_multimax.cli.info",
    ),
    "compare": (
        "Train the same tiny model with SoftMax, MultiMax and the paper's comparators over seeds, on embedded "
        "data; mean ± 95%% CI, paired differences, plots.",
        "hf_multimax.cli.compare",
    ),
    "analyze": (
        "Analyse saved models' attention (sparsity, modes, entropy, over-smoothing, learned σ) and plot it.",
        "hf_multimax.cli.analyze",
    ),
    "push": ("Push a saved MultiMax model or adapter folder to the Hub, with a model card.", "hf_multimax.cli.push"),
}
#: command -> the extras (:mod:`hf_multimax.extras`) it needs, checked before its module is imported.
COMMAND_EXTRAS: dict[str, tuple[str, ...]] = {
    "info": (),
    "compare": ("train", "analysis"),
    "analyze": ("analysis",),
    "push": ("hub",),
}
#: Exceptions that mean "the user asked for something that cannot be done" (a bad flag value, a path that is not what
#: it should be, a model that does not load): one line, exit code 2. Anything else is a bug and shows its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    MissingExtraError,
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    OSError,
)


def _requested_command(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (the first argument that is not an option), if any."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the command named in ``argv`` gets its arguments (importing its module)."""
    parser = argparse.ArgumentParser(
        prog="hf-multimax",
        description="MultiMax attention for Hugging Face Transformers (`import hf_multimax`, then "
        '`from_pretrained(..., attn_implementation="multimax")`). Run `hf-multimax COMMAND --help` for a command\'s '
        "options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level and show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    requested = _requested_command(argv)
    for name, (help_text, module_name) in COMMANDS.items():
        # ``help`` is %-formatted by argparse (hence ``%%``), a description is printed as it is.
        command_parser = sub.add_parser(name, help=help_text, description=help_text.replace("%%", "%"))
        if name == requested:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-multimax`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _requested_command(argv)
    if command is not None:
        try:
            require(COMMAND_EXTRAS[command], f"hf-multimax {command}")
        except MissingExtraError as error:
            print(f"hf-multimax {command}: error: {error}", file=sys.stderr)
            return 2
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.run(args)
    except BrokenPipeError:  # `hf-multimax info | head`: the reader left; say nothing more (Python's own advice)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 1
    except USER_ERRORS as error:  # the library's errors for a user's mistake say what is wrong and how to fix it
        if args.verbose:
            import traceback

            traceback.print_exception(error)
        print(f"hf-multimax {args.command}: error: {error}", file=sys.stderr)
        return 2


def run_script(script_main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """The entry point of a script (``examples/run_*.py``): the exit code of ``script_main(argv)`` (its result when
    that is an int, else 0). A user's mistake (:data:`USER_ERRORS`: a wrong path, a model without its tokenizer, a
    bad flag value) ends in one ``SCRIPT: error: ...`` line and exit code 2 instead of a traceback
    (``HF_MULTIMAX_TRACEBACK=1`` shows it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = script_main(argv)
    except USER_ERRORS as error:
        if os.environ.get("HF_MULTIMAX_TRACEBACK", "").strip() not in ("", "0"):
            raise
        print(f"{os.path.basename(sys.argv[0]) or 'script'}: error: {error}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
