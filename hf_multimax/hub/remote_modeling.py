# Template of modeling_multimax.py: hf_multimax.hub.remote_code renders it into pushed folders (HF_MULTIMAX_VERSION).
"""MultiMax attention for this checkpoint, as Transformers remote code (``trust_remote_code=True``).

``hf_multimax.hub.push_to_hub(..., remote_code=True)`` wrote this file next to the weights, and ``config.json``'s
``auto_map`` names, for each Auto class, a class of this file called as Transformers' own class
(``"AutoModelForCausalLM": "modeling_multimax.LlamaForCausalLM"``). Such a class is made on first use: Transformers'
class of that name, with the learnable σ of MultiMax (Zhou, Fritz & Keuper, ICML 2024) on every attention layer when
the config selects ``attn_implementation="multimax"`` (``config.json`` records it), and on the output head when
``config.multimax_output``. One file therefore serves every architecture whose attention layers call Transformers'
``AttentionInterface``, and ``save_pretrained`` keeps the same ``config.json`` (``architectures`` included)::

    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, revision=COMMIT)

Only torch and transformers (>= 5) are needed. Where hf-multimax is installed, this file imports it and its fused
kernels compute the attention (``import hf_multimax`` also registers its own hooks with Transformers); otherwise the
plain PyTorch below does. This file registers ``"multimax"`` (attention and mask function) with Transformers'
interfaces unless something already did, creates the σ parameters inside the model
(``<module>.multimax.multimax_ranges`` and ``multimax_ts``, the names hf-multimax uses) and patches nothing of
Transformers.

MultiMax(x) = softmax(σ(x)); for order N with ranges r and slopes t (2N each):
σ(s) = s + Σ_{n=1..N} [ t[2n-2]·relu(r[2n-2] − s)^n + t[2n-1]·relu(s − r[2n-1])^n ].
The functions below restate hf-multimax's reference (``functional.py``, the eager path of ``attention.py``,
``masking.py``) so that this file stands alone; hf-multimax's tests compare the two.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:  # hf-multimax's fused kernels where it is installed; an import inside `try` is not a requirement of this file
    from hf_multimax.attention import multimax_attention_forward as fused_attention_forward
except ImportError:
    fused_attention_forward = None

logger = logging.getLogger(__name__)

#: The hf-multimax release this file was generated from.
HF_MULTIMAX_VERSION = "0+template"
#: What this file expects of config.json (``multimax_remote_code.format``); a different format is refused on load.
REMOTE_CODE_FORMAT = 1
#: config.json's record of the file that goes with it: ``{"file", "format", "hf_multimax_version"}``.
CONFIG_KEY = "multimax_remote_code"
FILE = Path(__file__).name
MULTIMAX = "multimax"
#: The child module of an attention layer or output head that holds its σ (as in hf-multimax).
SEGLU_ATTRIBUTE = "multimax"
#: Marks an output head whose logits go through σ; hf-multimax checks the same attribute, so σ is never applied twice.
OUTPUT_HOOK = "_multimax_hook"
FLAG_DEFAULTS = {"multimax_order": 2, "multimax_init": "identity", "multimax_per_head": False, "multimax_output": False}
INIT_METHODS = ("identity", "paper")
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head")
CLASSIFIER_ATTRIBUTES = ("score", "classifier", "classification_head")
#: Extras that change the score function (soft-capping, attention sinks): refused rather than ignored.
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")


# ---------------------------------------------------------------------------------------------------------------------
# The math, restated from hf_multimax/functional.py and masking.py (this file must stand alone)


def seglu(x: torch.Tensor, ranges: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """σ(x); ``ranges``/``ts`` of shape (2N,) or (heads, 2N), per-head ones aligned with dimension -3 of ``x``."""
    out = x
    for n in range(1, ranges.shape[-1] // 2 + 1):
        lo, hi = 2 * n - 2, 2 * n - 1
        r_lo, r_hi, t_lo, t_hi = (p[..., i] for p, i in ((ranges, lo), (ranges, hi), (ts, lo), (ts, hi)))
        if ranges.dim() == 2:
            r_lo, r_hi, t_lo, t_hi = (p.view(-1, 1, 1) for p in (r_lo, r_hi, t_lo, t_hi))
        below, above = torch.relu(r_lo - x), torch.relu(x - r_hi)
        if n > 1:
            below, above = below**n, above**n
        out = out + t_lo * below + t_hi * above
    return out


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where a key may be attended, ``-inf`` where it is masked (boolean False, or a float at or below half the
    dtype's minimum); other float-mask values are kept, to be added to σ(scores)."""
    if attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
        return torch.where(attention_mask, zero, torch.full((), float("-inf"), dtype=dtype, device=zero.device))
    masked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
    return attention_mask.to(dtype).masked_fill(masked, float("-inf"))


