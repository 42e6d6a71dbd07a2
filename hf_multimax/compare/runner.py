"""Training the same tiny model once per attention implementation and seed, on the task's embedded offline data.

Every implementation is trained on every seed. A seed fixes the initial weights (the tiny model is built with eager
SoftMax first and switched afterwards, so a parametric implementation's own parameters are added on top of the same
weights), the held-out split and the data order, so the runs of one seed differ only by their attention: the pairs
:mod:`.statistics` compares. After each run the saved model's attention is measured (:func:`attention_statistics`:
the ``hf-multimax analyze`` metrics and the paper's own measures, averaged over layers) and the record goes to
``results.json`` at once, so a crash or a failed run loses nothing that finished, and ``resume=True`` skips what is
there.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import registry
from ..config import FLAG_DEFAULTS
from ..extras import require
from ..finetune import build_parser, make_args, run
from ..finetune.tasks import Task, get_task
from ..integrations.transformers import register_named_comparators
from .statistics import build_summary

logger = logging.getLogger(__name__)

__all__ = [
    "compare",
    "COMPARE_DEFAULTS",
    "COMPARE_OWNED",
    "MULTIMAX_ONLY",
    "RESULTS_FILE",
    "RunSpec",
    "attention_statistics",
    "build_results",
    "check_implementations",
    "load_average",
    "machine_description",
    "resolve_seeds",
    "plan_runs",
    "preflight",
    "run_dir",
    "uses_multimax",
    "write_results",
]

#: Per task, the settings of the default comparison (chosen from the experiments described in the README section
#: "Compare SoftMax and MultiMax"): ``max_train_steps``; ``script``: fine-tuning arguments for every run (a flag given
#: in ``script_argv`` wins); ``multimax``: MultiMax flags and learning rate for the MultiMax runs only (a value given
#: to :func:`compare` wins).
_FROM_SCRATCH = {"multimax_init": "paper", "multimax_learning_rate": 0.03}
COMPARE_DEFAULTS: dict[str, dict[str, Any]] = {
    "lm": {"max_train_steps": 1000, "script": {"validation_split_percentage": 10}, "multimax": dict(_FROM_SCRATCH)},
    "translation": {
        "max_train_steps": 1000,
        "multimax": dict(_FROM_SCRATCH),
        "script": {
            "vocab_size": 1000,
            "per_device_train_batch_size": 64,
            "group_by_length": True,
            "max_eval_samples": 400,
        },
    },
    "vit": {"max_train_steps": 300, "script": {"validation_split_percentage": 20}, "multimax": dict(_FROM_SCRATCH)},
}
#: Settings that shape only the MultiMax runs: the ``multimax_*`` flags and the MultiMax learning rate.
MULTIMAX_ONLY = (*FLAG_DEFAULTS, "multimax_learning_rate")
#: Fine-tuning flags that compare sets for every run itself, and what to use instead of passing them in
#: ``--script_args`` (where they would be overridden, or would reach the baseline runs too).
COMPARE_OWNED: dict[str, str] = {
    "max_train_steps": "compare's --max_train_steps",
    "seed": "--seeds or --seed_list",
    "output_dir": "compare's --output_dir",
    "attn_implementation": "--implementations",
    "eval_strategy": "nothing (compare evaluates at the end)",
    **{name: f"compare's --{name} (it applies to the MultiMax runs only)" for name in MULTIMAX_ONLY},
}
#: The file :func:`compare` keeps its run records in (and :mod:`.report` adds the statistics to).
RESULTS_FILE = "results.json"
#: Prefix of the attention statistics in a run's metrics (``attention_sparsity``, ...; the paper's measures keep
#: their own names, ``paper_multimodality`` and ``paper_sparsity``).
ATTENTION_PREFIX = "attention_"


def uses_multimax(implementation: str) -> bool:
    """Whether ``implementation`` runs MultiMax (its parameters are the SegLU that the ``multimax_*`` flags shape)."""
    return registry.parametric(implementation) is registry.MULTIMAX_PARAMETERS


def check_implementations(implementations: Sequence[str]) -> list[str]:
    """The implementations as a list; ``ValueError`` naming the flag for an empty list, an unknown name or a
    duplicate, before anything is trained."""
    from transformers import AttentionInterface

    implementations = list(implementations)
    if not implementations:
        raise ValueError("--implementations needs at least one attention implementation (the first is the baseline)")
    register_named_comparators(implementations)
    registered = set(AttentionInterface().valid_keys()) | {"eager"}
    unknown = [name for name in implementations if name not in registered]
    # leave out Transformers' "paged|..." variants; the comparators are registered when named
    known = sorted({name for name in registered if "|" not in name} | set(registry.COMPARATOR_IMPLEMENTATIONS))
    if unknown:
        raise ValueError(f"--implementations: unknown attention implementation(s) {unknown}; known: {known}")
    duplicates = sorted({name for name in implementations if implementations.count(name) > 1})
    if duplicates:
        raise ValueError(f"--implementations lists {duplicates} more than once")
    return implementations


def resolve_seeds(seeds: int | None = None, seed_list: Sequence[int] | None = None) -> list[int]:
    """The seeds to train on: ``0 .. seeds-1``, or ``seed_list`` as given (default: ``[0]``).

    Raises:
        ValueError: naming ``--seeds`` for a count below 1, ``--seed_list`` for an empty list, a negative seed or a
            duplicate, and both when both are given.
    """
    if seeds is not None and seed_list is not None:
        raise ValueError("give either --seeds N (seeds 0..N-1) or --seed_list S [S ...], not both")
    if seed_list is not None:
        seed_list = [int(s) for s in seed_list]
        if not seed_list:
            raise ValueError("--seed_list needs at least one seed")
        negative = [s for s in seed_list if s < 0]
        if negative:
            raise ValueError(f"--seed_list: seeds must be >= 0, got {negative}")
        duplicates = sorted({s for s in seed_list if seed_list.count(s) > 1})
        if duplicates:
            raise ValueError(f"--seed_list lists {duplicates} more than once")
        return seed_list
    if seeds is None:
        return [0]
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1 (runs per implementation), got {seeds}")
    return list(range(seeds))


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: an implementation on a seed, with its complete fine-tuning arguments."""

    implementation: str
    seed: int
    args: argparse.Namespace

    @property
    def key(self) -> tuple[str, int]:
        return self.implementation, self.seed


