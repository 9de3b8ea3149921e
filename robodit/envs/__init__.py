"""robodit.envs: simulators behind one `ControlInterface`, built by name with `make_env("SIM/TASK")`.

The registry maps a simulator prefix to "module:Class" so that importing this package stays cheap: a
simulator's module (and its heavy dependencies) is only imported when an env of it is built.
"""

from __future__ import annotations

import difflib
import importlib
import os

from robodit.envs.base import ArraySpec, ControlInterface, EnvSpec

# prefix -> (module:Class taking (task, **kwargs), module:function validating a task name)
SIMULATORS: dict[str, tuple[str, str]] = {
    "metaworld": ("robodit.envs.metaworld:MetaWorldEnv", "robodit.envs.metaworld:check_task"),
    "robosuite": ("robodit.envs.robosuite:RobosuiteEnv", "robodit.envs.robosuite:check_task"),
    "libero": ("robodit.envs.libero:LiberoEnv", "robodit.envs.libero_tasks:check_task"),
}
# prefix -> module:function returning None when this interpreter can build the simulator's envs, else the
# Python that can (raising, with what to do, when there is none): LIBERO needs robosuite 1.4.
INTERPRETERS: dict[str, str] = {"libero": "robodit.envs.libero_tasks:foreign_python"}


def register_simulator(prefix: str, env_class: str, check_task: str) -> None:
    """Add a simulator: `env_class` and `check_task` are "module:attr" paths, imported on first use."""
    SIMULATORS[prefix] = (env_class, check_task)


def _load(path: str):
    """Import a simulator's "module:attr". Its first `import mujoco` picks the GL backend from MUJOCO_GL, so the
    headless default (EGL) is set here, when a simulator is about to load, never at `import robodit.envs`."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def parse_env_name(name: str) -> tuple[str, str]:
    """Split "SIM/TASK" and validate both parts (ValueError with close matches) without building anything."""
    sim, sep, task = name.partition("/")
    if sim not in SIMULATORS:
        if not sep:  # a bare task name: say which simulator has it
            for prefix, (_, check) in SIMULATORS.items():
                try:
                    _load(check)(name)
                except ValueError:
                    continue
                raise ValueError(f"{name!r} names no simulator; did you mean {prefix}/{name}?")
        close = difflib.get_close_matches(sim, list(SIMULATORS), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known simulators: {', '.join(SIMULATORS)}"
        raise ValueError(f"unknown simulator {sim!r} in {name!r}; {hint} (expected SIMULATOR/TASK)")
    if not sep or not task:
        raise ValueError(f"{name!r} names no task; expected {sim}/TASK, e.g. metaworld/reach-v3")
    _load(SIMULATORS[sim][1])(task)
    return sim, task


def check_env_kwargs(simulator: str, kwargs: dict) -> None:
    """Refuse constructor kwargs the simulator's env does not take, before any env is built (a misspelt key
    would otherwise surface as an error in every episode's worker)."""
    import inspect

    params = inspect.signature(_load(SIMULATORS[simulator][0])).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if n != "task" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{simulator} envs take no {', '.join(unknown)}; their options: {', '.join(allowed)}")


def foreign_python(simulator: str) -> str | None:
    """The interpreter `simulator`'s envs must run in, or None for this one."""
    path = INTERPRETERS.get(simulator)
    return _load(path)() if path else None


def make_env(name: str, **kwargs) -> ControlInterface:
    """Build the env "SIM/TASK", e.g. `make_env("metaworld/reach-v3", image_size=84)`. A simulator that needs
    another interpreter (LIBERO) is built there and driven through a `ForeignEnv` proxy."""
    sim, task = parse_env_name(name)
    python = foreign_python(sim)
    if python is not None:
        from robodit.envs.interpreter import ForeignEnv

        return ForeignEnv(python, name, **kwargs)
    return _load(SIMULATORS[sim][0])(task, **kwargs)


__all__ = ["ArraySpec", "ControlInterface", "EnvSpec", "INTERPRETERS", "SIMULATORS", "check_env_kwargs",
           "foreign_python", "make_env", "parse_env_name", "register_simulator"]
