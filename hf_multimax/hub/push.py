"""Share MultiMax checkpoints on the Hugging Face Hub: ``push_to_hub`` and ``hf-multimax push``.

A push first writes, and keeps, the exact folder that is uploaded: the weights (safetensors), ``config.json`` with
the ``multimax_*`` flags (or, for a PEFT run, ``adapter_config.json`` + ``adapter_model.safetensors`` with the
MultiMax parameters saved through ``modules_to_save``), the tokenizer / image processor, a model card
(``README.md``, rendered from ``model_cards/multimax_model_card.md``) and the plot of every layer's learned σ
(``multimax_sigma.png``); with ``remote_code=True`` also ``modeling_multimax.py`` and ``config.json``'s ``auto_map``
(:mod:`.remote_code`), so that the model loads with ``trust_remote_code=True`` where hf-multimax is not installed.
Only then does it talk to the Hub (``create_repo``, ``create_branch`` for a new
``revision``, ``upload_folder``: one commit). Every failure after the folder is written raises one
:class:`HubPushError` that says what went wrong and where the folder is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session, validate_repo_id

from ..checkpoint import read_checkpoint
from ..extras import require
from ..integrations.peft import is_peft_model
from .cards import CARD_TAG, PLOT_FILENAME, build_eval_results, write_model_card
from .remote_code import (
    RemoteCodePlan,
    adapter_refusal,
    check_remote_code,
    folder_plan,
    has_remote_code,
    model_plan,
    write_remote_code,
)

logger = logging.getLogger(__name__)

__all__ = ["HubPushError", "PushResult", "push_to_hub", "default_local_dir", "check_hub_reachable"]


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the Hub could not be reached": huggingface_hub >= 2 uses ``httpx2``, 1.x ``httpx``."""
    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        for attribute in ("TransportError", "TimeoutException", "ConnectionError", "Timeout"):
            error = getattr(module, attribute, None)
            if isinstance(error, type) and issubclass(error, BaseException) and error not in errors:
                errors.append(error)
    return tuple(errors)


NETWORK_ERRORS = _network_errors()
#: Files of a training folder that are not part of the model (Trainer / accelerate state, logs, our regenerated card).
SKIPPED_FILES = (
    "README.md",
    PLOT_FILENAME,
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "training_args.bin",
    "trainer_state.json",
    "events.out.tfevents*",
    "*.pt",
    "*.pth",
    "*.ckpt",
    ".*",
)
LOGIN_HINT = (
    "log in with `hf auth login` (older versions: `huggingface-cli login`), set the HF_TOKEN environment variable, "
    "or pass token=... (CLI: --token)"
)


class HubPushError(RuntimeError):
    """A push to the Hub failed. The message says what happened; ``local_dir`` is the folder that was written (kept,
    ready to retry with ``hf-multimax push LOCAL_DIR REPO_ID``)."""

    def __init__(self, message: str, local_dir: Path | None = None) -> None:
        super().__init__(message)
        self.local_dir = local_dir


@dataclass(frozen=True)
class PushResult:
    """What :func:`push_to_hub` did.

    Attributes:
        local_dir: the folder that was (or, with ``dry_run``, would have been) uploaded; kept on disk.
        repo_id: the target repository.
        files: the folder's files, relative to ``local_dir``.
        uploaded: whether a commit was made (``False`` for a dry run).
        revision: the branch pushed to (``None``: the default branch).
        repo_url, commit_url: Hub URLs (``None`` for a dry run).
    """

    local_dir: Path
    repo_id: str
    files: tuple[str, ...]
    uploaded: bool
    revision: str | None = None
    repo_url: str | None = None
    commit_url: str | None = None


def default_local_dir(repo_id: str) -> Path:
    """``outputs/hub/<owner>--<name>`` under the working directory (``outputs/`` is git-ignored)."""
    return Path("outputs") / "hub" / repo_id.replace("/", "--")


