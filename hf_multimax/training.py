"""Training habits from upstream MultiMax: no weight decay on its parameters, and careful clipping of output-layer
MultiMax, whose parameter gradients sum over the whole vocabulary and, once logits are large, outweigh the rest of the
model."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable

import torch
from torch import nn

from .modules import SegLU

__all__ = [
    "multimax_parameter_names",
    "output_multimax_parameter_names",
    "multimax_parameter_groups",
    "clip_grad_norm_",
    "OUTPUT_CLIP_MODES",
    "patch_trainer_weight_decay",
    "patch_trainer_clipping",
    "set_trainer_output_clip",
]

NO_DECAY_PATTERNS = ("bias", "norm", "layernorm", "rmsnorm")
#: The path PEFT's ``ModulesToSaveWrapper`` puts a SegLU under (``head.multimax.modules_to_save.default``): the SegLU's
#: owner is the module above the wrapper.
_PEFT_WRAPPER = re.compile(r"\.(modules_to_save\.[^.]+|original_module)$")


def _seglu_parameter_names(model: nn.Module, output: bool | None) -> list[str]:
    """Parameters of SegLUs (and, for ``output`` not True, of every other learnable attention-parameter module such as
    entmax-α's), filtered by whether they sit on the output head."""
    from .integration import parametric_module_types  # integration imports this module

    types = (SegLU,) if output else parametric_module_types()
    names = []
    for module_name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        owner_name = _PEFT_WRAPPER.sub("", module_name).rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        is_output = getattr(owner, "_multimax_hook", None) is not None
        if output is None or output == is_output:
            names += [f"{module_name}.{param_name}" for param_name, _ in module.named_parameters()]
    return names


def multimax_parameter_names(model: nn.Module) -> list[str]:
    """Names of every MultiMax parameter (attention layers and output head) in ``model``, and of the parameters of
    other learnable attention functions (e.g. ``entmax_alpha``): all of them stay out of weight decay."""
    return _seglu_parameter_names(model, None)


def output_multimax_parameter_names(model: nn.Module) -> list[str]:
    """Names of the output-layer MultiMax parameters only."""
    return _seglu_parameter_names(model, True)


def multimax_parameter_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    no_decay_patterns: Iterable[str] = NO_DECAY_PATTERNS,
    multimax_lr: float | None = None,
) -> list[dict]:
    """Optimizer parameter groups with MultiMax parameters excluded from weight decay.

    Groups (empty ones dropped, only ``requires_grad`` parameters): ``"decay"`` (weight_decay), ``"no_decay"``
    (biases and norms), ``"multimax"`` (attention SegLU, no decay) and ``"multimax_output"`` (output-head SegLU, no
    decay, kept apart so :func:`clip_grad_norm_` can clip it on its own). ``multimax_lr`` sets a learning rate for the
    two MultiMax groups. Pass the result to any ``torch.optim`` optimizer.
    """
    output = set(output_multimax_parameter_names(model))
    attention = set(multimax_parameter_names(model)) - output
    patterns = tuple(p.lower() for p in no_decay_patterns)
    groups: dict[str, dict] = {
        "decay": {"params": [], "weight_decay": weight_decay},
        "no_decay": {"params": [], "weight_decay": 0.0},
        "multimax": {"params": [], "weight_decay": 0.0},
        "multimax_output": {"params": [], "weight_decay": 0.0},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in output:
            key = "multimax_output"
        elif name in attention:
            key = "multimax"
        elif any(p in name.lower() for p in patterns):
            key = "no_decay"
        else:
            key = "decay"
        groups[key]["params"].append(param)
    if multimax_lr is not None:
        groups["multimax"]["lr"] = groups["multimax_output"]["lr"] = multimax_lr
    return [dict(group, name=key) for key, group in groups.items() if group["params"]]


#: How :func:`clip_grad_norm_` treats output-layer MultiMax parameters (see its docstring).
OUTPUT_CLIP_MODES = ("separate", "scaled", "global")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def _fsdp1_process_group(model: nn.Module):
    """The process group of an FSDP1-wrapped model (its gradients are local shards), else None."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed support
        return None
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            return module.process_group
    return None


def _group_norm(grads: list[torch.Tensor], norm_type: float, shard_group, device: torch.device) -> torch.Tensor:
    """The ``norm_type`` norm of ``grads`` over all processes that hold a piece of them.

    DTensor gradients (FSDP2) are reduced by DTensor itself; plain gradients are local shards under FSDP1
    (``shard_group`` set), whose norms are all-reduced; otherwise (one process, DDP) they are whole and local. Every
    rank calls the same collectives, also when it holds no piece of the group (FSDP1 may leave a rank without one).
    """
    dtensors = [g for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    inf = math.isinf(norm_type)
    parts = []
    if dtensors:
        norm = torch.nn.utils.get_total_norm(dtensors, norm_type)
        parts.append((norm.full_tensor() if _is_dtensor(norm) else norm).float())
    if plain or shard_group is not None:
        norm = torch.nn.utils.get_total_norm(plain, norm_type).float() if plain else torch.zeros((), device=device)
        if shard_group is not None:
            import torch.distributed as dist

            norm = norm.to(device) if inf else norm.to(device).pow(norm_type)
            dist.all_reduce(norm, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=shard_group)
            norm = norm if inf else norm.pow(1.0 / norm_type)
        parts.append(norm)
    return _combine(parts, norm_type) if parts else torch.zeros((), device=device)


def _combine(norms: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norm of the concatenation of groups with the given norms."""
    stacked = torch.stack([norm.to(norms[0].device) for norm in norms])
    return stacked.max() if math.isinf(norm_type) else stacked.pow(norm_type).sum().pow(1.0 / norm_type)


def _scale_(grads: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """Multiply ``grads`` in place by ``min(1, max_norm / total)`` (DTensors through their local shard)."""
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        local = grad.to_local() if _is_dtensor(grad) else grad
        local.mul_(coefficient.to(device=local.device, dtype=local.dtype))


def _logit_count(owner: nn.Module) -> int:
    """Number of logits the output head's σ runs over (vocabulary size or number of labels): the output width of the
    head's last linear layer."""
    linears = [m for m in owner.modules() if hasattr(m, "out_features") and isinstance(m.out_features, int)]
    if not linears:
        raise ValueError(f"cannot tell the number of logits of the output head {type(owner).__name__}: it has no "
                         "linear layer with `out_features`; use output_clip='separate' or 'global'")
    return linears[-1].out_features


def clip_grad_norm_(
    model: nn.Module,
    max_norm: float,
    norm_type: float = 2.0,
    output_clip: str = "separate",
) -> torch.Tensor:
    """Clip gradients like ``torch.nn.utils.clip_grad_norm_``, with a remedy for output-layer MultiMax.

    The σ parameters of an output head get a gradient summed over every logit (the whole vocabulary); with large
    logits it dwarfs the rest, so under one global norm it shrinks every other update. ``output_clip``:

    * ``"separate"`` (default): clip the output-layer MultiMax parameters to ``max_norm`` in a group of their own and
      everything else in another; returns the norm of everything else.
    * ``"scaled"``: one global clip in which the output-layer MultiMax gradients count ``1/sqrt(V)`` (``V`` logits
      per position); returns that norm.
    * ``"global"``: one global clip over all parameters, as ``torch.nn.utils.clip_grad_norm_``; returns its norm.

    Works on the model as ``accelerator.prepare`` returns it: plain, DDP (gradients already averaged), FSDP2
    (DTensor gradients) and FSDP1 with ``use_orig_params=True`` (local shards: norms are all-reduced), so every
    process clips by the same factor. Without output-layer MultiMax all three modes are the global clip.
    """
    if output_clip not in OUTPUT_CLIP_MODES:
        raise ValueError(f"`output_clip` must be one of {OUTPUT_CLIP_MODES}, got {output_clip!r}")
    shard_group = _fsdp1_process_group(model)
    output = set(output_multimax_parameter_names(model))
    params = dict(model.named_parameters())
    if not output and any(getattr(m, "_multimax_hook", None) is not None for m in model.modules()) and any(
        "_flat_param" in name for name in params
    ):
        raise ValueError(
            "clip_grad_norm_ needs the output-layer MultiMax parameters by name, but this FSDP model flattens them "
            "(use_orig_params=False); set `fsdp_use_orig_params: true` in the Accelerate config "
            "(FullyShardedDataParallelPlugin(use_orig_params=True))"
        )
    device = next(iter(params.values())).device if params else torch.device("cpu")
    main = [p.grad for name, p in params.items() if p.grad is not None and name not in output]
    out_grads = [p.grad for name, p in params.items() if p.grad is not None and name in output]
    # Every rank runs the same collectives: whether a group exists depends on the names (identical everywhere), not
    # on which gradients happen to be local (FSDP1 can leave a rank without a piece of a group).
    main_norm = _group_norm(main, norm_type, shard_group, device)
    if not output:
        _scale_(main, max_norm, main_norm)
        return main_norm
    out_norm = _group_norm(out_grads, norm_type, shard_group, device)
    if output_clip == "separate":
        _scale_(out_grads, max_norm, out_norm)
        _scale_(main, max_norm, main_norm)
        return main_norm
    if output_clip == "scaled":
        width = max(_logit_count(_owner(model, name.rpartition(".")[0])) for name in output)
        out_norm = out_norm / math.sqrt(width)
    total = _combine([main_norm, out_norm], norm_type)
    _scale_(main + out_grads, max_norm, total)
    return total


def _owner(model: nn.Module, seglu_name: str) -> nn.Module:
    """The head that carries the SegLU named ``seglu_name`` (past PEFT's ``modules_to_save`` wrapper)."""
    owner_name = _PEFT_WRAPPER.sub("", seglu_name).rpartition(".")[0]
    return model.get_submodule(owner_name) if owner_name else model


def patch_trainer_weight_decay() -> None:
    """Make ``transformers.Trainer`` (and ``Seq2SeqTrainer``) leave MultiMax parameters out of weight decay. By default
    Trainer decays every parameter whose name is not a bias or a norm, which includes ``multimax_ts``."""
    from transformers import Trainer

    original = Trainer.get_decay_parameter_names
    if getattr(original, "_multimax_patched", False):
        return

    @functools.wraps(original)
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        excluded = set(multimax_parameter_names(model))
        return [name for name in original(self, model) if name not in excluded]

    get_decay_parameter_names._multimax_patched = True
    Trainer.get_decay_parameter_names = get_decay_parameter_names


_TRAINER_OUTPUT_CLIP = {"mode": "separate"}


def set_trainer_output_clip(mode: str) -> None:
    """How ``transformers.Trainer`` clips models with output-layer MultiMax: one of :data:`OUTPUT_CLIP_MODES`
    (default ``"separate"``; ``"global"`` restores Trainer's own clipping). See :func:`clip_grad_norm_`."""
    if mode not in OUTPUT_CLIP_MODES:
        raise ValueError(f"`mode` must be one of {OUTPUT_CLIP_MODES}, got {mode!r}")
    _TRAINER_OUTPUT_CLIP["mode"] = mode


def patch_trainer_clipping() -> None:
    """Make ``transformers.Trainer`` clip models with output-layer MultiMax through :func:`clip_grad_norm_` (mode set
    by :func:`set_trainer_output_clip`). Trainer's ``grad_norm`` log is then the value that function returns. Models
    without output-layer MultiMax, DeepSpeed, XLA, SageMaker and mixed-mesh (tensor + data parallel) runs keep
    Trainer's own clipping."""
    from transformers import Trainer

    original = getattr(Trainer, "_clip_grad_norm", None)
    if original is None or getattr(original, "_multimax_patched", False):
        return

    @functools.wraps(original)
    def _clip_grad_norm(self, model: nn.Module):
        from accelerate.utils import DistributedType

        mode = _TRAINER_OUTPUT_CLIP["mode"]
        if (
            mode == "global"
            or self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.XLA)
            or getattr(self.optimizer, "clip_master_grads", None) is not None  # SageMaker model parallelism
            or (hasattr(self, "_has_mixed_mesh_grads") and self._has_mixed_mesh_grads(model))  # TP + FSDP meshes
            or not output_multimax_parameter_names(model)
        ):
            return original(self, model)
        self.accelerator.unscale_gradients()  # what accelerator.clip_grad_norm_ does first (fp16 loss scaling)
        return clip_grad_norm_(model, self.args.max_grad_norm, output_clip=mode)

    _clip_grad_norm._multimax_patched = True
    Trainer._clip_grad_norm = _clip_grad_norm
