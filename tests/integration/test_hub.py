"""hf_multimax.hub: the pushed folder, its model card, reloading it, and every way an upload can fail.

No test reaches the Hub: uploads are recorded at huggingface_hub's boundary (``HfApi`` methods) and the failures are
the library's own exception types, built as the library builds them; the "no network" tests make real calls to a
local port that refuses or never answers.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx2
import pytest
import torch
from hub_helpers import WORDS, tiny_tokenizer
from huggingface_hub import EvalResult, HfApi, ModelCard
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from huggingface_hub.utils import hf_raise_for_status
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

import hf_multimax
from hf_multimax.cli import main
from hf_multimax.hub import HubPushError, push_to_hub

REPO = "someone/tiny-multimax"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def randomise_multimax(model: torch.nn.Module, seed: int = 0) -> None:
    """Learned-looking (non-identity) MultiMax parameters, so that equality checks mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for seglu in hf_multimax.multimax_modules(model).values():
            seglu.multimax_ranges.copy_(torch.randn(seglu.multimax_ranges.shape, generator=generator))
            seglu.multimax_ts.copy_(0.3 * torch.randn(seglu.multimax_ts.shape, generator=generator))


def tiny_llama(**flags) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        **flags,
    )
    config._attn_implementation = "multimax"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    randomise_multimax(model)
    return model


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def pushed(llama, tokenizer, tmp_path_factory):
    """One dry-run push of the Llama with its tokenizer and full card metadata."""
    local_dir = tmp_path_factory.mktemp("push") / "tiny"
    result = push_to_hub(
        llama,
        REPO,
        local_dir=local_dir,
        dry_run=True,
        tokenizer=tokenizer,
        base_model="someone/tiny-base",
        datasets=["someone/tiny-text"],
        pipeline_tag="text-generation",
        eval_results={"perplexity": 12.5, "accuracy": 0.25},
    )
    return result


@pytest.fixture(scope="module")
def saved_dir(pushed) -> Path:
    """A folder to push from (the dry-run folder: a complete save_pretrained folder)."""
    return pushed.local_dir


def input_ids(tokenizer) -> torch.Tensor:
    return tokenizer(["the cat sat on a mat", "a dog ran on the mat"], return_tensors="pt").input_ids


# ----------------------------------------------------------------------------------------------------------------------
# The folder and its card