def is_push_folder(folder: Path) -> bool:
    """Whether ``folder`` was written by :func:`push_to_hub` (its README.md is a card tagged ``hf-multimax``)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return False
    try:
        return CARD_TAG in (ModelCard.load(readme).data.tags or [])
    except Exception:  # an unparsable README is not ours
        return False


def prepare_local_dir(local_dir: Path, source: Path | None) -> bool:
    """Make ``local_dir`` ready to be written; return ``True`` when it is the source folder itself (push in place).

    An existing folder is only emptied when an earlier push wrote it; any other non-empty folder is refused, so a
    wrong ``local_dir`` never deletes anything.
    """
    if source is not None:
        if local_dir.resolve() == source.resolve():
            if not is_push_folder(source):
                raise ValueError(
                    f"local_dir is the folder being pushed ({source}), which was not written by push_to_hub (it may "
                    "hold training files that must not be uploaded); choose another local_dir"
                )
            return True
        if source.resolve().is_relative_to(local_dir.resolve()):
            raise ValueError(f"local_dir {local_dir} contains the folder being pushed ({source}); choose another")
    if local_dir.is_dir() and any(local_dir.iterdir()):
        if not is_push_folder(local_dir):
            raise ValueError(
                f"local_dir {local_dir} exists and is not empty (and was not written by hf_multimax.hub.push_to_hub); "
                "pass an empty or new folder, so that it holds exactly what is uploaded"
            )
        logger.info("replacing the earlier push folder %s", local_dir)
        shutil.rmtree(local_dir)
    elif local_dir.exists() and not local_dir.is_dir():
        raise ValueError(f"local_dir {local_dir} exists and is not a folder")
    local_dir.mkdir(parents=True, exist_ok=True)
    return False


def copy_model_folder(source: Path, target: Path) -> None:
    """Copy a ``save_pretrained`` folder's top-level files, without training state, logs or an old card."""
    if not any(source.glob("*.safetensors")):
        binaries = sorted(p.name for p in source.glob("*.bin") if p.name != "training_args.bin")
        raise ValueError(
            f"{source} holds no .safetensors weights{f' (only {binaries})' if binaries else ''}: load the model and "
            "save it with save_pretrained (Transformers >= 5 writes safetensors), then push that folder"
        )
    skipped = []
    for path in sorted(source.iterdir()):
        if path.is_dir() or any(fnmatch(path.name, pattern) for pattern in SKIPPED_FILES):
            skipped.append(path.name + ("/" if path.is_dir() else ""))
            continue
        shutil.copy2(path, target / path.name)
    if skipped:
        logger.info("not pushed from %s: %s", source, ", ".join(skipped))


def set_adapter_base_model(folder: Path, base_model: str) -> None:
    """Point ``adapter_config.json`` at ``base_model`` so PEFT and Transformers find the base model anywhere."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    if config.get("base_model_name_or_path") != base_model:
        logger.info(
            "adapter_config.json: base_model_name_or_path %r -> %r", config.get("base_model_name_or_path"), base_model
        )
        config["base_model_name_or_path"] = base_model
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_push_folder(
    model_or_dir: Any,
    local_dir: Path,
    *,
    tokenizer: Any = None,
    processor: Any = None,
    base_model: str | None = None,
    merge_adapter: bool = False,
) -> tuple[Any, str | None]:
    """Write the model, tokenizer and processor into ``local_dir``. Return the config and class name of an adapter's
    base model (``(None, None)`` for full models, whose ``config.json`` has both)."""
    base_config = architecture = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        source = Path(model_or_dir)
        if not source.is_dir():
            raise FileNotFoundError(f"{source} is not a folder: pass a model, or a folder written by save_pretrained")
        if not any((source / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise ValueError(f"{source} is not a saved model: it has neither config.json nor adapter_config.json")
        if merge_adapter:
            raise ValueError(
                "merge_adapter needs the PeftModel: load it (PeftModel.from_pretrained) and pass the model, or push "
                "the adapter folder as it is"
            )
        if not prepare_local_dir(local_dir, source):
            copy_model_folder(source, local_dir)
    elif is_peft_model(model_or_dir):
        base = model_or_dir.get_base_model()
        if merge_adapter:
            import copy

            logger.info("merging the adapter into a copy of the base model")
            merged = copy.deepcopy(model_or_dir).merge_and_unload()
            prepare_local_dir(local_dir, None)
            merged.save_pretrained(local_dir)
        else:
            prepare_local_dir(local_dir, None)
            model_or_dir.save_pretrained(local_dir)
            base_config, architecture = base.config, type(base).__name__
    elif hasattr(model_or_dir, "save_pretrained") and hasattr(model_or_dir, "config"):
        prepare_local_dir(local_dir, None)
        model_or_dir.save_pretrained(local_dir)
    else:
        raise TypeError(
            f"push_to_hub takes a Transformers model, a PEFT model or a save_pretrained folder, got "
            f"{type(model_or_dir).__name__}"
        )
    for extra in (tokenizer, processor):
        if extra is not None:
            extra.save_pretrained(local_dir)
    if (local_dir / "adapter_config.json").is_file():
        if base_model:
            set_adapter_base_model(local_dir, base_model)
        recorded = json.loads((local_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not recorded:
            logger.warning(
                "the adapter in %s names no base model (adapter_config.json base_model_name_or_path is empty): pass "
                "base_model='<hub id>' so that it can be reloaded",
                local_dir,
            )
        elif Path(recorded).expanduser().is_absolute() or Path(recorded).exists():
            logger.warning(
                "the adapter's base model is the local path %r, which others cannot load: pass base_model='<hub id>'",
                recorded,
            )
    return base_config, architecture


def check_hub_reachable(endpoint: str, timeout: float) -> None:
    """Raise quickly when ``endpoint`` does not answer: huggingface_hub's own calls have no timeout by default."""
    get_session().head(endpoint, timeout=timeout, follow_redirects=False)


