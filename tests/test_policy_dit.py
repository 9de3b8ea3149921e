import pytest
import torch

from robodit.datasets.normalizer import Normalizer
from robodit.policies.dit import DiTPolicy

SHAPES = {"obs": {"state": {"shape": [5], "dtype": "float32"}, "wrist": {"shape": [16, 16, 3], "dtype": "uint8"}},
          "action": {"shape": [3]}, "num_tasks": 1}


def _normalizer():
    import numpy as np

    st = lambda d: {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d)}  # noqa: E731
    return Normalizer({"state": st(5), "action": st(3)})


def _batch(b=8, to=2, tp=8):
    g = torch.Generator().manual_seed(0)
    state = torch.randn(b, to, 5, generator=g)
    w = torch.randn(5, 3, generator=g)
    action = torch.tanh(state[:, -1:] @ w).expand(b, tp, 3).contiguous()
    return {"obs.state": state, "obs.wrist": torch.randint(0, 255, (b, to, 3, 16, 16), dtype=torch.uint8, generator=g),
            "action": action, "action_is_pad": torch.zeros(b, tp, dtype=torch.bool)}


@pytest.mark.parametrize("formulation,sampler", [({"name": "ddpm", "prediction": "epsilon"}, "ddim"),
                                                  ({"name": "edm"}, "ddim"), ({"name": "flow"}, "euler")])
def test_predict_action_shape_units_and_determinism(formulation, sampler):
    policy = DiTPolicy(SHAPES, _normalizer(), size="tiny", action_horizon=8, n_action_steps=4,
                       formulation=formulation, sampler=sampler, num_inference_steps=3).eval()
    obs = {k[4:]: v[:2] for k, v in _batch().items() if k.startswith("obs.")}
    a = policy.predict_action(obs, generator=torch.Generator().manual_seed(1))
    b = policy.predict_action(obs, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 8, 3) and torch.equal(a, b)
    # HWC images straight from a simulator are accepted too
    obs_hwc = dict(obs, wrist=obs["wrist"].permute(0, 1, 3, 4, 2))
    assert torch.equal(policy.predict_action(obs_hwc, generator=torch.Generator().manual_seed(1)), a)


def test_tiny_policy_learns_a_toy():
    torch.manual_seed(0)
    policy = DiTPolicy(SHAPES, _normalizer(), size="tiny", action_horizon=8, formulation={"name": "ddpm", "prediction": "epsilon"})
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    batch = _batch(b=32)
    losses = []
    for _ in range(150):
        loss = policy.compute_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_bad_observation_is_named():
    policy = DiTPolicy(SHAPES, _normalizer(), size="tiny", action_horizon=8).eval()
    obs = {k[4:]: v[:1] for k, v in _batch().items() if k.startswith("obs.")}
    with pytest.raises(ValueError, match="'state'"):
        policy.predict_action(dict(obs, state=torch.zeros(1, 2, 7)))
    with pytest.raises(KeyError, match="wrist"):
        policy.predict_action({"state": obs["state"]})
    with pytest.raises(ValueError, match="NaN"):
        policy.predict_action(dict(obs, state=torch.full((1, 2, 5), float("nan"))))


def test_bad_config_is_clear():
    with pytest.raises(ValueError, match="size"):
        DiTPolicy(SHAPES, _normalizer(), size="huge")
    with pytest.raises(ValueError, match="n_action_steps"):
        DiTPolicy(SHAPES, _normalizer(), size="tiny", action_horizon=4, n_action_steps=8)


def test_inference_cache_matches_uncached_and_follows_weight_changes():
    torch.manual_seed(0)
    policy = DiTPolicy(SHAPES, _normalizer(), size="tiny", action_horizon=8, num_inference_steps=4).eval()
    obs = {k[4:]: v[:2] for k, v in _batch().items() if k.startswith("obs.")}

    def uncached():
        orig = policy.denoise
        policy.denoise = lambda x, c, cond, step_index=None: orig(x, c, cond, None)
        try:
            return policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
        finally:
            del policy.denoise

    cached = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(cached, uncached(), atol=1e-6)
    # an optimizer step changes the noise embedding; the trainer's hook must drop the cache
    policy.train()
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    for p in policy.parameters():
        p.grad = torch.randn_like(p)
    policy.eval()
    policy.predict_action(obs)  # fills the cache with the old weights
    opt.step()
    policy.on_weights_changed()  # what the trainer calls after every optimizer step
    assert torch.allclose(policy.predict_action(obs, generator=torch.Generator().manual_seed(3)), uncached(), atol=1e-6)
    # load_state_dict in eval mode drops the cache too
    other = DiTPolicy(SHAPES, _normalizer(), size="tiny", action_horizon=8, num_inference_steps=4)
    policy.load_state_dict(other.state_dict())
    assert torch.allclose(policy.predict_action(obs, generator=torch.Generator().manual_seed(3)), uncached(), atol=1e-6)
    # so does a move to another dtype or device: `.to(cuda)` left the modulations on the CPU
    policy.to(torch.float64)
    assert not policy._noise_cache
    policy.to(torch.float32)
    assert torch.allclose(policy.predict_action(obs, generator=torch.Generator().manual_seed(3)), uncached(), atol=1e-6)


@pytest.mark.parametrize("formulation, scale", [({"name": "karras"}, 250.0), ("edm", 250.0), ({"name": "ddpm"}, 1.0)])
def test_noise_embedding_scale_follows_the_resolved_process(formulation, scale):
    """EDM's log(σ)/4 is spread like DDPM timesteps, also when EDM is named by its alias or by a bare name."""
    policy = DiTPolicy(SHAPES, _normalizer(), size="tiny", formulation=formulation)
    assert policy.noise_embedding.scale == scale
    assert DiTPolicy(SHAPES, _normalizer(), size="tiny", formulation="edm", noise_cond_scale=7.0).noise_embedding.scale == 7.0


@pytest.mark.parametrize("prediction", ["sample", "epsilon"])
def test_the_inference_fast_path_equals_the_reference_path(prediction):
    """predict_action runs the fast path (per-step caches, AdaLNZeroBlock.infer, DDIM as precomputed coefficients);
    it gives the reference path's actions (the blocks' forward, diffusers' scheduler) within 1e-5."""
    from conftest import reference_chunk, trained_looking

    policy = trained_looking(DiTPolicy(SHAPES, _normalizer(), size="tiny", action_horizon=8, num_inference_steps=5,
                                       formulation={"name": "ddpm", "prediction": prediction}), scale=0.05)
    obs = {k[4:]: v[:2] for k, v in _batch().items() if k.startswith("obs.")}
    fast = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
    reference = reference_chunk(policy, obs, seed=3)
    assert fast.std() > 0.05  # not a constant chunk
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5 * max(1.0, reference.abs().max().item()))