def run_dir(output_dir: str | Path, implementation: str, seed: int) -> Path:
    """Where the model of one run is saved: ``OUTPUT_DIR/<implementation>/seed_<seed>``."""
    return Path(output_dir) / implementation / f"seed_{seed}"


def _given_flags(task: Task, argv: Sequence[str]) -> set[str]:
    """Destinations of the fine-tuning flags that ``argv`` sets explicitly (``ValueError`` naming ``--script_args``
    when it does not parse)."""
    parser = build_parser(task)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(list(argv))))
    except SystemExit:  # argparse has printed what is wrong with the flags
        raise ValueError(
            f"--script_args {' '.join(argv)!r} are not flags of the {task.name} fine-tuning script "
            "(see the message above)"
        ) from None


def settings_of(
    task_name: str,
    max_train_steps: int | None = None,
    multimax_settings: Mapping[str, Any] | None = None,
    script_argv: Sequence[str] = (),
    analysis: bool = True,
) -> dict[str, Any]:
    """What every run of a comparison shares (all but the implementation and the seed), as ``results.json`` records
    it and ``resume`` checks it: the task, the steps, the MultiMax-only settings, the script arguments, whether the
    attention is analysed."""
    task = get_task(task_name)
    defaults = COMPARE_DEFAULTS[task.name]
    steps = defaults["max_train_steps"] if max_train_steps is None else max_train_steps
    if steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {steps}")
    given = _given_flags(task, script_argv)
    owned = sorted(given & set(COMPARE_OWNED))
    if owned:
        raise ValueError(
            f"--script_args sets {', '.join('--' + name for name in owned)}, which compare sets for each "
            f"run; use {', '.join(COMPARE_OWNED[name] for name in owned)} instead"
        )
    script = {name: value for name, value in defaults["script"].items() if name not in given}
    multimax = dict(defaults["multimax"])
    multimax.update({name: value for name, value in (multimax_settings or {}).items() if value is not None})
    unknown = sorted(set(multimax) - set(MULTIMAX_ONLY))
    if unknown:
        raise ValueError(f"not a MultiMax-only setting: {unknown}; expected some of {list(MULTIMAX_ONLY)}")
    return {
        "task": task.name,
        "max_train_steps": steps,
        "script": script,
        "multimax": multimax,
        "script_args": list(script_argv),
        "analysis": analysis,
    }