def resolve_token(token: str | None, local_dir: Path, repo_id: str) -> str:
    """The explicit token, else huggingface_hub's (HF_TOKEN, then the stored login); fail before any upload."""
    if token:
        return token
    try:
        found = get_token()
    except Exception as err:  # e.g. a configured OIDC exchange that failed
        raise HubPushError(
            f"Could not push to '{repo_id}': reading the Hugging Face token failed ({type(err).__name__}: {err}). "
            f"Nothing was uploaded. {kept(local_dir, repo_id)}",
            local_dir,
        ) from err
    if not found:
        raise HubPushError(
            f"Could not push to '{repo_id}': no Hugging Face token found: {LOGIN_HINT}. Nothing was uploaded. "
            f"{kept(local_dir, repo_id)}",
            local_dir,
        )
    return found


def kept(local_dir: Path, repo_id: str) -> str:
    return (
        f"The folder to upload is kept at {local_dir}: retry with "
        f"`hf-multimax push {local_dir} {repo_id} --local-dir {local_dir}` "
        f"(or `hf upload {repo_id} {local_dir}`)."
    )


def explain(
    err: BaseException, stage: str, repo_id: str, revision: str | None, endpoint: str, timeout: float | None
) -> str:
    """One sentence on what went wrong in ``stage`` (``reach``, ``create_repo``, ``create_branch``, ``upload``)."""
    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so huggingface_hub makes no network calls; unset it to push"
    if isinstance(err, LocalTokenNotFoundError):
        return f"no Hugging Face token found: {LOGIN_HINT}"
    if isinstance(err, RevisionNotFoundError):
        return f"revision {revision!r} does not exist in '{repo_id}' ({first_line(err)})"
    if isinstance(err, RepositoryNotFoundError):
        return (
            f"the repository '{repo_id}' was not found, or the token cannot access it (HTTP 404); check the repo id "
            "and that the token has write access to its namespace"
        )
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if getattr(err, "response", None) is not None else None
        detail = err.server_message or first_line(err)
        if stage == "create_repo" and status == 409:
            return (
                f"the repository '{repo_id}' already exists and exist_ok=False "
                "(pass exist_ok=True / --exist-ok to push into it)"
            )
        if status == 401:
            return f"the Hub rejected the token (HTTP 401: {detail}); {LOGIN_HINT} with a token that has write access"
        if status == 403:
            return f"the token may not write to '{repo_id}' (HTTP 403: {detail}); use a token with write access there"
        action = {"create_repo": "repository creation", "create_branch": f"creation of branch {revision!r}"}.get(
            stage, "upload"
        )
        return f"the Hub rejected the {action} (HTTP {status}: {detail})"
    if isinstance(err, NETWORK_ERRORS):
        if "timeout" in type(err).__name__.lower() or isinstance(err, TimeoutError):
            waited = f" within {timeout:g} s" if timeout is not None and stage == "reach" else ""
            return (
                f"the Hub at {endpoint} did not answer{waited} ({type(err).__name__}: {err}); "
                "check the network connection"
            )
        return (
            f"the Hub at {endpoint} could not be reached ({type(err).__name__}: {err}); check the network connection "
            "(and HF_ENDPOINT or proxy settings)"
        )
    return f"{stage} failed ({type(err).__name__}: {err})"