def test_dry_run_writes_exactly_the_upload_folder(pushed):
    assert not pushed.uploaded and pushed.commit_url is None
    assert set(pushed.files) == {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "multimax_sigma.png",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert set(pushed.files) == {p.name for p in pushed.local_dir.iterdir()}
    config = json.loads((pushed.local_dir / "config.json").read_text())
    assert {k: config[k] for k in ("multimax_order", "multimax_per_head", "multimax_output")} == {
        "multimax_order": 2,
        "multimax_per_head": False,
        "multimax_output": False,
    }
    # Recorded by save_pretrained (Transformers reads it back); without remote_code, no auto_map and no code.
    assert config["attn_implementation"] == "multimax"
    assert "auto_map" not in config and "multimax_remote_code" not in config


def test_card_metadata_parses_back(pushed, llama):
    card = ModelCard.load(pushed.local_dir / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert {"multimax", "hf-multimax", "llama"} <= set(data.tags)
    assert data.base_model == "someone/tiny-base"
    assert data.datasets == ["someone/tiny-text"]
    assert data.license == "apache-2.0" and data.pipeline_tag == "text-generation"
    assert data.multimax == {"order": 2, "init": "identity", "per_head": False, "output": False}
    assert data.model_name == "tiny-multimax"
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics == {"perplexity": 12.5, "accuracy": 0.25}
    assert {(r.task_type, r.dataset_type) for r in data.eval_results} == {("text-generation", "someone/tiny-text")}
    assert "model-index" in (pushed.local_dir / "README.md").read_text()


def test_card_text_usage_table_and_plot(pushed, llama):
    text = ModelCard.load(pushed.local_dir / "README.md").text
    assert "pip install hf-multimax" in text and "import hf_multimax" in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", attn_implementation="multimax")' in text
    assert f'AutoTokenizer.from_pretrained("{REPO}")' in text
    assert "### With hf-multimax" in text and "### With remote code" not in text  # pushed without remote_code
    assert "this repository has no remote code" in text
    assert 'records `"attn_implementation": "multimax"`' in text
    assert 'Plain Transformers refuses this checkpoint (`Specified attn_implementation="multimax"' in text
    assert "](multimax_sigma.png)" in text
    for name, seglu in hf_multimax.multimax_modules(llama).items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name.removesuffix('.multimax')}` |"))
        for value in torch.cat([seglu.multimax_ranges, seglu.multimax_ts]).tolist():
            assert f"{value:+.4f}" in row
    assert "<details>" not in text  # shared parameters: no per-head listing


def test_plot_is_a_valid_png(pushed):
    import matplotlib.image

    path = pushed.local_dir / "multimax_sigma.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5_000
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 100 and width > 200


def test_reload_with_multimax_is_bit_identical(pushed, llama, tokenizer):
    reloaded = AutoModelForCausalLM.from_pretrained(pushed.local_dir, attn_implementation="multimax").eval()
    reloaded_tokenizer = PreTrainedTokenizerFast.from_pretrained(pushed.local_dir)
    ids = input_ids(tokenizer)
    assert torch.equal(
        reloaded_tokenizer(["the cat sat on a mat", "a dog ran on the mat"], return_tensors="pt").input_ids, ids
    )
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, llama(ids).logits)


def test_reload_without_multimax_warns(pushed):
    with pytest.warns(hf_multimax.MultiMaxWarning, match="attn_implementation"):
        AutoModelForCausalLM.from_pretrained(pushed.local_dir, attn_implementation="eager")


def test_vit_with_image_processor_and_per_head_parameters(tmp_path):
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        multimax_per_head=True,
    )
    config._attn_implementation = "multimax"
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    randomise_multimax(model, seed=1)
    processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5])
    result = push_to_hub(
        model, REPO, local_dir=tmp_path / "vit", dry_run=True, processor=processor, pipeline_tag="image-classification"
    )
    assert "preprocessor_config.json" in result.files and "model.safetensors" in result.files
    card = ModelCard.load(result.local_dir / "README.md")
    assert card.data.multimax["per_head"] is True and card.data.pipeline_tag == "image-classification"
    assert (
        'AutoModelForImageClassification.from_pretrained("someone/tiny-multimax", attn_implementation="multimax")'
        in card.text
    )
    assert "AutoImageProcessor" in card.text
    assert card.text.count("<details>") == 2
    # One table row per layer (named as in the checkpoint), shape heads × 2N.
    assert card.text.count("` | attention | (4, 4) |") == 2

    reloaded = AutoModelForImageClassification.from_pretrained(result.local_dir, attn_implementation="multimax").eval()
    pixels = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_softmax_baseline_gets_a_plain_card(tmp_path):
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    result = push_to_hub(LlamaForCausalLM(config), REPO, local_dir=tmp_path / "softmax", dry_run=True)
    assert "multimax_sigma.png" not in result.files
    card = ModelCard.load(result.local_dir / "README.md")
    assert "multimax" not in card.data.tags and "hf-multimax" in card.data.tags
    assert 'from_pretrained("someone/tiny-multimax")' in card.text and "attn_implementation" not in card.text


# ----------------------------------------------------------------------------------------------------------------------
# LoRA runs


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A PEFT LoRA model whose MultiMax parameters are trained through ``modules_to_save=["multimax"]``."""
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path_factory.mktemp("base") / "base"
    base = tiny_llama()
    randomise_multimax(base, seed=5)
    base.save_pretrained(base_dir)
    peft_config = LoraConfig(
        r=2,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["multimax"],
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="multimax"), peft_config)
    with torch.no_grad():  # "trained" MultiMax copies, different from the base's
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param))
    return model.eval(), base_dir


def test_lora_adapter_push_reloads_base_adapter_and_multimax(lora, tokenizer, tmp_path):
    from peft import PeftModel

    model, base_dir = lora
    result = push_to_hub(
        model, REPO, local_dir=tmp_path / "adapter", dry_run=True, base_model=str(base_dir), tokenizer=tokenizer
    )
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "multimax_sigma.png"} <= set(result.files)
    assert "model.safetensors" not in result.files
    adapter_config = json.loads((result.local_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir)
    assert adapter_config["modules_to_save"] == ["multimax"]

    card = ModelCard.load(result.local_dir / "README.md")
    assert card.data.library_name == "peft" and {"multimax", "peft", "lora"} <= set(card.data.tags)
    assert card.data.base_model == str(base_dir)
    assert 'PeftModel.from_pretrained(base, "someone/tiny-multimax")' in card.text
    assert "multimax_order=2" in card.text and "multimax_per_head=False" in card.text
    trained = {
        n.removeprefix("base_model.model.").removesuffix(".modules_to_save.default"): m
        for n, m in hf_multimax.multimax_modules(model).items()
        if n.endswith("modules_to_save.default")
    }
    assert len(trained) == 2
    for name, seglu in trained.items():
        row = next(
            line for line in card.text.splitlines() if line.startswith(f"| `{name.removesuffix('.multimax')}` |")
        )
        assert f"{seglu.multimax_ts[0].item():+.4f}" in row

    # The adapter folder pushed again (e.g. `hf-multimax push ADAPTER_DIR`): the flags come from the base model's
    # config.json (on disk here, named by adapter_config.json), so `init` is known too.
    again = push_to_hub(result.local_dir, REPO, local_dir=tmp_path / "again", dry_run=True)
    flags = {"order": 2, "init": "identity", "per_head": False, "output": False}
    assert ModelCard.load(again.local_dir / "README.md").data.multimax == flags
    assert set(again.files) == set(result.files)
    # Without the base model at hand they are inferred from the stored shapes (init cannot be; roles unknown).
    adapter_config = json.loads((again.local_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "someone/not-on-this-machine"
    (again.local_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    alone = push_to_hub(again.local_dir, REPO, local_dir=tmp_path / "alone", dry_run=True)
    card = ModelCard.load(alone.local_dir / "README.md")
    assert card.data.multimax == {"order": 2, "per_head": False}
    assert "unknown (no config to tell)" in card.text

    ids = input_ids(tokenizer)
    with torch.no_grad():
        expected = model(ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="multimax")
        assert torch.equal(PeftModel.from_pretrained(base, result.local_dir).eval()(ids).logits, expected)
        # Transformers' PEFT integration: the adapter folder alone names its base model.
        direct = AutoModelForCausalLM.from_pretrained(result.local_dir, attn_implementation="multimax").eval()
        assert torch.equal(direct(ids).logits, expected)


def test_lora_merged_push_is_a_full_multimax_model(lora, tokenizer, tmp_path):
    model, base_dir = lora
    ids = input_ids(tokenizer)
    with torch.no_grad():
        before = model(ids).logits
    result = push_to_hub(model, REPO, local_dir=tmp_path / "merged", dry_run=True, merge_adapter=True)
    assert {"config.json", "model.safetensors"} <= set(result.files) and "adapter_config.json" not in result.files
    reloaded = AutoModelForCausalLM.from_pretrained(result.local_dir, attn_implementation="multimax").eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # the PeftModel itself is untouched
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=1e-5, atol=1e-5)  # merging LoRA rounds


# ----------------------------------------------------------------------------------------------------------------------
# Folder input and the CLI


def test_folder_push_copies_model_files_only(llama, tokenizer, tmp_path):
    run = tmp_path / "run"
    llama.save_pretrained(run)
    tokenizer.save_pretrained(run)
    for name in (
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "training_args.bin",
        "trainer_state.json",
        "README.md",
    ):
        (run / name).write_text("training state")
    (run / "checkpoint-10").mkdir()
    (run / "checkpoint-10" / "model.safetensors").write_text("old")

    result = push_to_hub(run, REPO, local_dir=tmp_path / "out", dry_run=True)
    assert set(result.files) == {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "multimax_sigma.png",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert (result.local_dir / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    assert "multimax" in ModelCard.load(result.local_dir / "README.md").data.tags

    # Pushing again replaces the earlier push folder; pushing the folder onto itself (a retry) keeps it.
    again = push_to_hub(run, REPO, local_dir=tmp_path / "out", dry_run=True)
    assert again.files == result.files
    in_place = push_to_hub(result.local_dir, REPO, local_dir=result.local_dir, dry_run=True)
    assert in_place.files == result.files
    # Any other non-empty folder is refused, and left alone.
    with pytest.raises(ValueError, match="not empty"):
        push_to_hub(run, REPO, local_dir=run.parent / "run" / "checkpoint-10", dry_run=True)
    assert (run / "checkpoint-10" / "model.safetensors").read_text() == "old"
    with pytest.raises(ValueError, match="not written by push_to_hub"):  # a training folder is never pushed in place
        push_to_hub(run, REPO, local_dir=run, dry_run=True)
    assert not (run / "multimax_sigma.png").exists()


def test_cli_push_dry_run(saved_dir, tmp_path, capsys):
    local = tmp_path / "cli"
    code = main(
        [
            "push",
            str(saved_dir),
            REPO,
            "--dry-run",
            "--local-dir",
            str(local),
            "--base-model",
            "someone/base",
            "--dataset",
            "someone/a",
            "--dataset",
            "someone/b",
            "--license",
            "mit",
            "--pipeline-tag",
            "text-generation",
            "--eval-results",
            '{"perplexity": 3.5, "dataset_split": "test"}',
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "dry run" in out and str(local) in out and "model.safetensors" in out
    data = ModelCard.load(local / "README.md").data
    assert data.datasets == ["someone/a", "someone/b"] and data.license == "mit" and data.base_model == "someone/base"
    assert [(r.metric_type, r.metric_value, r.dataset_split) for r in data.eval_results] == [
        ("perplexity", 3.5, "test")
    ]


def test_cli_push_error_is_one_line_and_exit_code(saved_dir, tmp_path, capsys, monkeypatch):
    clear_token(monkeypatch, tmp_path)
    code = main(["push", str(saved_dir), REPO, "--local-dir", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("hf-multimax push: error: Could not push") and "hf auth login" in err


# ----------------------------------------------------------------------------------------------------------------------
# Uploads, recorded at the huggingface_hub boundary


class Recorder:
    """Replaces HfApi methods: records (name, args, kwargs, files in the folder at call time), or raises."""

    def __init__(self, raise_in: str | None = None, error: BaseException | None = None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.raise_in, self.error = raise_in, error

    def method(self, name: str, returns):
        def record(api, *args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == self.raise_in:
                raise self.error
            return returns(*args, **kwargs)

        return record

    def install(self, monkeypatch) -> None:
        from huggingface_hub import CommitInfo, RepoUrl

        monkeypatch.setattr(
            HfApi,
            "create_repo",
            self.method("create_repo", lambda repo_id, **_: RepoUrl(f"https://huggingface.co/{repo_id}")),
        )
        monkeypatch.setattr(HfApi, "create_branch", self.method("create_branch", lambda *a, **k: None))

        def commit(**kwargs):
            self.uploaded_files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            return CommitInfo(
                commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123",
                commit_message="",
                commit_description="",
                oid="abc123",
            )

        monkeypatch.setattr(HfApi, "upload_folder", self.method("upload_folder", commit))


def hub_error(status: int, url: str, headers: dict | None = None, json_body: dict | None = None) -> HfHubHTTPError:
    """The exception huggingface_hub raises for this HTTP answer (built by its own ``hf_raise_for_status``)."""
    response = httpx2.Response(status, request=httpx2.Request("POST", url), headers=headers or {}, json=json_body)
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as err:
        return err
    raise AssertionError("hf_raise_for_status did not raise")


def clear_token(monkeypatch, tmp_path) -> None:
    """No token anywhere huggingface_hub looks (environment, stored login)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_upload_calls_and_arguments(saved_dir, tmp_path, monkeypatch):
    recorder = Recorder()
    recorder.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    local = tmp_path / "up"
    result = push_to_hub(
        saved_dir,
        REPO,
        local_dir=local,
        private=True,
        revision="experiment",
        commit_message="first push",
        connect_timeout=None,
    )
    assert [name for name, _, _ in recorder.calls] == ["create_repo", "create_branch", "upload_folder"]
    (_, args, create), (_, branch_args, branch), (_, _, upload) = recorder.calls
    assert args == (REPO,) and create == {
        "token": "hf_from_env",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    assert branch_args == (REPO,) and branch == {
        "branch": "experiment",
        "token": "hf_from_env",
        "exist_ok": True,
        "repo_type": "model",
    }
    assert upload == {
        "repo_id": REPO,
        "folder_path": local,
        "commit_message": "first push",
        "revision": "experiment",
        "token": "hf_from_env",
        "repo_type": "model",
    }
    assert recorder.uploaded_files == sorted(result.files)  # the card and plot are there before the upload
    assert (
        result.uploaded
        and result.commit_url.endswith("/commit/abc123")
        and result.repo_url == f"https://huggingface.co/{REPO}"
    )


def test_upload_to_default_branch_skips_create_branch_and_uses_given_api(saved_dir, tmp_path, monkeypatch):
    recorder = Recorder()
    recorder.install(monkeypatch)
    result = push_to_hub(
        saved_dir,
        REPO,
        local_dir=tmp_path / "up",
        token="hf_explicit",
        exist_ok=False,
        api=HfApi(endpoint="https://hub.example"),
        connect_timeout=None,
    )
    assert [name for name, _, _ in recorder.calls] == ["create_repo", "upload_folder"]
    assert recorder.calls[0][2]["exist_ok"] is False and recorder.calls[0][2]["private"] is False
    assert recorder.calls[1][2]["token"] == "hf_explicit" and recorder.calls[1][2]["revision"] is None
    assert recorder.calls[1][2]["commit_message"] == "Upload MultiMax model with hf-multimax"
    assert result.uploaded


CREATE = "https://huggingface.co/api/repos/create"
COMMIT = f"https://huggingface.co/api/models/{REPO}/commit/main"
FAILURES = {
    "no network": (
        "create_repo",
        httpx2.ConnectError("[Errno -2] Name or service not known"),
        "could not be reached (ConnectError: [Errno -2] Name or service not known); check the network",
    ),
    "network timeout": ("upload_folder", httpx2.ReadTimeout("timed out"), "did not answer (ReadTimeout: timed out)"),
    "repo exists": (
        "create_repo",
        hub_error(409, CREATE, json_body={"error": "You already created this model repo"}),
        f"the repository '{REPO}' already exists and exist_ok=False",
    ),
    "bad token": (
        "create_repo",
        hub_error(401, CREATE, json_body={"error": "Invalid credentials in Authorization header"}),
        "the Hub rejected the token (HTTP 401: Invalid credentials in Authorization header)",
    ),
    "no write access": (
        "create_repo",
        hub_error(403, CREATE, json_body={"error": "You don't have the rights"}),
        f"the token may not write to '{REPO}' (HTTP 403: You don't have the rights)",
    ),
    "repo not found": (
        "upload_folder",
        hub_error(404, COMMIT, headers={"X-Error-Code": "RepoNotFound"}),
        f"the repository '{REPO}' was not found, or the token cannot access it",
    ),
    "upload rejected": (
        "upload_folder",
        hub_error(400, COMMIT, headers={"X-Error-Message": "Invalid metadata in README.md"}),
        "the Hub rejected the upload (HTTP 400: Invalid metadata in README.md)",
    ),
    "branch rejected": (
        "create_branch",
        hub_error(400, COMMIT, headers={"X-Error-Message": "Invalid branch name"}),
        "the Hub rejected the creation of branch 'v1' (HTTP 400: Invalid branch name)",
    ),
    "token missing in call": (
        "create_repo",
        LocalTokenNotFoundError("Token is required (`token=True`)"),
        "hf auth login",
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_each_failure_is_one_clear_error_and_keeps_the_folder(case, saved_dir, tmp_path, monkeypatch):
    stage, error, expected = FAILURES[case]
    recorder = Recorder(raise_in=stage, error=error)
    recorder.install(monkeypatch)
    local = tmp_path / "kept"
    with pytest.raises(HubPushError) as info:
        push_to_hub(
            saved_dir,
            REPO,
            local_dir=local,
            token="hf_test",
            exist_ok=case != "repo exists",
            revision="v1" if case == "branch rejected" else None,
            connect_timeout=None,
        )
    message = str(info.value)
    assert message.startswith(f"Could not push to '{REPO}': ") and expected in message
    assert f"kept at {local}" in message and f"hf-multimax push {local} {REPO} --local-dir {local}" in message
    assert info.value.local_dir == local and info.value.__cause__ is error
    assert (local / "model.safetensors").is_file() and (local / "README.md").is_file()
    assert recorder.calls[-1][0] == stage  # nothing was attempted after the failure


def test_no_token_fails_before_any_hub_call(saved_dir, tmp_path, monkeypatch):
    recorder = Recorder()
    recorder.install(monkeypatch)
    clear_token(monkeypatch, tmp_path)
    local = tmp_path / "kept"
    with pytest.raises(HubPushError) as info:
        push_to_hub(saved_dir, REPO, local_dir=local)
    message = str(info.value)
    assert "no Hugging Face token found" in message
    assert "hf auth login" in message and "huggingface-cli login" in message and "HF_TOKEN" in message
    assert str(local) in message and (local / "model.safetensors").is_file()
    assert recorder.calls == []


def test_offline_mode_is_a_clear_error(saved_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set") as info:
        push_to_hub(saved_dir, REPO, local_dir=tmp_path / "kept", token="hf_test")
    assert str(tmp_path / "kept") in str(info.value)


# Real huggingface_hub calls, no network needed: a port that refuses, and one that accepts but never answers.


def test_real_call_refused_connection_is_quick_and_clear(saved_dir, tmp_path):
    with socket.socket() as probe:  # a free port, closed again: connecting to it is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(HubPushError, match="could not be reached") as info:
        push_to_hub(
            saved_dir,
            REPO,
            local_dir=tmp_path / "kept",
            token="hf_test",
            api=HfApi(endpoint=f"http://127.0.0.1:{port}"),
            connect_timeout=None,
        )
    assert time.monotonic() - start < 10
    assert type(info.value.__cause__).__name__ == "ConnectError"


def test_real_call_unanswered_times_out(saved_dir, tmp_path):
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(HubPushError, match=r"did not answer within 0\.5 s") as info:
            push_to_hub(
                saved_dir,
                REPO,
                local_dir=tmp_path / "kept",
                token="hf_test",
                api=HfApi(endpoint=f"http://127.0.0.1:{port}"),
                connect_timeout=0.5,
            )
        assert time.monotonic() - start < 10
    assert "Timeout" in type(info.value.__cause__).__name__


def test_eval_results_accepts_evalresult_objects_and_needs_a_task(saved_dir, tmp_path):
    result = EvalResult(
        task_type="text-generation",
        dataset_type="wikitext",
        dataset_name="WikiText",
        metric_type="perplexity",
        metric_value=9.0,
        dataset_split="validation",
    )
    pushed = push_to_hub(saved_dir, REPO, local_dir=tmp_path / "a", dry_run=True, eval_results=[result])
    assert ModelCard.load(pushed.local_dir / "README.md").data.eval_results[0].dataset_split == "validation"
    with pytest.raises(ValueError, match="need a task and a dataset"):
        push_to_hub(saved_dir, REPO, local_dir=tmp_path / "b", dry_run=True, eval_results={"perplexity": 9.0})


def test_template_ships_in_the_package():
    from hf_multimax.hub.cards import default_template_path

    text = default_template_path().read_text()
    assert text.startswith("---") and "{{ card_data }}" in text
