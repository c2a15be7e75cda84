"""Where to intercept: targets (module paths + how their outputs are forecast) resolved from a model and a config.

Adapters are data: an ``AdapterSpec`` registered by model class names which module outputs are forecast
(module granularity), which modules may skip their compute on forecast steps because only forecast modules consume
their outputs, which modules are blocks whose residual is forecast (block granularity), and which forward
arguments those residuals are taken against. Any other ``nn.Module`` uses path patterns given in the config.

Example:
    >>> spec = AdapterSpec("my-dit", modules=("blocks.*.attn", "blocks.*.mlp"), blocks=("blocks.*",))
    >>> register_adapter("MyDiT", spec)   # doctest: +SKIP
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import TaylorSeerConfig, preset
from ..parts import CacheConfig, Targets, parts_of
from .shortcuts import find_shortcut

MODES = ("output", "residual", "skip", "shortcut")


@dataclass(frozen=True)
class Target:
    """One intercepted module: its path in the model and what is forecast.

    ``mode="output"``: the module's output (a tensor or a tuple/list/dict of tensors) is forecast.
    ``mode="residual"``: the module is a block ``out = in + r``; ``r = out - in`` is forecast, with ``inputs``
    naming, for each output position in order (a tensor, or the items of a returned tuple), the forward argument it
    is the residual of; ``None`` items are passed through.
    ``mode="skip"``: nothing is forecast; on forecast steps the module returns zeros shaped like its last computed
    output, because the only consumers of that output are forecast targets of the same block (e.g. the attention
    and MLP inputs of a single-stream block's forecast ``proj_out``).
    """

    path: str
    mode: str = "output"
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.mode == "residual" and not self.inputs:
            raise ValueError(f"target {self.path!r}: mode 'residual' needs the names of its input arguments")


BlockInputs = tuple[str, ...] | tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class AdapterSpec:
    """A model family's declaration: which module outputs are forecast at each granularity.

    ``modules``: patterns of the modules whose raw outputs are forecast (module granularity, the paper's).
    ``skip``: patterns of modules whose outputs feed only forecast targets; they return zeros on forecast steps.
    ``blocks``: patterns of the blocks whose residuals are forecast (block granularity).
    ``timestep_arg``: the model's forward argument that carries the timestep (steps are read from it when no one
    tells them). ``preset``: the recommended preset for the family, with the reason in ``notes``.
    ``block_inputs``: the forward argument names the block outputs are residuals of, in output order; either one
    tuple of names for every block, or ``((pattern, names), ...)`` pairs when block types differ (first match wins).
    Declared patterns may individually match nothing (e.g. ``attn2`` exists only in some SD3.5 layers), but
    together they must match something.
    """

    name: str
    modules: tuple[str, ...]
    blocks: tuple[str, ...] = ()
    block_inputs: BlockInputs = ("hidden_states",)
    skip: tuple[str, ...] = ()
    notes: str = ""
    timestep_arg: str = "timestep"  # the forward argument the step is read from when no one tells it
    preset: str = ""  # the recommended preset (a name of taylorseer.PRESET_NAMES), used when apply() gets no config

    def inputs_for(self, path: str) -> tuple[str, ...]:
        """The residual input names of the block at ``path``; ``ValueError`` if no ``block_inputs`` pair matches."""
        flat = [entry for entry in self.block_inputs if isinstance(entry, str)]
        if len(flat) == len(self.block_inputs):
            return tuple(flat)
        pairs = [entry for entry in self.block_inputs if not isinstance(entry, str)]
        for pattern, names in pairs:
            if _pattern_regex(pattern).match(path):
                return tuple(names)
        raise ValueError(f"adapter {self.name!r} declares no block_inputs for {path!r}; "
                         f"patterns: {[pattern for pattern, _ in pairs]}")


_REGISTRY: dict[str, AdapterSpec] = {}


def register_adapter(class_name: str, spec: AdapterSpec) -> None:
    """Register ``spec`` for models whose class (or a base class) is named ``class_name``."""
    _REGISTRY[class_name] = spec


def registered_adapters() -> dict[str, AdapterSpec]:
    """A copy of the registry: class name -> spec."""
    return dict(_REGISTRY)


def find_adapter(model: nn.Module) -> AdapterSpec | None:
    """The spec registered for the model's class or nearest registered base class, if any."""
    for cls in type(model).__mro__:
        if cls.__name__ in _REGISTRY:
            return _REGISTRY[cls.__name__]
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) or similar holder stands for.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> unwrap(layer) is layer
        True
    """
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
        model = model._orig_mod
    return model


def default_config(model: nn.Module | Any) -> TaylorSeerConfig:
    """The recommended config of a model's family (its adapter record's ``preset``), else ``TaylorSeerConfig()``;
    ``model`` may be a pipeline (its ``.transformer`` is looked up). Re-exported as ``taylorseer.default_config``.

    Example:
        >>> default_config(nn.Linear(2, 2)).name
        'custom'
    """
    transformer = getattr(model, "transformer", model)
    spec = find_adapter(unwrap(transformer)) if isinstance(transformer, nn.Module) else None
    return preset(spec.preset) if spec is not None and spec.preset else TaylorSeerConfig()


#################################################################################
#                               Path patterns                                   #
#################################################################################

def _pattern_regex(pattern: str) -> re.Pattern:
    parts = []
    for component in pattern.split("."):
        if component == "**":
            parts.append(r"(?:[^.]+(?:\.[^.]+)*)")
        else:
            parts.append("".join("[^.]*" if c == "*" else "[^.]" if c == "?" else re.escape(c) for c in component))
    return re.compile(r"\.".join(parts) + r"\Z")


def match_modules(model: nn.Module, patterns: tuple[str, ...], require_each: bool = True) -> list[str]:
    """Paths of the sub-modules matching any pattern, in model order (``*``: one component, ``**``: any).

    Containers that are never called themselves (``ModuleList``, ``ModuleDict``: modules without a ``forward``) are
    not targets: a wildcard pattern passes over them, and a pattern matching only containers raises
    ``ValueError`` naming it and suggesting patterns for the modules inside. Raises ``ValueError`` naming a pattern
    that matches nothing (unless ``require_each=False``), with example patterns of the model.
    """
    modules = {name: module for name, module in model.named_modules() if name}
    names = list(modules)
    matched: list[str] = []
    for pattern in patterns:
        regex = _pattern_regex(pattern)
        hits = [n for n in names if regex.match(n)]
        callable_hits = [n for n in hits if not _is_container(modules[n])]
        if hits and not callable_hits:
            raise ValueError(
                f"modules pattern {pattern!r} names {_describe_containers(hits, modules)}: a container is never "
                f"called, so nothing inside it would be forecast; name the modules in it instead, e.g. "
                f"{_inside_patterns(hits[0], modules[hits[0]])}"
            )
        hits = callable_hits
        if not hits and require_each:
            raise ValueError(
                f"modules pattern {pattern!r} matches no sub-module of {type(model).__name__}; "
                f"patterns use '*' for one path component, e.g. {suggest_patterns(model)[:4]}"
            )
        matched.extend(h for h in hits if h not in matched)
    order = {n: i for i, n in enumerate(names)}
    return sorted(matched, key=order.__getitem__)


def _is_container(module: nn.Module) -> bool:
    """True for modules without a forward of their own (``ModuleList``, ``ModuleDict``): they are never called."""
    return getattr(type(module), "forward", None) is nn.Module.forward


def _describe_containers(paths: list[str], modules: dict[str, nn.Module]) -> str:
    shown = ", ".join(f"{p!r} (a {type(modules[p]).__name__})" for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _inside_patterns(path: str, container: nn.Module) -> list[str]:
    """Patterns for the children of a container's first item (``transformer_blocks.*.attn1``), or its items."""
    items = list(container.named_children())
    if not items:
        return [f"{path}.*"]
    first_name, first = items[0]
    children = [f"{path}.*.{child}" for child, _ in first.named_children()]
    return children[:4] if children and not _is_container(first) else [f"{path}.*"]


