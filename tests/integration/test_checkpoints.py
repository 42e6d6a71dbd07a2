"""Checkpoints of the fine-tuning scripts survive a run killed while saving: a checkpoint appears under its name only
when complete, ``latest`` takes the newest complete one (and says which it skipped), and an explicitly named broken one
is one clear error naming the file."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from scripts import EXAMPLES, ROOT, load_example

from hf_multimax.finetune.loop import CheckpointError

COMMON = [
    "--max_train_samples",
    "300",
    "--block_size",
    "32",
    "--max_eval_samples",
    "20",
    "--max_train_steps",
    "6",
    "--per_device_train_batch_size",
    "4",
    "--multimax_init",
    "paper",
    "--eval_strategy",
    "end",
    "--checkpointing_steps",
    "2",
]

#: run_clm.py, killed (SIGKILL, no cleanup) in the middle of writing its step_4 checkpoint: after Accelerate has
#: written the model and optimizer, before the loop state.
KILLED_WHILE_SAVING = """
    import os, signal, sys
    from accelerate import Accelerator
    sys.path.insert(0, {examples!r})
    import run_clm

    original = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        result = original(self, output_dir, **kwargs)
        if "step_4" in str(output_dir):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Accelerator.save_state = save_state
    run_clm.main(sys.argv[1:])
"""


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, caplog):
    out = tmp_path / "run"
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_WHILE_SAVING.format(examples=str(EXAMPLES))))
    done = subprocess.run(
        [sys.executable, str(script), *COMMON, "--output_dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert "step_2" in names and "step_4" not in names  # the half-written one is not under its name
    assert (out / ".step_4.incomplete" / "model.safetensors").is_file()  # it was killed mid-save indeed
    assert json.loads((out / "step_2" / "training_state.json").read_text())["completed_steps"] == 2

    # An older layout's wreck too: a step_N folder with an empty state file (what a non-atomic save left behind).
    (out / "step_8").mkdir()
    (out / "step_8" / "training_state.json").write_text("")
    script = load_example("run_clm")
    with caplog.at_level(logging.INFO, logger="hf_multimax.finetune.loop"):
        resumed = script.main([*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming from"))
    assert "step_2" in line and "skipped incomplete step_8" in line
    assert [step for step, _ in resumed["losses"]] == [1, 2, 3, 4, 5, 6]
    assert not (out / ".step_4.incomplete").exists()  # the next save cleared the wreck
    assert (out / "step_4" / "training_state.json").is_file() and (out / "step_6").is_dir()

    full = script.main([*COMMON, "--output_dir", str(tmp_path / "full")])  # never interrupted: the same model
    assert [loss for _, loss in resumed["losses"]] == pytest.approx([loss for _, loss in full["losses"]], rel=1e-5)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_an_explicitly_named_broken_checkpoint_is_one_clear_error(tmp_path):
    broken = tmp_path / "step_2"
    broken.mkdir()
    (broken / "training_state.json").write_text("")
    with pytest.raises(CheckpointError, match=r"step_2/training_state.json is not a complete training state"):
        load_example("run_clm").main([*COMMON, "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(broken)])


def test_latest_with_only_broken_checkpoints_says_so(tmp_path):
    (tmp_path / "step_2").mkdir()
    (tmp_path / "step_2" / "training_state.json").write_text('{"completed_steps": 2')
    with pytest.raises(FileNotFoundError, match=r"no complete step_N or epoch_N checkpoint .* incomplete: step_2"):
        load_example("run_clm").main([*COMMON, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