def plan_runs(
    settings: Mapping[str, Any], output_dir: str | Path, implementations: Sequence[str], seeds: Sequence[int]
) -> list[RunSpec]:
    """Every run's arguments, seed-major (all implementations of seed 0, then seed 1, ...), built and validated
    before anything is trained: a bad flag value raises ``ValueError`` naming the flag here."""
    task = get_task(settings["task"])
    implementations = check_implementations(implementations)
    specs = []
    for seed in seeds:
        for implementation in implementations:
            values: dict[str, Any] = dict(
                settings["script"],
                attn_implementation=implementation,
                seed=seed,
                output_dir=str(run_dir(output_dir, implementation, seed)),
                max_train_steps=settings["max_train_steps"],
                eval_strategy="end",
            )
            if uses_multimax(implementation):
                values.update(settings["multimax"])
            specs.append(RunSpec(implementation, seed, make_args(task, settings["script_args"], **values)))
    return specs


def preflight(task: Task, args: argparse.Namespace) -> None:
    """The checks of a run's inputs that need more than its arguments, done before any run trains: a tokenizer named
    by ``--tokenizer_name`` or ``--model_name_or_path`` must load (``ValueError`` naming the flag otherwise)."""
    if (args.tokenizer_name or args.model_name_or_path) and task.name in ("lm", "translation"):
        task.load_tokenizer(args)


def attention_statistics(task: Task, model_dir: str | Path) -> dict[str, float]:
    """The attention of a saved model, as ``hf-multimax analyze`` measures it on its default inputs, averaged over
    layers: ``attention_<metric>`` for each of :mod:`hf_multimax.analysis.metrics`'s metrics and the paper's
    ``paper_multimodality`` and ``paper_sparsity`` (:mod:`hf_multimax.analysis.paper_measures`)."""
    from ..analysis import analyze_model, load_for_analysis
    from ..analysis.inputs import image_inputs, text_inputs

    model, kind, checkpoint = load_for_analysis(model_dir)
    if kind == "vision":
        inputs, _ = image_inputs(model_dir, checkpoint, model, None, 8)
    else:
        inputs, _ = text_inputs(model_dir, checkpoint, model, kind, None, 8, 64)
    overall = analyze_model(model, inputs, kind=kind).overall
    return {attention_metric_name(key): value for key, value in overall.items()}


def attention_metric_name(key: str) -> str:
    """The name in a run's metrics of an ``analyze`` statistic: ``attention_<key>``; the paper's measures keep their
    own names."""
    from ..analysis.collect import PAPER_MEASURES

    return key if key in PAPER_MEASURES else ATTENTION_PREFIX + key


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def training_failure(result: Mapping[str, Any]) -> str | None:
    """Why a finished run counts as failed to train (a non-finite training or evaluation loss), or ``None``."""
    for step, loss in result.get("losses") or ():
        if not _finite(loss):
            return f"non-finite training loss ({loss}) at step {step}"
    eval_loss = (result.get("metrics") or {}).get("eval_loss")
    if not _finite(eval_loss):
        return f"non-finite evaluation loss ({eval_loss})"
    return None