def safe_softmax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``softmax(z)`` with all-zero rows where every entry is ``-inf`` (a query with no key to attend)."""
    row_max = z.amax(dim=dim, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max).detach()
    exp = torch.exp(z - row_max)
    total = exp.sum(dim=dim, keepdim=True)
    return exp / torch.where(total > 0, total, torch.ones_like(total))


def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim), heads of one group adjacent."""
    if n_rep == 1:
        return hidden
    b, h, s, d = hidden.shape
    return hidden[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


# ---------------------------------------------------------------------------------------------------------------------
# The attention function Transformers calls, restated from hf_multimax/attention.py (eager path)


def multimax_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax(σ(Q·Kᵀ·scale + position_bias) + mask) · V``, σ before the mask (σ of a dtype-minimum mask value
    overflows), σ and SoftMax in float32. Returns ``(output (batch, q, heads, dim), weights or None)``."""
    if fused_attention_forward is not None:
        return fused_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            scaling=scaling,
            dropout=dropout,
            is_causal=is_causal,
            position_bias=position_bias,
            **kwargs,
        )
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f'attn_implementation="multimax" does not support `{name}`; use "eager" or "sdpa"')
    modulator = getattr(module, SEGLU_ATTRIBUTE, None)
    if modulator is None:
        raise RuntimeError(
            f"{type(module).__name__} has no MultiMax parameters: load the model through this file's classes "
            '(Auto classes with trust_remote_code=True) or call model.set_attn_implementation("multimax") on one'
        )
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    # Transformers' sdpa_mask returns None for purely causal attention and leaves causality to the backend.
    causal = bool(attention_mask is None and is_causal and query.shape[2] > 1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if position_bias is not None:
        scores = scores + position_bias.to(scores.dtype)
    z = modulator(scores)
    if causal:
        keep = torch.ones(z.shape[-2:], dtype=torch.bool, device=z.device).tril()
        z = z.masked_fill(~keep, float("-inf"))
    if attention_mask is not None:
        z = z + additive_mask(attention_mask, z.dtype)
    weights = safe_softmax(z, dim=-1).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), weights


def register() -> None:
    """Register ``"multimax"`` with Transformers' attention and mask interfaces, unless it is registered already
    (by hf-multimax, or by this file for another checkpoint). An attention function needs a mask function of the same
    name, or Transformers silently passes it no mask."""
    if MULTIMAX not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(MULTIMAX, multimax_attention_forward)
    if MULTIMAX not in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys():
        AttentionMaskInterface.register(MULTIMAX, sdpa_mask)


register()


# ---------------------------------------------------------------------------------------------------------------------
# The parameters, restated from hf_multimax/modeling.py and registry.py


class SegLU(nn.Module):
    """One layer's (or the output head's) σ: ``multimax_ranges`` and ``multimax_ts``, shape (2N,) or (heads, 2N)."""

    def __init__(self, order: int, num_heads: int | None, init_method: str, device=None, dtype=None) -> None:
        super().__init__()
        self.order, self.num_heads, self.init_method = order, num_heads, init_method
        shape = (2 * order,) if num_heads is None else (num_heads, 2 * order)
        self.multimax_ranges = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.multimax_ts = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        if self.multimax_ranges.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Identity (zeros) or the paper's trunc-normal (std 0.02); tensors loaded from a checkpoint are kept."""
        for param in (self.multimax_ranges, self.multimax_ts):
            if self.init_method == "paper":
                init.trunc_normal_(param, std=0.02)
            else:
                init.zeros_(param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return seglu(x, self.multimax_ranges.to(x.dtype), self.multimax_ts.to(x.dtype))

    def extra_repr(self) -> str:
        heads = "shared" if self.num_heads is None else f"per_head={self.num_heads}"
        return f"order={self.order}, {heads}, init={self.init_method!r}"


def flags(config) -> dict:
    """The ``multimax_*`` flags of ``config`` (defaults where absent), checked."""
    values = {name: getattr(config, name, default) for name, default in FLAG_DEFAULTS.items()}
    order, init_method = values["multimax_order"], values["multimax_init"]
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"config.json: `multimax_order` must be an int >= 1, got {order!r}")
    if init_method not in INIT_METHODS:
        raise ValueError(f"config.json: `multimax_init` must be one of {INIT_METHODS}, got {init_method!r}")
    for name in ("multimax_per_head", "multimax_output"):
        if not isinstance(values[name], bool):
            raise ValueError(f"config.json: `{name}` must be true or false, got {values[name]!r}")
    return values