def suggest_patterns(model: nn.Module) -> list[str]:
    """Patterns for the children of the model's repeated blocks (``ModuleList`` items), e.g. ``blocks.*.attn``."""
    out: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            for child, _ in module[0].named_children():
                pattern = f"{name}.*.{child}" if name else f"*.{child}"
                if pattern not in out:
                    out.append(pattern)
    return out


def resolve_targets(model: nn.Module, config: Targets | CacheConfig | TaylorSeerConfig) -> list[Target]:
    """The targets for ``model`` under the ``Targets`` part of ``config`` (a ``Targets``, or a config holding one):
    its ``modules`` patterns, else the adapter registered for the model's class.

    Example:
        >>> resolve_targets(model, Targets(granularity="output"))   # doctest: +SKIP
        [Target(path='', mode='output', inputs=())]
    """
    config = config if isinstance(config, Targets) else parts_of(config).targets
    if config.granularity == "output":
        return [Target("", "output")]
    spec = find_adapter(model)
    skipped: list[str] = []
    if config.modules:
        paths = match_modules(model, config.modules)
    elif spec is not None:
        patterns = spec.modules if config.granularity == "module" else spec.blocks
        paths = match_modules(model, patterns, require_each=False)
        if not paths:
            raise ValueError(f"adapter {spec.name!r} declares no {config.granularity!r} targets matching "
                             f"{type(model).__name__} (patterns {list(patterns)}); pass modules=... patterns "
                             f"or use granularity='output'")
        if config.granularity == "module":
            skipped = [p for p in match_modules(model, spec.skip, require_each=False) if p not in paths]
    else:
        raise ValueError(
            f"no adapter is registered for {type(model).__name__}: pass the sub-modules to forecast as "
            f"TaylorSeerConfig(modules=...), e.g. modules={tuple(suggest_patterns(model)[:4])}"
        )
    if config.granularity == "block":
        return [Target(p, "residual", spec.inputs_for(p) if spec else ("hidden_states",)) for p in paths]
    targets = [Target(p, "output") for p in paths] + [Target(p, "skip") for p in skipped]
    return targets + (_shortcut_targets(model, paths) if config.block_shortcuts else [])


def _shortcut_targets(model: nn.Module, paths: list[str]) -> list[Target]:
    """Blocks with a registered shortcut whose consumed children are all forecast module targets."""
    chosen = set(paths)
    out = []
    for name, module in model.named_modules():
        record = find_shortcut(module)
        if record is not None and all(f"{name}.{child}" in chosen for child in record.children):
            out.append(Target(name, "shortcut", record.children))
    return out