def _record(spec: RunSpec, result: Mapping[str, Any] | None, seconds: float, error: str | None) -> dict[str, Any]:
    """The ``results.json`` record of one run (see the README's description of the file)."""
    record: dict[str, Any] = {"implementation": spec.implementation, "seed": spec.seed}
    result = result or {}
    record.update(
        {
            "train_loss": result.get("train_loss", math.nan),
            "metrics": dict(result.get("metrics") or {}),
            "time_per_step": result.get("time_per_step", math.nan),
            "steps": result.get("steps", 0),
            "seconds": seconds,
            "output_dir": spec.args.output_dir,
            "losses": [list(pair) for pair in result.get("losses") or ()],
        }
    )
    if result.get("loss_period"):
        record["loss_period"] = result["loss_period"]
    if error is not None:
        record["error"] = error
    return record


def train_one(task: Task, spec: RunSpec, analysis: bool = True) -> dict[str, Any]:
    """Train, evaluate, save and (``analysis``) measure one run; a run that raises or whose loss is not finite is
    returned as a record with ``"error"`` instead of raising (``KeyboardInterrupt`` still stops everything)."""
    started = time.perf_counter()
    try:
        result = run(task, spec.args)
    except Exception as error:  # one implementation failing must not stop the others
        logger.error(
            "compare: %s seed %d failed: %s: %s",
            spec.implementation,
            spec.seed,
            type(error).__name__,
            error,
            exc_info=True,
        )
        return _record(spec, None, time.perf_counter() - started, f"{type(error).__name__}: {error}")
    failure = training_failure(result)
    record = _record(spec, result, 0.0, failure)
    if failure is not None:
        logger.error("compare: %s seed %d failed to train: %s", spec.implementation, spec.seed, failure)
    elif analysis:
        try:
            record["metrics"].update(attention_statistics(task, spec.args.output_dir))
        except Exception as error:  # the run itself is fine: keep it, say why its attention is not measured
            logger.warning(
                "compare: could not analyse the attention of %s: %s: %s",
                spec.args.output_dir,
                type(error).__name__,
                error,
            )
            record["analysis_error"] = f"{type(error).__name__}: {error}"
    record["seconds"] = time.perf_counter() - started
    return record


def jsonable(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON has no NaN) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


def read_results(output_dir: str | Path) -> dict[str, Any] | None:
    """The ``results.json`` of ``output_dir``, or ``None`` when there is none (``ValueError`` when unreadable)."""
    path = Path(output_dir) / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--resume: {path} cannot be read ({type(error).__name__}: {error})") from error


def resumable_runs(previous: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The successful runs of a previous ``results.json`` whose model folders still exist, after checking that they
    were made with the same ``settings``.

    Raises:
        ValueError: naming ``--resume`` when the file was made with other settings (other steps, flags or script
            arguments), which would mix incomparable runs.
    """
    if previous is None:
        return []
    before = previous.get("settings") or {}
    changed = sorted(key for key in settings if jsonable(before.get(key)) != jsonable(settings[key]))
    if changed:
        details = "; ".join(f"{key}: {before.get(key)!r} then, {settings[key]!r} now" for key in changed)
        raise ValueError(
            f"--resume: the runs in this --output_dir were made with other settings ({details}); use "
            "the same settings or another --output_dir"
        )
    kept = []
    for entry in previous.get("runs") or ():
        if entry.get("error") or not (Path(entry.get("output_dir") or "") / "config.json").is_file():
            continue
        kept.append(entry)
    return kept


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def machine_description() -> dict[str, Any]:
    """CPU model, logical CPUs, torch threads and versions: what a reader needs to weigh the times."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def build_results(
    state: Mapping[str, Any],
    *,
    seconds: float | None = None,
    machine: Mapping[str, Any] | None = None,
    command_line: str = "",
) -> dict[str, Any]:
    """The content of ``results.json``: the runs of :func:`.runner.compare`'s ``state`` and their statistics, the
    first implementation being the baseline."""
    runs = list(state["runs"])
    baseline = state["implementations"][0]
    summary: dict[str, Any] = {}
    versus: dict[str, Any] = {}
    if any(run["implementation"] == baseline for run in runs):
        summary, versus = build_summary(runs, baseline)
    return {
        "task": state["settings"]["task"],
        "command": command_line,
        "baseline": baseline,
        "implementations": list(state["implementations"]),
        "seeds": list(state["seeds"]),
        "settings": state["settings"],
        "machine": dict(machine or {}),
        "seconds": seconds,
        "runs": runs,
        "summary": summary,
        "versus_baseline": versus,
    }


