"""Every hook hf-multimax puts on Transformers, in one place: installed by ``import hf_multimax``, undone by
:func:`unregister` (``hf_multimax.unregister()``).

What :func:`register` does (the list :data:`HOOKS` and :func:`register` are the whole story):

* ``AttentionInterface`` / ``AttentionMaskInterface``: every implementation of :mod:`hf_multimax.registry`
  (``"multimax"``, ``"multimax_eager"``; the comparators once :func:`register_comparators` is called) with its mask
  function, under one name each (an attention function without a mask function of its name silently gets
  ``attention_mask=None``).
* ``PreTrainedConfig``: validated properties for the ``multimax_*`` flags, so ``from_pretrained(..., multimax_order=3)``
  lands on the config (Transformers otherwise hands unknown keyword arguments to the model's ``__init__``) and the
  flags are written to ``config.json``.
* ``PreTrainedModel.post_init`` and ``set_attn_implementation``: attach the implementation's parameters
  (:func:`hf_multimax.registry.attach_parameters`). ``post_init`` runs inside ``from_pretrained``'s meta-device
  context, so the parameters are created there, loaded like any other weight, and initialised only when the
  checkpoint lacks them.
* ``PreTrainedModel._initialize_weights``: initialises those parameter modules (models' own ``_init_weights`` do not
  know them); ``_adjust_missing_and_unexpected_keys``: refuses checkpoint parameters of the wrong shape and warns
  when a checkpoint's MultiMax parameters would be dropped.
* ``PreTrainedModel.save_pretrained``: ``config.json`` records ``"attn_implementation": "multimax"`` for a model
  that runs MultiMax. Transformers itself reads that field back into ``config._attn_implementation``, so the folder
  loads as MultiMax by default, and an ``attn_implementation=`` passed to ``from_pretrained`` still wins (see
  :func:`recorded_implementation`; plain Transformers refuses the folder instead of silently running SoftMax).

Nothing else is changed: ``transformers.Trainer`` is left alone (see :mod:`hf_multimax.integrations.trainer`).
Each patched method's signature is checked first (:func:`check_compatibility`); one that changed in a Transformers
release is not patched, and a :class:`MultiMaxWarning` names it.

``import hf_multimax`` costs nothing by itself: the hooks are installed the moment Transformers' modeling code
(``transformers.modeling_utils``) is imported, or at once when it already is. This module imports no Transformers
code at module level for that reason.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import inspect
import logging
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "MultiMaxWarning",
    "HOOKS",
    "register",
    "unregister",
    "registered",
    "install_when_imported",
    "check_compatibility",
    "register_attention",
    "register_comparators",
    "recorded_implementation",
]

MODELING_MODULE = "transformers.modeling_utils"
CONFIG_MODULE = "transformers.configuration_utils"


class MultiMaxWarning(UserWarning):
    """MultiMax parameters or flags that would have no effect (e.g. a MultiMax checkpoint loaded without MultiMax), or a
    hook that could not be installed on this Transformers version."""


@dataclass(frozen=True)
class Hook:
    """One method of a Transformers class that hf-multimax wraps.

    Attributes:
        owner: ``"PreTrainedModel"`` (in ``transformers.modeling_utils``).
        name: the method.
        parameters: the leading parameter names the wrapper relies on; :func:`check_compatibility` compares them with
            the installed Transformers.
        wrap: ``wrap(original) -> replacement``.
        purpose: what breaks without it (for the warning).
    """

    owner: str
    name: str
    parameters: tuple[str, ...]
    wrap: Callable[[Callable], Callable]
    purpose: str

    @property
    def qualified_name(self) -> str:
        return f"transformers.{self.owner}.{self.name}"


# ---------------------------------------------------------------------------------------------------------------------
# The wrappers


def _wraps(original: Callable):
    """``functools.wraps`` that keeps the wrapper's own ``__module__``, so a patched method says where it comes from
    (``PreTrainedModel.post_init.__module__`` is this module; ``__wrapped__`` is Transformers' original)."""
    return functools.wraps(original, assigned=("__name__", "__qualname__", "__doc__"))


def _wrap_post_init(original):
    @_wraps(original)
    def post_init(self) -> None:
        from .. import registry

        registry.attach_parameters(self)
        check_shared_config(self)
        original(self)

    return post_init


def _wrap_set_attn_implementation(original):
    @_wraps(original)
    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        from .. import registry

        result = original(self, attn_implementation, *args, **kwargs)
        registry.attach_parameters(self)
        return result

    return set_attn_implementation


def _wrap_initialize_weights(original):
    @_wraps(original)
    def _initialize_weights(self, module, *args, **kwargs):
        from .. import registry

        if isinstance(module, registry.parameter_module_types()):
            if not getattr(module, "_is_hf_initialized", False):
                module.reset_parameters()
                module._is_hf_initialized = True
            return None
        return original(self, module, *args, **kwargs)

    return _initialize_weights


def _wrap_adjust_keys(original):
    @_wraps(original)
    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        check_loaded_parameters(self, loading_info)
        return original(self, loading_info)

    return _adjust_missing_and_unexpected_keys


def _wrap_save_pretrained(original):
    @_wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        with recording_implementation(self.config):
            return original(self, save_directory, *args, **kwargs)

    return save_pretrained


#: Everything patched on Transformers' classes (the config properties and interface registrations aside).
HOOKS: tuple[Hook, ...] = (
    Hook(
        "PreTrainedModel",
        "post_init",
        ("self",),
        _wrap_post_init,
        "models built with attn_implementation='multimax' get no MultiMax parameters",
    ),
    Hook(
        "PreTrainedModel",
        "set_attn_implementation",
        ("self", "attn_implementation"),
        _wrap_set_attn_implementation,
        "set_attn_implementation('multimax') attaches no MultiMax parameters",
    ),
    Hook(
        "PreTrainedModel",
        "_initialize_weights",
        ("self", "module"),
        _wrap_initialize_weights,
        "MultiMax parameters missing from a checkpoint are not initialised",
    ),
    Hook(
        "PreTrainedModel",
        "_adjust_missing_and_unexpected_keys",
        ("self", "loading_info"),
        _wrap_adjust_keys,
        "checkpoints with MultiMax parameters of the wrong shape or loaded without MultiMax are not reported",
    ),
    Hook(
        "PreTrainedModel",
        "save_pretrained",
        ("self", "save_directory"),
        _wrap_save_pretrained,
        "saved MultiMax models do not record attn_implementation in config.json and load as SoftMax by default",
    ),
)


def check_compatibility(classes: dict[str, type] | None = None) -> list[str]:
    """One message per hook whose target no longer exists or whose signature no longer starts with the parameters
    the wrapper relies on (e.g. after a Transformers release); empty when every hook fits. ``classes`` maps owner
    names to classes (default: Transformers' own)."""
    return list(_incompatible(classes).values())


def _incompatible(classes: dict[str, type] | None = None) -> dict[str, str]:
    if classes is None:
        from transformers import PreTrainedModel

        classes = {"PreTrainedModel": PreTrainedModel}
    problems = {}
    for hook in HOOKS:
        method = getattr(classes[hook.owner], hook.name, None)
        if method is None:
            problems[hook.name] = f"{hook.qualified_name} does not exist in this Transformers version"
            continue
        try:
            names = tuple(inspect.signature(inspect.unwrap(method)).parameters)
        except (TypeError, ValueError):
            problems[hook.name] = f"{hook.qualified_name} has no inspectable signature"
            continue
        if names[: len(hook.parameters)] != hook.parameters:
            problems[hook.name] = (
                f"{hook.qualified_name} now takes ({', '.join(names)}); hf-multimax expects it to start with "
                f"({', '.join(hook.parameters)})"
            )
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Checks run by the hooks


def check_loaded_parameters(model, loading_info) -> None:
    """Refuse checkpoint parameters of a registered implementation whose shape differs from the model's; warn when a
    checkpoint holds such parameters that the model does not use (loaded without the implementation)."""
    from .. import registry

    mismatched = [entry for entry in loading_info.mismatched_keys if registry.parameter_key(entry[0])]
    if mismatched:
        # Remove them so that Transformers' own report does not replace this error with a generic RuntimeError.
        loading_info.mismatched_keys = set(loading_info.mismatched_keys) - set(mismatched)
        key, checkpoint_shape, model_shape = sorted(mismatched)[0]
        raise ValueError(
            f"attention parameter `{key}` has shape {tuple(checkpoint_shape)} in the checkpoint but the model expects "
            f"{tuple(model_shape)}: the model was built with multimax_order={model.config.multimax_order!r} and "
            f"multimax_per_head={model.config.multimax_per_head!r} (MultiMax's shape is (2N,) or (num_heads, 2N)), "
            "which differ from the checkpoint's; load it without overriding these flags"
        )
    dropped = sorted(key for key in loading_info.unexpected_keys if registry.parameter_key(key))
    # σ of an output head (multimax_output) that this model class does not have (a base model loaded from a
    # ...ForCausalLM checkpoint): dropped with the head's own weights, as Transformers reports; not an attention matter.
    modules = set(dict(model.named_modules()))
    prefix = f"{getattr(model, 'base_model_prefix', '')}."

    def has_owner(key: str) -> bool:
        owner = registry.parameter_key(key)[0]
        return owner in modules or owner.removeprefix(prefix) in modules or prefix + owner in modules

    owned = {key: has_owner(key) for key in dropped}
    headless = [key for key in dropped if not owned[key]]
    if headless:
        logger.info(
            "The checkpoint's output-layer MultiMax parameters (e.g. `%s`) belong to a head %s does not have; "
            "they are dropped with it",
            headless[0],
            type(model).__name__,
        )
    dropped = [key for key in dropped if owned[key]]
    if dropped:
        trained_with = registry.implementation_of(registry.parameter_key(key)[1] for key in dropped)
        how = "`import hf_multimax`"
        if trained_with in registry.COMPARATOR_IMPLEMENTATIONS:
            how = "`import hf_multimax; hf_multimax.register_comparators()`"
        warnings.warn(
            f"The checkpoint holds {len(dropped)} learned attention parameters (e.g. `{dropped[0]}`) that "
            f"{type(model).__name__} does not use because it was loaded with "
            f"attn_implementation={model.config._attn_implementation!r}. They are dropped: load it with "
            f"{how} and "
            f'`from_pretrained(..., attn_implementation="{trained_with}")` to use them.',
            MultiMaxWarning,
            stacklevel=2,
        )
        logger.warning(
            "Learned attention parameters in the checkpoint were dropped: %d keys, e.g. %s", len(dropped), dropped[0]
        )


#: The ``config.json`` field Transformers reads into ``config._attn_implementation`` (``PreTrainedConfig.__init__``).
RECORDED_FIELD = "attn_implementation"


def recorded_implementation(config) -> str | None:
    """The implementation ``save_pretrained`` records in ``config.json`` for a model built on ``config``: MultiMax's
    (under its default name, ``"multimax"`` for ``"multimax_eager"`` too), else ``None``.

    Why: MultiMax is part of the function a checkpoint computes, not a choice of kernel, and Transformers users expect
    ``from_pretrained(folder)`` to return the model that was saved. Transformers does not write the attention
    implementation to ``config.json`` (its own ones compute the same function), but it honours the field when it is
    there, below an ``attn_implementation=`` passed explicitly. So a MultiMax folder loads as MultiMax after
    ``import hf_multimax``, ``attn_implementation="sdpa"`` still loads SoftMax (with the :class:`MultiMaxWarning` on
    the dropped parameters), and plain Transformers refuses it loudly rather than dropping the learned parameters.
    Only MultiMax is recorded: the comparators are registered on request, and a recorded name that is not
    registered would stop even ``import hf_multimax`` users from loading.
    """
    from .. import registry

    name = config._attn_implementation
    if registry.parametric(name) is not registry.MULTIMAX_PARAMETERS:
        return None
    return next((other for other, impl in registry.IMPLEMENTATIONS.items() if impl.weights_twin == name), name)


@contextlib.contextmanager
def recording_implementation(config):
    """While ``config`` is saved, its ``config.json`` carries :func:`recorded_implementation` (when there is one)."""
    name = recorded_implementation(config)
    record = name is not None and RECORDED_FIELD not in config.__dict__
    if record:
        config.__dict__[RECORDED_FIELD] = name  # serialised by PreTrainedConfig.to_dict, which copies __dict__
    try:
        yield
    finally:
        if record:
            config.__dict__.pop(RECORDED_FIELD, None)


#: id(config) -> (parametric implementation, weak references to the models built with it on that config object).
_MODELS_BY_CONFIG: dict[int, tuple[str, list[weakref.ref]]] = {}


def check_shared_config(model) -> None:
    """Warn when ``model`` switched the attention of another, live model with learned attention parameters (MultiMax
    or another parametric implementation) built on the same config object.

    ``AutoModel*.from_config(config, attn_implementation=...)`` keeps a reference to ``config`` and sets
    ``config._attn_implementation`` in place, so a second model built from the same object silently changes what the
    first one runs.
    """
    from .. import registry

    config = model.config
    previous, refs = _MODELS_BY_CONFIG.get(id(config), (None, []))
    owners = [ref for ref in refs if (m := ref()) is not None and m.config is config]
    current = config._attn_implementation
    if owners and current != previous:
        submodules = {id(m) for m in model.modules()}
        others = [ref() for ref in owners if id(ref()) not in submodules]
        if others:
            warnings.warn(
                f"This {type(model).__name__} was built from the same config object as a live "
                f"{type(others[0]).__name__} "
                f"with {previous!r} attention, and Transformers set `config._attn_implementation={current!r}` on that "
                f"shared object: that model now runs {current!r} too and ignores its learned attention parameters. "
                "Build each model from its own config (`copy.deepcopy(config)`).",
                MultiMaxWarning,
                stacklevel=3,
            )
        owners = []  # warned once for this config object
    if registry.parametric(current) is not None:
        owners.append(weakref.ref(model))
    if owners:
        _MODELS_BY_CONFIG[id(config)] = (current, owners)
    else:
        _MODELS_BY_CONFIG.pop(id(config), None)


# ---------------------------------------------------------------------------------------------------------------------
# Register / unregister

_LOCK = threading.RLock()
#: What register() changed: (object, attribute, previous value or _MISSING), in order; and the registered names.
_PATCHED: list[tuple[Any, str, Any]] = []
_REGISTERED: dict[str, tuple[Any, Any]] = {}
_FLAGS_INSTALLED: list[tuple[Any, str, Any]] = []
_MISSING = object()


def registered() -> bool:
    """Whether the hooks are installed in this process."""
    return bool(_PATCHED) or bool(_REGISTERED)


def _set(target: Any, name: str, value: Any, log: list) -> None:
    log.append((target, name, target.__dict__.get(name, _MISSING)))
    setattr(target, name, value)


def install_flags() -> None:
    """The ``multimax_*`` properties on ``PreTrainedConfig`` (needs only ``transformers.configuration_utils``)."""
    from transformers.configuration_utils import PreTrainedConfig

    from ..config import FLAG_DEFAULTS, flag_property

    with _LOCK:
        if _FLAGS_INSTALLED:
            return
        for name in FLAG_DEFAULTS:
            _set(PreTrainedConfig, name, flag_property(name), _FLAGS_INSTALLED)


def _register_with_transformers(name: str, implementation) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    mapping, masks = AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping
    if name not in _REGISTERED:
        _REGISTERED[name] = (mapping.get(name, _MISSING), masks.get(name, _MISSING))
    AttentionInterface.register(name, implementation.function)
    # Registered under the same name: `sdpa_mask` gives a boolean mask (True = attend), or None for purely causal /
    # unmasked attention, which the attention function resolves from `module.is_causal`.
    AttentionMaskInterface.register(name, implementation.mask_function or sdpa_mask)


def register() -> None:
    """Install everything listed in this module's docstring. Safe to call more than once."""
    with _LOCK:
        install_flags()
        if _PATCHED or _REGISTERED:
            return
        from transformers import PreTrainedModel

        from .. import registry

        classes = {"PreTrainedModel": PreTrainedModel}
        problems = _incompatible(classes)
        for hook in HOOKS:
            if hook.name in problems:
                warnings.warn(
                    f"hf-multimax did not hook {hook.qualified_name}: {problems[hook.name]}. Without "
                    f"it {hook.purpose}. Please report this with your Transformers version.",
                    MultiMaxWarning,
                    stacklevel=2,
                )
                continue
            owner = classes[hook.owner]
            _set(owner, hook.name, hook.wrap(getattr(owner, hook.name)), _PATCHED)
        for name, implementation in registry.IMPLEMENTATIONS.items():
            _register_with_transformers(name, implementation)


def unregister() -> None:
    """Undo :func:`register`: every patched attribute gets its previous value back and the registered attention and
    mask functions are removed (or the ones they replaced restored)."""
    with _LOCK:
        for target, name, previous in reversed(_PATCHED + _FLAGS_INSTALLED):
            if previous is _MISSING:
                delattr(target, name)
            else:
                setattr(target, name, previous)
        _PATCHED.clear()
        _FLAGS_INSTALLED.clear()
        if _REGISTERED:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface

            for name, (function, mask) in _REGISTERED.items():
                for mapping, previous in (
                    (AttentionInterface._global_mapping, function),
                    (AttentionMaskInterface._global_mapping, mask),
                ):
                    if previous is _MISSING:
                        mapping.pop(name, None)
                    else:
                        mapping[name] = previous
            _REGISTERED.clear()
        _CALLBACKS.clear()


def register_attention(
    name: str,
    function: Callable,
    parameters=None,
    *,
    mask_function: Callable | None = None,
    weights_twin: str | None = None,
) -> None:
    """Register an attention implementation of your own, as hf-multimax registers its: ``function`` (Transformers'
    backend signature) and its mask function (default ``sdpa_mask``) under ``name`` with Transformers, and, when it
    has learnable parameters (a :class:`hf_multimax.registry.ParametricAttention`), attach them to the attention
    modules of every model that selects it (LoRA, analysis and model cards then see them too)."""
    from .. import registry

    implementation = registry.Implementation(
        function, parameters, weights_twin=weights_twin, mask_function=mask_function
    )
    with _LOCK:
        registry.add(name, implementation)
        if _REGISTERED or MODELING_MODULE in sys.modules:
            register()
            _register_with_transformers(name, implementation)


def register_comparators(names: Iterable[str] | None = None) -> list[str]:
    """Register the paper's comparators with Transformers (all of ``"sparsemax"``, ``"entmax15"``,
    ``"entmax_alpha"``, ``"evsoftmax"``, or the ``names`` given) and return the names registered.

    ``import hf_multimax`` registers only ``"multimax"`` and ``"multimax_eager"``: these generic names live in
    Transformers' global attention registry, where another package may claim them, so they are registered only when
    asked for (the CLI and the example scripts do it when one is named). A name that something else already
    registered is refused with a ``ValueError`` instead of being replaced. SparseMax and the EntMax variants run the
    ``entmax`` package (``pip install 'hf-multimax[comparators]'``); registering them does not import it.
    """
    from transformers import AttentionInterface

    from .. import registry

    available = registry.COMPARATOR_IMPLEMENTATIONS
    wanted = list(available) if names is None else list(dict.fromkeys([names] if isinstance(names, str) else names))
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise ValueError(f"unknown comparator {unknown[0]!r}; choose from {sorted(available)}")
    with _LOCK:
        register()
        for name in wanted:
            current = AttentionInterface._global_mapping.get(name)
            if current is not None and current is not available[name].function:
                raise ValueError(
                    f"attn_implementation {name!r} is already registered with Transformers by "
                    f"{getattr(current, '__module__', '?')}.{getattr(current, '__qualname__', current)!s}; "
                    "hf-multimax does not replace it. Unregister it first, or use that package's implementation."
                )
        for name in wanted:
            registry.add(name, available[name])
            _register_with_transformers(name, available[name])
    return wanted


def register_named_comparators(names: Iterable[str | None]) -> None:
    """Register those of ``names`` that are comparators (the CLI's and the scripts' way to honour a name the user
    gave); other names are left for Transformers to accept or refuse. A name whose package is missing raises
    :class:`~hf_multimax.extras.MissingExtraError` naming the ``comparators`` extra."""
    from .. import registry
    from ..comparators import NEEDS_ENTMAX
    from ..extras import require

    comparators = [name for name in names if name in registry.COMPARATOR_IMPLEMENTATIONS]
    for name in comparators:
        if name in NEEDS_ENTMAX:
            require("comparators", f"attn_implementation {name!r}")
    if comparators:
        register_comparators(comparators)


# ---------------------------------------------------------------------------------------------------------------------
# Installing when Transformers' modeling code is imported

_CALLBACKS: dict[str, list[Callable[[], None]]] = {}


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a watched module has been imported (then steps aside)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _CALLBACKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec
        callbacks = _CALLBACKS.pop(fullname)

        def exec_then_install(module):
            exec_module(module)
            _run(callbacks)

        loader.exec_module = exec_then_install  # the loader serves this module only
        return spec


def _run(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception as error:  # never break the user's `import transformers...`; say why MultiMax is missing
            warnings.warn(
                f"hf-multimax could not install its Transformers hooks ({type(error).__name__}: {error}); "
                "attn_implementation='multimax' is unavailable",
                MultiMaxWarning,
                stacklevel=2,
            )


_FINDER = _PostImportFinder()


def install_when_imported() -> None:
    """Install the config properties once ``transformers.configuration_utils`` is imported and everything else once
    ``transformers.modeling_utils`` is, or at once for what is already imported."""
    with _LOCK:
        for module, callback in ((CONFIG_MODULE, install_flags), (MODELING_MODULE, register)):
            if module in sys.modules:
                callback()
            else:
                _CALLBACKS.setdefault(module, []).append(callback)
        if _CALLBACKS and _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