def first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def upload(
    local_dir: Path,
    repo_id: str,
    *,
    api: HfApi | None,
    token: str | None,
    private: bool,
    revision: str | None,
    commit_message: str,
    exist_ok: bool,
    connect_timeout: float | None,
) -> tuple[str, str | None]:
    """``create_repo`` (+ ``create_branch``) + ``upload_folder``; every failure becomes one :class:`HubPushError`."""
    token = resolve_token(token or getattr(api, "token", None), local_dir, repo_id)
    api = api or HfApi()
    stage = "reach"
    try:
        if connect_timeout is not None:
            check_hub_reachable(api.endpoint, connect_timeout)
        stage = "create_repo"
        repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=exist_ok, repo_type="model")
        if revision and revision != "main" and not revision.startswith("refs/"):
            stage = "create_branch"
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True, repo_type="model")
        stage = "upload"
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=local_dir,
            commit_message=commit_message,
            revision=revision,
            token=token,
            repo_type="model",
        )
    except Exception as err:
        what = explain(err, stage, repo_id, revision, api.endpoint, connect_timeout)
        nothing = "uploaded" if stage in ("reach", "create_repo") else "committed"
        raise HubPushError(
            f"Could not push to '{repo_id}': {what}. Nothing was {nothing}. {kept(local_dir, repo_id)}", local_dir
        ) from err
    return str(repo_url), getattr(commit, "commit_url", None)


def remote_code_plan(model_or_dir: Any, *, remote_code: bool, merge_adapter: bool) -> RemoteCodePlan | None:
    """What ``remote_code=True`` will write, checked before anything is written (``None`` without remote code). A
    folder pushed without remote code must not name remote code of hf-multimax that is missing or of another
    version."""
    if not isinstance(remote_code, bool):
        raise TypeError(f"remote_code must be True or False, got {remote_code!r}")
    is_folder = isinstance(model_or_dir, (str, os.PathLike))
    if not remote_code:
        if is_folder and Path(model_or_dir).is_dir():
            check_remote_code(Path(model_or_dir))
        return None
    if is_folder:
        source = Path(model_or_dir)
        if not source.is_dir():
            raise FileNotFoundError(f"{source} is not a folder: pass a model, or a folder written by save_pretrained")
        return folder_plan(source)
    if is_peft_model(model_or_dir) and not merge_adapter:
        raise ValueError(adapter_refusal())
    if not hasattr(model_or_dir, "config"):
        return None  # not a model: write_push_folder says what push_to_hub takes
    return model_plan(model_or_dir)


