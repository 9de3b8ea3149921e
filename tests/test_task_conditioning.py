"""task_conditioning='token+global': the task id reaches every layer through the noise conditioning (DiT's AdaLN,
MoDE's attention conditioning) and not only as one token; MoDE's routes and expert cache stay noise-only."""

import numpy as np
import pytest
import torch

from robodit.datasets.normalizer import Normalizer
from robodit.policies.dit import DiTPolicy
from robodit.policies.mode import MoDEPolicy

SHAPES = {"obs": {"state": {"shape": [5], "dtype": "float32"}}, "action": {"shape": [3]}, "num_tasks": 3}
FAMILIES = {"dit": DiTPolicy, "mode": MoDEPolicy}


def _policy(family, conditioning):
    st = lambda d: {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d)}  # noqa: E731
    torch.manual_seed(0)
    policy = FAMILIES[family](SHAPES, Normalizer({"state": st(5), "action": st(3)}), size="tiny", obs_horizon=2,
                              action_horizon=8, n_action_steps=4, num_inference_steps=3,
                              task_conditioning=conditioning)
    with torch.no_grad():  # leave the zero-initialised gates and heads: a fresh net would ignore any condition
        for p in policy.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return policy.eval()


def _obs():
    return {"state": torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(0)).expand(3, 2, 5)}


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_task_conditioning_is_clear(family):
    with pytest.raises(ValueError, match="task_conditioning='film'.*token\\+global"):
        _policy(family, "film")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("conditioning", ["token", "token+global"])
def test_global_task_conditioning_reaches_the_denoiser_without_the_token(family, conditioning, monkeypatch):
    """With the task token taken away, only the global path can tell the three tasks apart."""
    policy = _policy(family, conditioning)
    monkeypatch.setattr(policy, "with_task_token", lambda tokens, goal: tokens)
    one = {"state": _obs()["state"][:1]}
    out = torch.cat([policy.predict_action(one, goal={"task_id": torch.tensor([t])},
                                           generator=torch.Generator().manual_seed(1)) for t in range(3)])
    spread = (out - out[:1]).abs().max().item()  # same observation and noise for each task
    goal = {"task_id": torch.tensor([0, 1, 2])}
    if conditioning == "token":
        assert spread < 1e-6
    else:
        assert spread > 1e-3
        policy.train()
        batch = {"obs.state": _obs()["state"], "task_id": goal["task_id"],
                 "action": torch.zeros(3, 8, 3), "action_is_pad": torch.zeros(3, 8, dtype=torch.bool)}
        policy.compute_loss(batch)["loss"].backward()
        assert policy.task_embedding.weight.grad.abs().sum() > 0


def test_mode_routes_and_cache_stay_noise_only_with_global_task():
    policy = _policy("mode", "token+global")
    routing = policy.inference_routing()  # takes no task: the routers never see it
    goal = {"task_id": torch.tensor([0, 1, 2])}
    outs = {}
    for cached in (True, False):
        policy.expert_cache = cached
        outs[cached] = policy.predict_action(_obs(), goal=goal, generator=torch.Generator().manual_seed(1))
    assert (outs[True] - outs[False]).abs().max().item() <= 1e-5
    assert policy.inference_routing() == routing
