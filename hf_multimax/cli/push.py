"""``hf-multimax push MODEL_DIR REPO_ID``: a saved model or adapter folder to the Hub with its model card, and with
``--remote-code`` the file that loads it without hf-multimax (see :func:`hf_multimax.hub.push_to_hub`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="folder written by save_pretrained (model or PEFT adapter)"
    )
    parser.add_argument("repo_id", metavar="REPO_ID", help="target repository, owner/name")
    parser.add_argument(
        "--dry-run", action="store_true", help="write the folder that would be uploaded; upload nothing"
    )
    parser.add_argument("--local-dir", help="where to write that folder (default outputs/hub/<owner>--<name>)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN, then the login of `hf auth login`)")
    parser.add_argument(
        "--exist-ok",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="push into an existing repository (default); --no-exist-ok makes an existing one an error",
    )
    parser.add_argument("--base-model", help="Hub id of the model this one was fine-tuned from (and an adapter's base)")
    parser.add_argument("--dataset", action="append", dest="datasets", help="Hub id of a training dataset (repeatable)")
    parser.add_argument("--license", default="apache-2.0", help="license identifier (default apache-2.0)")
    parser.add_argument("--pipeline-tag", help="e.g. text-generation, image-classification, translation")
    parser.add_argument(
        "--eval-results",
        metavar="JSON",
        help="evaluation results for the model-index: a JSON object {metric: value} (optionally with task_type, "
        "dataset_type, dataset_name, dataset_split) or a list of EvalResult fields; inline or a path to a .json file",
    )
    parser.add_argument("--card-template", metavar="PATH", help="Jinja model card template (default: the packaged one)")
    parser.add_argument(
        "--remote-code",
        "--remote_code",
        action="store_true",
        help="also upload modeling_multimax.py and config.json auto_map entries, so that the model loads with "
        "from_pretrained(..., trust_remote_code=True) or pipeline(..., trust_remote_code=True) where hf-multimax is "
        "not installed (full models only; off by default: loaders then run code from your repository, see "
        "docs/hub.md)",
    )


def parse_eval_results(text: str | None) -> Any:
    if text is None:
        return None
    path = Path(text)
    if not text.lstrip().startswith(("{", "[")) and path.is_file():
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--eval-results is neither JSON nor a JSON file: {err}") from err


def run(args: argparse.Namespace) -> int:
    from ..hub.push import HubPushError, push_to_hub

    try:
        result = push_to_hub(
            args.model_dir,
            args.repo_id,
            local_dir=args.local_dir,
            dry_run=args.dry_run,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            exist_ok=args.exist_ok,
            base_model=args.base_model,
            datasets=args.datasets,
            eval_results=parse_eval_results(args.eval_results),
            pipeline_tag=args.pipeline_tag,
            license=args.license,
            card_template=args.card_template,
            remote_code=args.remote_code,
        )
    except HubPushError as err:  # the folder is written and kept; the message says where
        print(f"hf-multimax push: error: {err}", file=sys.stderr)
        return 1
    if result.uploaded:
        print(f"pushed {result.local_dir} to {result.repo_url}\ncommit: {result.commit_url}")
    else:
        print(f"dry run: wrote {len(result.files)} files to {result.local_dir} (nothing uploaded):")
        print("\n".join(f"  {name}" for name in result.files))
    return 0