def push_to_hub(
    model_or_dir: Any,
    repo_id: str,
    *,
    local_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    exist_ok: bool = True,
    tokenizer: Any = None,
    processor: Any = None,
    base_model: str | None = None,
    datasets: str | Sequence[str] | None = None,
    eval_results: Any = None,
    pipeline_tag: str | None = None,
    license: str | None = "apache-2.0",
    merge_adapter: bool = False,
    remote_code: bool = False,
    card_template: str | os.PathLike | None = None,
    api: HfApi | None = None,
    connect_timeout: float | None = 10.0,
) -> PushResult:
    """Write a MultiMax model (or PEFT adapter) with its model card to ``local_dir``, then upload that folder.

    Args:
        model_or_dir: a Transformers model, a ``peft.PeftModel`` (pushed as an adapter whose ``modules_to_save``
            hold the MultiMax parameters, e.g. ``modules_to_save=["multimax"]``) or a ``save_pretrained`` folder of
            either (its model, tokenizer and processor files are copied; training state is left out).
        repo_id: ``owner/name`` on the Hub.
        local_dir: where to write the folder (default ``outputs/hub/<owner>--<name>``). Kept after the push. An
            existing non-empty folder is only replaced when an earlier push wrote it.
        dry_run: write the folder, upload nothing.
        private: create the repository private.
        revision: branch to push to (created from the default branch if missing).
        commit_message: default ``"Upload MultiMax model with hf-multimax"``.
        token: Hub token; default: HF_TOKEN, then the login stored by ``hf auth login``.
        exist_ok: push into an existing repository; with ``False`` an existing one is an error.
        tokenizer, processor: saved next to the model (tokenizer, image processor or processor).
        base_model: Hub id of the model this one was fine-tuned from: card metadata, and for an adapter its
            ``adapter_config.json`` ``base_model_name_or_path`` (so that it reloads anywhere).
        datasets, eval_results, pipeline_tag, license: card metadata; ``eval_results`` is a ``{metric: value}``
            dict, or ``EvalResult`` objects / dicts (see :func:`hf_multimax.hub.cards.build_eval_results`).
        merge_adapter: for a ``PeftModel``, push the merged full model (``merge_and_unload`` on a copy) instead
            of the adapter.
        remote_code: also write ``modeling_multimax.py`` and ``config.json``'s ``auto_map``, so that
            ``from_pretrained(..., trust_remote_code=True)`` and ``pipeline(..., trust_remote_code=True)`` load the
            model where hf-multimax is not installed (full MultiMax models of Transformers' own classes; not PEFT
            adapters). Off by default: it puts code that loaders run under your name (see ``docs/hub.md``).
        card_template: a Jinja card template instead of ``model_cards/multimax_model_card.md``.
        api: the ``huggingface_hub.HfApi`` to call (default ``HfApi()``; its ``endpoint`` is used).
        connect_timeout: seconds to wait for the Hub to answer before uploading (``None``: no check).

    Returns:
        :class:`PushResult`.

    Raises:
        HubPushError: no token, no network, an existing repository with ``exist_ok=False``, a rejected request;
            raised after the folder is written, whose path the message gives.
        ValueError / TypeError / FileNotFoundError: bad arguments, or a model the remote code cannot serve (before
            anything is written).
        MissingExtraError: jinja2 or matplotlib is missing (``pip install 'hf-multimax[hub]'``).
    """
    require("hub", "hf_multimax.hub.push_to_hub")
    validate_repo_id(repo_id)
    plan = remote_code_plan(model_or_dir, remote_code=remote_code, merge_adapter=merge_adapter)
    build_eval_results(  # fail on bad metadata before writing anything
        eval_results,
        model_name=repo_id,
        pipeline_tag=pipeline_tag,
        datasets=[datasets] if isinstance(datasets, str) else datasets,
    )
    local_dir = Path(local_dir) if local_dir is not None else default_local_dir(repo_id)
    base_config, architecture = write_push_folder(
        model_or_dir,
        local_dir,
        tokenizer=tokenizer,
        processor=processor,
        base_model=base_model,
        merge_adapter=merge_adapter,
    )
    if plan is not None:
        write_remote_code(local_dir, plan)
    summary = read_checkpoint(local_dir, base_config=base_config, architecture=architecture)
    write_model_card(
        local_dir,
        repo_id,
        summary=summary,
        base_model=base_model,
        datasets=datasets,
        eval_results=eval_results,
        pipeline_tag=pipeline_tag,
        license=license,
        template_path=card_template,
        remote_code=has_remote_code(local_dir),  # written now, or copied from a folder pushed with it before
    )
    files = tuple(sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file()))
    if dry_run:
        logger.info("dry run: wrote %d files to %s, uploaded nothing", len(files), local_dir)
        return PushResult(local_dir, repo_id, files, uploaded=False, revision=revision)
    default_message = f"Upload MultiMax {'adapter' if summary.is_adapter else 'model'} with hf-multimax"
    repo_url, commit_url = upload(
        local_dir,
        repo_id,
        api=api,
        token=token,
        private=private,
        revision=revision,
        commit_message=commit_message or default_message,
        exist_ok=exist_ok,
        connect_timeout=connect_timeout,
    )
    logger.info("pushed %s to %s (%s)", local_dir, repo_id, commit_url)
    return PushResult(
        local_dir, repo_id, files, uploaded=True, revision=revision, repo_url=repo_url, commit_url=commit_url
    )
