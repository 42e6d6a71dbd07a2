"""MultiMax under data parallelism and sharding, with real processes: two CPU processes talking over gloo.

* DDP: ``accelerate launch --multi_gpu --num_processes 2`` of the three example scripts and a
  ``transformers.Trainer`` run (``find_unused_parameters=False``, so a MultiMax parameter without a gradient would
  stop the run), with the MultiMax parameters compared across processes after every step, and the saved model
  compared with a single-process run on the same global batch and seed; ``--check_replicas`` names a parameter that
  drifted apart.
* FSDP2 through Accelerate's FSDP plugin (tests/distributed/fsdp_worker.py: Accelerate enables the plugin on GPUs
  only, the worker switches it on for CPU processes), same comparison.
* ``clip_grad_norm_`` on FSDP1 and FSDP2 gradient shards against a single-process reference.
* On a machine with CUDA only: the shipped FSDP1 and FSDP2 Accelerate configs with Accelerate's own launcher.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scripts import ROOT, load_example, load_module, reset_accelerate_state
from transformers import AutoModelForCausalLM

import hf_multimax  # noqa: F401  (registers "multimax" for the reloads)

WORKERS = Path(__file__).resolve().parent

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with gloo",
    ),
    pytest.mark.usefixtures("fresh_accelerate_state"),
]

#: A few optimizer steps of each example script on its embedded data, global batch 8 (non-identity σ; output-layer
#: MultiMax on the LM and the ViT). Translation batches are padded: equal results need the token-weighted loss.
SCRIPT_ARGS = {
    "run_clm": [
        "--max_train_samples",
        "300",
        "--block_size",
        "32",
        "--max_eval_samples",
        "40",
        "--multimax_output",
        "true",
    ],
    "run_translation": [
        "--max_train_samples",
        "200",
        "--max_eval_samples",
        "8",
        "--num_beams",
        "2",
        "--max_target_length",
        "16",
    ],
    "run_image_classification": ["--max_train_samples", "256", "--max_eval_samples", "64", "--multimax_output", "true"],
}
COMMON_ARGS = ["--max_train_steps", "4", "--eval_strategy", "end", "--multimax_init", "paper", "--seed", "3"]
CLM_ARGS = [*COMMON_ARGS, *SCRIPT_ARGS["run_clm"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    launcher: str, script: Path, *args: str, config_file: Path | None = None, num_processes: int = 2
) -> subprocess.CompletedProcess:
    """Run ``script`` as ``num_processes`` processes with ``accelerate launch`` or ``torchrun``; fail with its output
    on error.

    The rendezvous port is picked free just before the launch; if another program grabs it in between, the launch is
    retried once on a new port.
    """
    for attempt in range(2):
        port = str(free_port())
        if launcher == "accelerate":
            where = ["--config_file", str(config_file)] if config_file else ["--multi_gpu", "--num_machines", "1"]
            command = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                *where,
                "--num_processes",
                str(num_processes),
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "--num_cpu_threads_per_process",
                "1",
                "--main_process_port",
                port,
            ]
        else:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(num_processes),
                "--master_port",
                port,
            ]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if config_file is None and torch.cuda.is_available():  # CPU processes over gloo there too; on a machine
            env["ACCELERATE_USE_CPU"] = "true"  # without GPUs the scripts' own detection has to make them so
        done = subprocess.run(
            [*command, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        if done.returncode == 0 or "address already in use" not in done.stderr.lower() or attempt:
            break
    assert done.returncode == 0, f"{launcher} run failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done


def run_single_process(script: str, out: Path) -> Path:
    """The reference: one process on the CPU, batch 8 (= 2 processes × 4)."""
    previous = os.environ.get("ACCELERATE_USE_CPU")
    if torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        load_example(script).main(
            ["--output_dir", str(out), "--per_device_train_batch_size", "8", *COMMON_ARGS, *SCRIPT_ARGS[script]]
        )
    finally:
        reset_accelerate_state()
        if previous is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = previous
    return out


@pytest.fixture(scope="module")
def single_process_clm(tmp_path_factory) -> Path:
    return run_single_process("run_clm", tmp_path_factory.mktemp("single"))


def assert_same_training(parallel: Path, single: Path, distributed_type: str) -> None:
    """Same losses, evaluation loss and weights as the single-process run; replicas agreed after every step."""
    got = json.loads((parallel / "all_results.json").read_text())
    want = json.loads((single / "all_results.json").read_text())
    assert got["num_processes"] == 2 and got["distributed_type"] == distributed_type
    assert want["num_processes"] == 1
    # --check_replicas ran after every step and found every process holding the same MultiMax parameters.
    assert got["replica_check"] == {"steps": 4, "max_abs_diff": 0.0}
    assert [s for s, _ in got["losses"]] == [s for s, _ in want["losses"]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(got["losses"], want["losses"]):
        assert a == pytest.approx(b, abs=1e-5)
    assert got["metrics"]["eval_loss"] == pytest.approx(want["metrics"]["eval_loss"], abs=1e-5)

    a, b = load_file(parallel / "model.safetensors"), load_file(single / "model.safetensors")
    assert set(b) <= set(a)
    assert any("multimax" in k for k in b)
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0, msg=key)
        if "multimax" in key:  # the SegLU parameters themselves, tighter
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def assert_same_lm(parallel: Path, single: Path) -> None:
    """Both folders reload as MultiMax models that compute the same thing."""
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(path, attn_implementation="multimax")(input_ids=ids).logits
            for path in (parallel, single)
        ]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


def test_ddp_run_clm_matches_single_process(single_process_clm, tmp_path):
    out = tmp_path / "ddp"
    launch(
        "accelerate",
        ROOT / "examples" / "run_clm.py",
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "4",
        "--check_replicas",
        *CLM_ARGS,
    )
    assert_same_training(out, single_process_clm, "MULTI_CPU")
    assert_same_lm(out, single_process_clm)


@pytest.mark.parametrize("script", ["run_translation", "run_image_classification"])
def test_ddp_scripts_match_single_process(script, tmp_path):
    single = run_single_process(script, tmp_path / "single")
    out = tmp_path / "ddp"
    launch(
        "accelerate",
        ROOT / "examples" / f"{script}.py",
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "4",
        "--check_replicas",
        *COMMON_ARGS,
        *SCRIPT_ARGS[script],
    )
    assert_same_training(out, single, "MULTI_CPU")


def test_fsdp2_run_clm_matches_single_process_and_resumes(single_process_clm, tmp_path):
    out = tmp_path / "fsdp"
    args = ["--output_dir", str(out), "--per_device_train_batch_size", "4", "--check_replicas", *CLM_ARGS]
    launch("torchrun", WORKERS / "fsdp_worker.py", *args, "--checkpointing_steps", "2")
    assert_same_training(out, single_process_clm, "FSDP")
    assert_same_lm(out, single_process_clm)
    # The step-2 checkpoint holds sharded model and optimizer states; resuming from it ends where the run did.
    assert (out / "step_2" / "pytorch_model_fsdp_0").is_dir()
    uninterrupted = load_file(out / "model.safetensors")
    shutil.rmtree(out / "step_4")
    (out / "model.safetensors").unlink()
    launch("torchrun", WORKERS / "fsdp_worker.py", *args, "--resume_from_checkpoint", "latest")
    resumed = load_file(out / "model.safetensors")
    assert set(resumed) == set(uninterrupted)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Accelerate enables its FSDP plugin on GPUs only")
@pytest.mark.parametrize("config", ["fsdp1", "fsdp2"])
def test_fsdp_plugin_on_gpus(config, single_process_clm, tmp_path):
    """The shipped FSDP configs with Accelerate's own launcher on up to two GPUs (one process per GPU), float32."""
    processes = min(2, torch.cuda.device_count())
    out = tmp_path / config
    launch(
        "accelerate",
        ROOT / "examples" / "run_clm.py",
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        str(8 // processes),
        "--check_replicas",
        *CLM_ARGS,
        config_file=ROOT / "examples" / "accelerate_configs" / f"{config}.yaml",
        num_processes=processes,
    )
    got = json.loads((out / "all_results.json").read_text())
    assert got["distributed_type"] == "FSDP" and got["num_processes"] == processes
    assert got["replica_check"] == {"steps": 4, "max_abs_diff": 0.0}
    a, b = load_file(out / "model.safetensors"), load_file(single_process_clm / "model.safetensors")
    for key in b:  # GPU kernels against the CPU reference run: float32 round-off, amplified by 4 AdamW steps
        torch.testing.assert_close(a[key], b[key], atol=1e-3, rtol=0, msg=key)


def test_accelerate_configs_are_valid():
    """The configs the README points to load with Accelerate and keep the settings MultiMax relies on."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    configs = {
        path.stem: load_config_from_file(str(path))
        for path in (ROOT / "examples" / "accelerate_configs").glob("*.yaml")
    }
    assert set(configs) == {"multi_gpu", "multi_node", "fsdp1", "fsdp2"}
    assert configs["multi_gpu"].distributed_type == configs["multi_node"].distributed_type == DistributedType.MULTI_GPU
    assert configs["multi_node"].num_machines > 1 and configs["multi_node"].main_process_ip
    for name, version in (("fsdp1", 1), ("fsdp2", 2)):
        fsdp = configs[name].fsdp_config
        assert configs[name].distributed_type == DistributedType.FSDP
        assert fsdp["fsdp_version"] == version and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert configs["fsdp1"].fsdp_config["fsdp_use_orig_params"] is True


def test_trainer_ddp_matches_single_process(tmp_path):
    launch(
        "accelerate",
        WORKERS / "trainer_worker.py",
        "--output_dir",
        str(tmp_path / "ddp"),
        "--per_device_train_batch_size",
        "4",
    )
    load_module(WORKERS / "trainer_worker.py").main(
        ["--output_dir", str(tmp_path / "single"), "--per_device_train_batch_size", "8"]
    )
    ddp = json.loads((tmp_path / "ddp" / "worker.json").read_text())
    single = json.loads((tmp_path / "single" / "worker.json").read_text())
    assert (ddp["world_size"], single["world_size"]) == (2, 1)
    assert ddp["replica_diffs"] == [0.0] * 4
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-5)
    a, b = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    assert set(a) == set(b) and any("lm_head.multimax" in k for k in a)
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("processes", [2, 3])  # 3: uneven shards of the 4 values per layer
def test_clip_grad_norm_on_fsdp_shards(processes, tmp_path):
    report_path = tmp_path / "clip.json"
    launch("torchrun", WORKERS / "clip_worker.py", str(report_path), num_processes=processes)
    report = json.loads(report_path.read_text())
    assert "use_orig_params=False" in report.pop("flat_params_error")
    assert sorted(report) == sorted(f"fsdp{v}_{m}" for v in (1, 2) for m in ("separate", "scaled", "global"))
    for name, row in report.items():
        assert row["norm_rel_diff"] < 1e-5, name
        assert row["grad_max_abs_diff"] < 1e-5, name
        assert row["multimax_grads_compared_all_ranks"] > 0, name
    # The modes differ (the output σ gradient dominates the global norm in this setup), so each was really tested.
    assert report["fsdp2_global"]["norm"] > 2 * report["fsdp2_separate"]["norm"]


def test_check_replicas_names_the_parameter_that_drifted(tmp_path):
    launch("accelerate", WORKERS / "replica_worker.py", str(tmp_path / "replicas.json"))
    report = json.loads((tmp_path / "replicas.json").read_text())
    assert report["num_processes"] == 2
    assert report["before"] == [0.0, None]
    # Names in the DDP-wrapped model carry its "module." prefix.
    assert report["after"][0] == pytest.approx(0.25)
    assert report["after"][1] == "module.model.layers.1.self_attn.multimax.multimax_ts"
    assert "after step 7" in report["error"] and "model.layers.1.self_attn.multimax.multimax_ts" in report["error"]


def test_cpu_launch_is_detected(monkeypatch):
    """Several processes on a machine without an accelerator need Accelerate's cpu=True (gloo); one process does not."""
    from hf_multimax.training.distributed import launched_without_accelerator

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_without_accelerator() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_without_accelerator() is (not torch.accelerator.is_available())
