"""Build a formulation from a config (dict, omegaconf DictConfig, kwargs) by name, rejecting unknown keys."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from .base import Formulation
from .ddpm import DDPMFormulation
from .edm import EDMFormulation
from .flow import FlowFormulation

FORMULATIONS: dict[str, type[Formulation]] = {"ddpm": DDPMFormulation, "edm": EDMFormulation, "flow": FlowFormulation}
_ALIASES = {"karras": "edm", "rectified_flow": "flow"}


def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, str):  # a bare name, e.g. the Hydra override `policy.formulation=edm`: its defaults
        return {"name": cfg}
    if isinstance(cfg, Mapping) and not hasattr(cfg, "_metadata"):
        return dict(cfg)
    try:  # omegaconf DictConfig (imported lazily: it is only needed when one is passed)
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    raise TypeError(f"formulation config must be a mapping or DictConfig, got {type(cfg).__name__}")


def canonical_name(name: str) -> str:
    """A formulation's registered name from any accepted spelling ("karras" -> "edm")."""
    return _ALIASES.get(name, name)


def make_formulation(cfg=None, /, **kwargs) -> Formulation:
    """make_formulation({"name": "edm", ...}) / make_formulation("edm") / make_formulation(name="ddpm",
    prediction="sample") / (DictConfig).

    kwargs override cfg; a `_target_` key (Hydra) is ignored; a Formulation passes through unchanged.
    """
    if isinstance(cfg, Formulation) and not kwargs:
        return cfg
    data = {**_as_dict(cfg), **kwargs}
    data.pop("_target_", None)
    name = data.pop("name", None)
    name = _ALIASES.get(name, name)
    if name not in FORMULATIONS:
        raise ValueError(f"unknown diffusion formulation {name!r}; valid: {', '.join(FORMULATIONS)}")
    cls = FORMULATIONS[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for formulation {name!r}; allowed: {', '.join(allowed)} "
                         f"(to switch a config's process, replace its whole block: policy.formulation={name}; "
                         f"overriding policy.formulation.name keeps the old process's options)")
    return cls(**data)
