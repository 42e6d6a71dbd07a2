"""The hf-multimax command line."""

import subprocess
import sys

from hf_multimax.cli import main


def test_info_lists_versions_and_implementations(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "hf-multimax" in out and "transformers" in out and "torch" in out
    implementations = next(line for line in out.splitlines() if line.startswith("attention implementations"))
    assert "multimax" in implementations and "multimax_eager" in implementations and "sdpa" in implementations
    assert "multimax_order" in out and "default 2" in out


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "hf_multimax.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "usage: hf-multimax" in result.stdout and "info" in result.stdout


def test_command_help_reads_as_written(capsys):
    """A command's description is printed verbatim (argparse %-formats only ``help``), so ``%`` shows once."""
    try:
        main(["compare", "--help"])
    except SystemExit as stop:
        assert stop.code == 0
    out = capsys.readouterr().out
    assert "95% CI" in out and "%%" not in out
