"""``hf-multimax compare``: both runs train, from the same weights, and leave a table, a plot, results and models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import hf_multimax
from hf_multimax import cli
from hf_multimax.compare import format_table, plot_loss_curves


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_compare_vit_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = cli.main(["compare", "--task", "vit", "--max_train_steps", "4", "--output_dir", str(out),
                     "--script_args", "--max_train_samples 128 --max_eval_samples 32"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| sdpa |" in printed and "| multimax |" in printed and "accuracy" in printed

    png = (out / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    summary = json.loads((out / "results.json").read_text())
    runs = summary["results"]
    assert set(runs) == {"sdpa", "multimax"}
    assert all(run["steps"] == 4 and len(run["losses"]) == 4 for run in runs.values())
    # Same seed, same initial weights, and identity-initialised MultiMax = SoftMax: the first loss is the same.
    assert runs["sdpa"]["losses"][0][1] == pytest.approx(runs["multimax"]["losses"][0][1], abs=1e-5)
    assert "| sdpa |" in (out / "results.md").read_text()

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    for name in ("sdpa", "multimax"):
        model = AutoModelForImageClassification.from_pretrained(out / name, attn_implementation="multimax")
        assert AutoImageProcessor.from_pretrained(out / name) is not None
        assert hf_multimax.multimax_modules(model)
    # The baseline is plain SoftMax: its checkpoint has no MultiMax parameters; the MultiMax one has.
    assert not any("multimax" in k for k in load_file(out / "sdpa" / "model.safetensors"))
    assert any("multimax" in k for k in load_file(out / "multimax" / "model.safetensors"))


def test_compare_lm_with_flags_and_three_implementations(tmp_path, capsys):
    out = tmp_path / "lm"
    code = cli.main(["compare", "--task", "lm", "--max_train_steps", "2", "--output_dir", str(out),
                     "--implementations", "eager", "multimax", "multimax_eager", "--multimax_init", "paper",
                     "--multimax_order", "3", "--script_args", "--max_train_samples 200 --block_size 32"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("eager", "multimax", "multimax_eager"):
        assert f"| {name} |" in printed
    assert json.loads((out / "multimax" / "config.json").read_text())["multimax_order"] == 3
    # MultiMax flags go to the MultiMax runs only: the baseline is plain SoftMax.
    assert not any("multimax" in k for k in load_file(out / "eager" / "model.safetensors"))
    runs = json.loads((out / "results.json").read_text())["results"]
    # Both MultiMax paths compute the same function from the same weights.
    torch.testing.assert_close(torch.tensor(runs["multimax"]["losses"]), torch.tensor(runs["multimax_eager"]["losses"]),
                               rtol=1e-4, atol=1e-4)


def test_format_table_and_plot(tmp_path):
    results = {
        "sdpa": {"train_loss": 2.0, "metrics": {"eval_loss": 2.1, "perplexity": 8.2}, "time_per_step": 0.010,
                 "losses": [(1, 3.0), (2, 2.5), (3, 2.0)]},
        "multimax": {"train_loss": 1.9, "metrics": {"eval_loss": 2.0, "perplexity": 7.4}, "time_per_step": 0.012,
                     "losses": [(1, 3.0), (2, 2.4), (3, 1.9)]},
    }
    table = format_table("lm", results).splitlines()
    assert table[0].startswith("| attention |") and "perplexity ↓" in table[0]
    assert table[2] == "| sdpa | 2.0000 | 2.1000 | 8.2 | 10.0 ms | 1.00× |"
    assert table[3] == "| multimax | 1.9000 | 2.0000 | 7.4 | 12.0 ms | 1.20× |"
    path = plot_loss_curves(results, tmp_path / "sub" / "curves.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_compare_rejects_unknown_task():
    with pytest.raises(SystemExit):
        cli.main(["compare", "--task", "speech"])