def check_format(config) -> None:
    """Refuse a config.json written for another version of this file (one error naming the file and both)."""
    record = getattr(config, CONFIG_KEY, None)
    if isinstance(record, dict) and record.get("format") != REMOTE_CODE_FORMAT:
        raise ValueError(
            f"{FILE} was generated by hf-multimax {HF_MULTIMAX_VERSION} (remote-code format {REMOTE_CODE_FORMAT}), but "
            f"this checkpoint's config.json was written for format {record.get('format')!r} by hf-multimax "
            f"{record.get('hf_multimax_version')}: the folder mixes files of two hf-multimax versions. Push it again "
            "with `hf-multimax push --remote-code` (it writes both), or load it with hf-multimax installed "
            "(`import hf_multimax`, without trust_remote_code)."
        )


@functools.cache
def routes_through_interface(cls: type) -> bool:
    """Whether a module class dispatches its attention through ``ALL_ATTENTION_FUNCTIONS`` (some ``forward`` in its
    class hierarchy reads that global); models themselves never qualify."""
    if issubclass(cls, PreTrainedModel):
        return False
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        forward = klass.__dict__.get("forward")
        code = getattr(inspect.unwrap(forward), "__code__", None) if forward is not None else None
        if code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names:
            return True
    return False


def governed_modules(model: nn.Module):
    """``(module, config)`` for every module, with the config that selects its attention (its own, else that of the
    nearest enclosing model: encoder-decoders keep copies of the config in their stacks)."""
    stack = [(model, model.config)]
    while stack:
        module, config = stack.pop()
        own = getattr(module, "config", None)
        config = own if isinstance(own, transformers.PreTrainedConfig) else config
        yield module, config
        stack.extend((child, config) for child in reversed(list(module.children())))


def head_count(module: nn.Module, config) -> int:
    for attribute in HEAD_COUNT_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return config.num_attention_heads


def placement(owner: nn.Module) -> dict:
    reference = next(owner.parameters(recurse=True), None)
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    return {"device": reference.device if reference is not None else None, "dtype": dtype}


def output_head(model: nn.Module) -> nn.Module | None:
    """The module whose output is the logits: the LM head, or a classification head (None for base models)."""
    head = model.get_output_embeddings()
    if isinstance(head, nn.Module):
        return head
    for attribute in CLASSIFIER_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Module):
            return head
    return None