def write_results(output_dir: str | Path, results: Mapping[str, Any]) -> Path:
    """Write ``results.json`` (NaN as ``null``) through a temporary file, so a crash never leaves half a file."""
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(jsonable(results), indent=1, allow_nan=False) + "\n")
    os.replace(partial, path)
    return path


def compare(
    task_name: str,
    output_dir: str | Path,
    implementations: Sequence[str] = ("sdpa", "multimax"),
    seeds: Sequence[int] = (0,),
    max_train_steps: int | None = None,
    multimax_flags: Mapping[str, Any] | None = None,
    script_argv: Sequence[str] = (),
    resume: bool = False,
    analysis: bool = True,
    machine: Mapping[str, Any] | None = None,
    command_line: str = "",
) -> dict[str, Any]:
    """Train every implementation on every seed; return the content of ``results.json`` (:func:`build_results`),
    which is written to ``output_dir`` after every run, so that a crash keeps what finished.

    ``multimax_flags`` (``{"multimax_order": 3, "multimax_learning_rate": 0.1, ...}``: any of :data:`MULTIMAX_ONLY`)
    apply to the MultiMax runs only, on top of the task's :data:`COMPARE_DEFAULTS`; ``script_argv`` (any flag of the
    example scripts) applies to every run. ``resume``: keep the successful runs already in ``output_dir``'s
    ``results.json`` (made with the same settings) and train only the others. Failed runs are records with
    ``"error"``; they do not stop the others. Everything is validated before the first run trains. ``machine``
    (default :func:`machine_description`) and ``command_line`` are recorded as they are.
    """
    from tqdm.auto import tqdm

    require(("train", "analysis"), "hf_multimax.compare.compare")
    task = get_task(task_name)
    implementations = check_implementations(implementations)
    seeds = resolve_seeds(seed_list=seeds)
    settings = settings_of(task.name, max_train_steps, multimax_flags, script_argv, analysis)
    specs = plan_runs(settings, output_dir, implementations, seeds)
    preflight(task, specs[0].args)
    previous = read_results(output_dir) if resume else None
    kept = resumable_runs(previous, settings)
    done = {(entry["implementation"], entry["seed"]) for entry in kept}
    todo = [spec for spec in specs if spec.key not in done]
    if not resume and read_results(output_dir) is not None:
        logger.warning(
            "compare: %s already holds results; training afresh (--resume continues them instead)", output_dir
        )
    state: dict[str, Any] = {"settings": settings, "implementations": implementations, "seeds": seeds, "runs": kept}
    if kept:
        logger.info("compare: resuming, %d of %d runs already done", len(specs) - len(todo), len(specs))
    machine = dict(machine or machine_description())
    machine.setdefault("load_average", {"before": load_average(), "after": None})
    order = {key: index for index, key in enumerate(spec.key for spec in specs)}
    started = time.perf_counter()

    def results() -> dict[str, Any]:
        state["runs"].sort(key=lambda entry: order.get((entry["implementation"], entry["seed"]), len(order)))
        return build_results(state, seconds=time.perf_counter() - started, machine=machine, command_line=command_line)

    progress = tqdm(total=len(specs), initial=len(specs) - len(todo), desc=f"compare {task.name}", unit="run")
    try:
        for spec in todo:
            progress.set_postfix_str(f"{spec.implementation} seed {spec.seed}")
            logger.info("compare: training %s on seed %d", spec.implementation, spec.seed)
            state["runs"].append(train_one(task, spec, analysis))
            progress.update(1)
            write_results(output_dir, results())
    finally:
        progress.close()
    machine["load_average"]["after"] = load_average()
    final = results()
    write_results(output_dir, final)
    return final
