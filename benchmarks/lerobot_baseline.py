"""lerobot's DiffusionPolicy (state-only, DDIM) as a latency baseline, importable without torchvision.

lerobot is installed here without its dependencies, and its diffusion module imports torchvision (for the
ResNet image encoder), which has no CPU build on these machines. The state-only path never calls it, so a
stand-in module answers that import: every name in it is a placeholder class that refuses to be instantiated.
The stand-in is installed only by `build_lerobot_dp`, only when torchvision is absent, and only for this
benchmark process; nothing in robodit imports this file.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Callable


class _Placeholder(type):
    """A torchvision name: usable as a base class or an annotation; calling it says what is missing."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {cls.__name__} is not available (the benchmark's state-only "
                           "lerobot policy never calls torchvision)")


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `torchvision` and every `torchvision.*` submodule as a stand-in package."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _install_torchvision_standin() -> None:
    if importlib.util.find_spec("torchvision") is None and not any(isinstance(f, _StandInFinder)
                                                                   for f in sys.meta_path):
        sys.meta_path.insert(0, _StandInFinder())


def build_lerobot_dp(state_dim: int, action_dim: int, steps: int = 10, obs_horizon: int = 2,
                     action_horizon: int = 16, n_action_steps: int = 8) -> tuple[Callable[[], object], dict]:
    """A zero-argument call that samples one action chunk with lerobot's DiffusionPolicy (its default U-Net,
    DDIM with `steps` steps, batch 1, state-only: the robot state and the rest of our state vector as the
    environment state), and a description. Raises ImportError (with lerobot's own message) when lerobot is absent.

    The call is `policy.diffusion.generate_actions`, the chunk computation `predict_action_chunk` runs after
    stacking its observation queues; lerobot 0.4 normalises in its processor pipeline, outside the model."""
    _install_torchvision_standin()
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    robot = min(action_dim, state_dim - 1)
    config = DiffusionConfig(
        input_features={"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(robot,)),
                        "observation.environment_state": PolicyFeature(type=FeatureType.ENV,
                                                                       shape=(state_dim - robot,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,))},
        n_obs_steps=obs_horizon, horizon=action_horizon, n_action_steps=n_action_steps,
        noise_scheduler_type="DDIM", num_inference_steps=steps, device="cpu")
    policy = DiffusionPolicy(config).eval()
    batch = {"observation.state": torch.randn(1, obs_horizon, robot),
             "observation.environment_state": torch.randn(1, obs_horizon, state_dim - robot)}

    def call():
        with torch.no_grad():
            return policy.diffusion.generate_actions(batch)

    from importlib.metadata import version

    info = {"lerobot": version("lerobot"), "params_M": round(sum(p.numel() for p in policy.parameters()) / 1e6, 2),
            "config": f"DiffusionPolicy default U-Net, state-only, DDIM-{steps}, To={obs_horizon}, "
                      f"horizon {action_horizon}"}
    return call, info