def modulate_logits(head: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
    """Forward hook of the output head: logits -> σ(logits), in float32."""
    return getattr(head, SEGLU_ATTRIBUTE)(logits.float()).to(logits.dtype)


def attach_multimax(model: PreTrainedModel) -> int:
    """Give every attention module whose config selects ``"multimax"`` its σ, and the output head its σ and hook when
    ``multimax_output``; return the number of attention modules with σ. Idempotent (keeps σ already there, e.g.
    hf-multimax's)."""
    settings = flags(model.config)
    count = 0
    for module, config in governed_modules(model):
        if config._attn_implementation != MULTIMAX or not routes_through_interface(type(module)):
            continue
        if getattr(module, SEGLU_ATTRIBUTE, None) is None:
            heads = head_count(module, config) if settings["multimax_per_head"] else None
            seglu_module = SegLU(settings["multimax_order"], heads, settings["multimax_init"], **placement(module))
            setattr(module, SEGLU_ATTRIBUTE, seglu_module)
        count += 1
    if model.config._attn_implementation == MULTIMAX and count == 0:
        raise ValueError(
            f"{type(model).__name__} does not route its attention through Transformers' AttentionInterface"
        )
    head = output_head(model) if settings["multimax_output"] else None
    if head is not None:
        if getattr(head, SEGLU_ATTRIBUTE, None) is None:
            seglu_module = SegLU(settings["multimax_order"], None, settings["multimax_init"], **placement(head))
            setattr(head, SEGLU_ATTRIBUTE, seglu_module)
        if getattr(head, OUTPUT_HOOK, None) is None:
            setattr(head, OUTPUT_HOOK, head.register_forward_hook(modulate_logits))
    return count


@contextmanager
def recording_implementation(config):
    """While saving: ``config.json`` records ``"attn_implementation": "multimax"``, which Transformers reads back into
    ``config._attn_implementation``, so the folder loads as MultiMax unless the loader asks for another one."""
    record = config._attn_implementation == MULTIMAX and "attn_implementation" not in config.__dict__
    if record:
        config.__dict__["attn_implementation"] = MULTIMAX
    try:
        yield
    finally:
        if record:
            config.__dict__.pop("attn_implementation", None)


# ---------------------------------------------------------------------------------------------------------------------
# The classes named in config.json's auto_map

_CLASSES: dict[str, type] = {}
_LOCK = threading.Lock()


def keep_weight_conversions(base: type) -> None:
    """Transformers renames some checkpoints' weights when it loads them (and back when it saves), but not for remote
    code unless the class or model type was registered: register Transformers' own mapping again, unchanged, so that
    the subclass reads and writes the checkpoints its Transformers class does (ViT's, for one)."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a Transformers without weight conversions
        return
    for key in (base.__name__, getattr(base.config_class, "model_type", None)):
        mapping = get_checkpoint_conversion_mapping(key) if key else None
        if mapping is not None:
            register_checkpoint_conversion_mapping(key, mapping, overwrite=True)


def multimax_class(name: str) -> type:
    """Transformers' model class ``name`` with MultiMax's parameters: a subclass of the same name."""
    base = getattr(transformers, name, None)
    if not (isinstance(base, type) and issubclass(base, PreTrainedModel)):
        raise AttributeError(
            f"{FILE} (hf-multimax {HF_MULTIMAX_VERSION}) makes MultiMax versions of Transformers' model classes, but "
            f"transformers {transformers.__version__} has no model class {name!r}"
        )
    keep_weight_conversions(base)

    def __init__(self, config, *args, **kwargs):
        check_format(config)
        flags(config)
        recorded = (getattr(config, CONFIG_KEY, None) or {}).get("attn_implementation")
        if recorded == MULTIMAX and config._attn_implementation not in (None, MULTIMAX):
            logger.warning(
                "%s: this checkpoint was trained with MultiMax attention, but attn_implementation=%r was asked for: "
                "its learned MultiMax attention parameters are not used (Transformers lists them as UNEXPECTED)",
                name,
                config._attn_implementation,
            )
        base.__init__(self, config, *args, **kwargs)

    def post_init(self):
        attach_multimax(self)
        base.post_init(self)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        result = base.set_attn_implementation(self, attn_implementation, *args, **kwargs)
        attach_multimax(self)
        return result

    @torch.no_grad()
    def initialize_weights(self):
        base.initialize_weights(self)
        for module in self.modules():
            if isinstance(module, SegLU):
                module.reset_parameters()

    def save_pretrained(self, save_directory, *args, **kwargs):
        if type(self)._auto_class is None:  # loaded through this class rather than an Auto class: find its entry
            reference = f"{__name__.rpartition('.')[2]}.{name}"
            for auto_class, target in (getattr(self.config, "auto_map", None) or {}).items():
                if isinstance(target, str) and target.split("--")[-1] == reference:
                    type(self).register_for_auto_class(auto_class)
                    break
        with recording_implementation(self.config):
            return base.save_pretrained(self, save_directory, *args, **kwargs)

    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"transformers.{name} with MultiMax attention ({FILE}, hf-multimax {HF_MULTIMAX_VERSION}).",
        "__init__": __init__,
        "post_init": post_init,
        "set_attn_implementation": set_attn_implementation,
        "initialize_weights": initialize_weights,
        "save_pretrained": save_pretrained,
    }
    return type(name, (base,), namespace)


def __getattr__(name: str) -> type:
    """``modeling_multimax.LlamaForCausalLM`` and friends, made on first use (PEP 562)."""
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _LOCK:
        if name not in _CLASSES:
            _CLASSES[name] = multimax_class(name)
        return _CLASSES[name]
