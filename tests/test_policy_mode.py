"""MoDE: noise-only routing, load balancing, the fused expert cache (exactness, invalidation), config errors,
training through the real trainer, paper-size parameter counts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import robodit
from robodit.datasets.normalizer import Normalizer
from robodit.nn.moe import dispatch_mask, load_balancing_loss
from robodit.policies.base import POLICIES
from robodit.policies.mode import MoDEPolicy
from robodit.training.trainer import train

SHAPES = {"obs": {"state": {"shape": [5], "dtype": "float32"}}, "action": {"shape": [3]}, "num_tasks": 1}


def _normalizer():
    st = lambda d: {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d)}  # noqa: E731
    return Normalizer({"state": st(5), "action": st(3)})


def _policy(**kw):
    """A tiny MoDE whose routers and head are far from their near-uniform / zero init, so routing varies with the
    noise level and the output depends on every expert (a fresh head outputs zeros and would hide any bug)."""
    torch.manual_seed(0)
    policy = MoDEPolicy(SHAPES, _normalizer(), **{"size": "tiny", "obs_horizon": 2, "action_horizon": 8,
                                                  "n_action_steps": 4, **kw})
    with torch.no_grad():
        for block in policy.blocks:
            block.moe.router[0].weight.normal_(std=1.0)
            block.moe.router[-1].weight.normal_(std=1.0)
        policy.head.weight.normal_(std=0.05)
    return policy.eval()


def _obs(b=3, seed=0):
    return {"state": torch.randn(b, 2, 5, generator=torch.Generator().manual_seed(seed))}


def _predict(policy, obs, cached=True, seed=3):
    old, policy.expert_cache = policy.expert_cache, cached
    try:
        return policy.predict_action(obs, generator=torch.Generator().manual_seed(seed))
    finally:
        policy.expert_cache = old


def test_registered_and_routing_depends_only_on_the_noise_level():
    assert POLICIES["mode"] is MoDEPolicy
    policy = _policy()
    levels = torch.tensor(policy.formulation.schedule("ddim", 5))
    # same level -> same experts and weights for every sample, whatever the tokens are
    for level in levels:
        for route in policy.route(level.repeat(6)):
            assert (route.experts == route.experts[:1]).all() and torch.allclose(route.weights, route.weights[:1])
    # through the network: two different observation / action batches at one level route identically
    routes = []
    for seed in (1, 2):
        x = torch.randn(4, 8, 3, generator=torch.Generator().manual_seed(seed))
        policy._route_log = []
        with torch.no_grad():
            policy.denoise(x, torch.full((4,), float(levels[1])), policy.encode(_obs(4, seed), None))
        (_, layer_routes), = policy._route_log
        policy._route_log = None
        routes.append(torch.stack([r.experts for r in layer_routes]))  # [L, B, k]
    assert (routes[0] == routes[0][:, :1]).all() and torch.equal(routes[0], routes[1])
    # ...and the levels of the schedule do not all take the same experts (the router is not constant)
    assert len({tuple(r.experts[0].tolist()) for lv in levels for r in policy.route(lv[None])}) > 1
    # every token of a sample goes through that sample's experts (train-time stochastic choice too)
    moe = policy.blocks[0].moe
    h, cond = torch.randn(5, 11, moe.dim), policy.noise_embedding(levels[[0, 0, 2, 3, 4]])
    for stochastic in (False, True):
        with torch.no_grad():
            y, route = moe(h, cond, stochastic=stochastic)
            for b in range(5):
                fused = moe.fuse(route.experts[b].tolist(), route.weights[b])
                assert torch.allclose(y[b], fused(h[b]), atol=1e-5)


def test_load_balancing_loss_is_minimal_for_uniform_usage():
    num_experts = 4
    uniform = torch.full((8, num_experts), 1 / num_experts)
    mask = torch.zeros(8, num_experts)
    mask[torch.arange(8)[:, None], torch.tensor([[0, 1], [2, 3]]).repeat(4, 1)] = 1  # each expert used 4 times
    assert load_balancing_loss(uniform, mask).item() == pytest.approx(1.0)
    # usage that follows the router (what stochastic routing gives in expectation): E * sum p^2 > 1 off-uniform
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.distributions.Dirichlet(torch.ones(num_experts)).sample((1,)).expand(8, -1)
        assert load_balancing_loss(p, p * 2).item() > 1.0 + 1e-4
    # with actual top-2 draws from the router: skewed routers pay more than a uniform one
    def drawn(logits):
        probs = logits.softmax(-1).expand(4096, -1).contiguous()
        experts = torch.multinomial(probs, 2, replacement=False, generator=g)
        return load_balancing_loss(probs, dispatch_mask(type("R", (), {"experts": experts})(), num_experts)).item()
    assert drawn(torch.zeros(num_experts)) == pytest.approx(1.0, abs=0.02)
    assert drawn(torch.tensor([2.0, 1.0, 0.0, -1.0])) > 1.1


def test_compute_loss_reports_router_losses_and_usage():
    policy = _policy(router_z_weight=1e-3).train()
    batch = {"obs.state": torch.randn(16, 2, 5), "action": torch.rand(16, 8, 3) * 2 - 1,
             "action_is_pad": torch.zeros(16, 8, dtype=torch.bool)}
    out = policy.compute_loss(batch)
    for key in ("loss", "diffusion_loss", "load_balance_loss", "router_z_loss", "expert_usage/0",
                "expert_usage_low_noise/3", "expert_usage_high_noise/3"):
        assert out[key].ndim == 0 and torch.isfinite(out[key]), key
    usage = sum(out[f"expert_usage/{i}"] for i in range(4))
    assert usage.item() == pytest.approx(1.0)
    want = out["diffusion_loss"] + 0.01 * out["load_balance_loss"] + 1e-3 * out["router_z_loss"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    out["loss"].backward()
    for block in policy.blocks:  # router and (stacked) experts all get gradient
        assert block.moe.router[0].weight.grad.abs().sum() > 0 and block.moe.w_in.grad.abs().sum() > 0


@pytest.mark.parametrize("formulation, sampler", [(None, "ddim"), (None, "dpmsolver++"), ("edm", "ddim"),
                                                   ("edm", "dpmsolver++"), ("edm", "heun")])
def test_cached_and_uncached_predict_action_agree(formulation, sampler):
    """≤ 1e-5 in fp32 with the same noise, for the default x0 process and the paper's EDM. Heun (two evaluations
    per step, more than `steps` cache entries) is held to 1e-5 of the output scale: its corrector, evaluated at the
    end of the σ=80→4.8 step and applied over that whole step, amplifies the ~2e-7 per-evaluation rounding
    difference of fused vs dispatched experts."""
    policy = _policy(sampler=sampler, num_inference_steps=5, formulation=formulation)
    assert policy.formulation.name == (formulation or "ddpm")
    obs = _obs()
    cached = _predict(policy, obs, cached=True)
    key = policy.formulation.schedule_key(sampler, 5)
    evals = len(policy.formulation.schedule(sampler, 5))
    assert sorted(policy._expert_cache) == [(key, i) for i in range(evals)]  # step index, never a float
    assert len({e for step in policy.inference_routing() for e in step["experts"]}) > 1  # routing varies
    uncached = _predict(policy, obs, cached=False)
    scale = cached.abs().max().item() if sampler == "heun" else 1.0
    assert (cached - uncached).abs().max().item() <= 1e-5 * scale
    assert cached.abs().max() > 1e-2  # the outputs are not trivially equal


def test_expert_cache_bytes_count_shared_first_layers_once():
    """Steps of one layer that pick the same experts share the fused first-layer matrix; the gated second layer
    is per (step, layer). The reported size is what the cache holds, not steps x layers x a full MLP."""
    policy = _policy(num_inference_steps=5)
    routing = policy.inference_routing()  # builds the cache
    width, hidden, k = policy.width, policy.expert_hidden, policy.top_k
    head_dim = policy.blocks[0].attn.head_dim
    sets = {(layer, tuple(sorted(step["experts"][layer]))) for step in routing for layer in range(policy.depth)}
    expected = 4 * (len(routing) * policy.depth * k * hidden * width  # w_out: [k * hidden, width] per step, layer
                    + len(sets) * width * 2 * k * hidden  # w_in: [width, 2 * k * hidden] per distinct set
                    + len(routing) * width  # the cached noise embedding of each step
                    + policy.depth * (3 * width * width + 3 * width + 2 * head_dim))  # stacked Q/K/V, Q and K norms
    assert len(sets) < len(routing) * policy.depth  # the toy has repeated sets, so sharing is exercised
    assert policy.expert_cache_bytes() == expected


def test_expert_cache_is_rebuilt_when_weights_change():
    policy = _policy(num_inference_steps=4)
    obs = _obs()
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)

    def step():
        for p in policy.parameters():
            p.grad = torch.randn_like(p) * 0.02  # a large but realistic update (~1e-2 per weight)
        opt.step()

    # with the version guard off, only the trainer's hook can invalidate the cache
    policy._fingerprint = lambda: ()
    _predict(policy, obs)  # fills the cache with the current weights
    step()
    stale = _predict(policy, obs)
    assert (stale - _predict(policy, obs, cached=False)).abs().max() > 1e-3, "a stale cache must be detectable"
    policy.on_weights_changed()  # what the trainer calls after every optimizer step
    assert (_predict(policy, obs) - _predict(policy, obs, cached=False)).abs().max() <= 1e-5
    # with the guard on, an in-place change nobody announced (e.g. an EMA swap) is caught too
    del policy._fingerprint
    _predict(policy, obs)
    step()
    assert (_predict(policy, obs) - _predict(policy, obs, cached=False)).abs().max() <= 1e-5
    # load_state_dict and train() -> eval() drop it
    other = _policy(num_inference_steps=4, width=64)
    with torch.no_grad():
        for block in other.blocks:
            block.moe.w_out.mul_(-1)
    policy.load_state_dict(other.state_dict())
    assert not policy._expert_cache
    assert (_predict(policy, obs) - _predict(other, obs)).abs().max() <= 1e-5
    policy.train()
    assert not policy._expert_cache
    policy.eval()
    assert (_predict(policy, obs) - _predict(policy, obs, cached=False)).abs().max() <= 1e-5


def test_tiny_mode_learns_a_toy_and_routes_by_noise_level():
    torch.manual_seed(0)
    policy = MoDEPolicy(SHAPES, _normalizer(), size="tiny", obs_horizon=2, action_horizon=8, n_action_steps=4)
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    state = torch.randn(32, 2, 5, generator=g)
    batch = {"obs.state": state, "action": torch.tanh(state[:, -1:] @ torch.randn(5, 3, generator=g)).expand(32, 8, 3),
             "action_is_pad": torch.zeros(32, 8, dtype=torch.bool)}
    losses = []
    for _ in range(150):
        out = policy.compute_loss(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        policy.on_weights_changed()
        losses.append(out["diffusion_loss"].item())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), losses
    assert 0.9 < out["load_balance_loss"].item() < 1.2  # balanced usage over the batch's noise levels
    routing = policy.eval().inference_routing()
    assert len({tuple(step["experts"]) for step in routing}) > 1  # not every noise level takes the same experts


def test_task_token_and_image_observations():
    shapes = {"obs": {"state": {"shape": [5], "dtype": "float32"},
                      "agentview_image": {"shape": [16, 16, 3], "dtype": "uint8"}},
              "action": {"shape": [3]}, "num_tasks": 3}
    policy = MoDEPolicy(shapes, _normalizer(), size="tiny", obs_horizon=2, action_horizon=8, n_action_steps=4).eval()
    obs = dict(_obs(2), agentview_image=torch.randint(0, 255, (2, 2, 16, 16, 3), dtype=torch.uint8))
    assert policy.predict_action(obs, goal={"task_id": torch.tensor([0, 2])}).shape == (2, 8, 3)
    with pytest.raises(ValueError, match="task_id"):
        policy.predict_action(obs)


def _language_policy():
    torch.manual_seed(0)
    shapes = {**SHAPES, "num_tasks": 3}
    policy = MoDEPolicy(shapes, _normalizer(), size="tiny", obs_horizon=2, action_horizon=8, n_action_steps=4,
                        language_encoder="minilm", lang_dim=6)
    with torch.no_grad():
        for block in policy.blocks:
            block.moe.router[0].weight.normal_(std=1.0)
            block.moe.router[-1].weight.normal_(std=1.0)
        policy.head.weight.normal_(std=0.05)
    return policy


def test_language_goal_is_a_condition_token_the_routers_never_see():
    policy = _language_policy().train()
    assert policy.task_embedding is None  # the instruction says which task, not an id
    b = 4
    batch = {"obs.state": torch.randn(b, 2, 5), "action": torch.rand(b, 8, 3) * 2 - 1,
             "action_is_pad": torch.zeros(b, 8, dtype=torch.bool), "task_id": torch.tensor([0, 1, 2, 0]),
             "goal.has_lang": torch.tensor([True, True, True, False])}
    routes, grads, seen = [], [], []
    hooks = [blk.moe.register_forward_hook(lambda m, args, out: seen.append(out[1])) for blk in policy.blocks]
    for seed in (1, 2):  # two different instructions, same everything else (noise levels included)
        lang = torch.randn(b, 6, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
        torch.manual_seed(7)
        seen.clear()
        out = policy.compute_loss({**batch, "goal.lang_emb": lang})
        layer_routes = list(seen)
        routes.append([(r.experts, r.logits) for r in layer_routes])
        logits = sum(r.logits.sum() for r in layer_routes)
        # the router logits do not depend on the language embedding at all (not even a zero gradient path)
        assert not logits.requires_grad or torch.autograd.grad(logits, lang, allow_unused=True)[0] is None
        grads.append(torch.autograd.grad(out["loss"], lang)[0])
    for h in hooks:
        h.remove()
    assert len(routes[0]) == len(policy.blocks)
    for (e1, l1), (e2, l2) in zip(*routes):
        assert torch.equal(e1, e2) and torch.equal(l1, l2)
    # ...while the denoiser does use it: the loss has a gradient wrt the labelled rows' embeddings only
    assert grads[0][:3].abs().sum() > 0 and grads[0][3].abs().sum() == 0
    # at inference the instruction changes the actions, and the expert cache (noise-only routes) still holds
    policy.eval()
    obs = _obs(2)
    lang = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    a = _predict_goal(policy, obs, {"lang_emb": lang}, cached=True)
    assert torch.allclose(a, _predict_goal(policy, obs, {"lang_emb": lang}, cached=False), atol=1e-5)
    assert not torch.allclose(a, _predict_goal(policy, obs, {"lang_emb": lang.flip(0)}, cached=True))
    with pytest.raises(ValueError, match="instruction"):
        policy.predict_action(obs, goal={"task_id": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="6"):
        policy.predict_action(obs, goal={"lang_emb": torch.zeros(2, 5)})


def _predict_goal(policy, obs, goal, cached):
    old, policy.expert_cache = policy.expert_cache, cached
    try:
        return policy.predict_action(obs, goal=goal, generator=torch.Generator().manual_seed(3))
    finally:
        policy.expert_cache = old


def test_bad_config_is_clear():
    with pytest.raises(ValueError, match="top_k"):
        MoDEPolicy(SHAPES, _normalizer(), size="tiny", num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_experts"):
        MoDEPolicy(SHAPES, _normalizer(), size="tiny", num_experts=0)
    with pytest.raises(ValueError, match="top_k"):
        MoDEPolicy(SHAPES, _normalizer(), size="tiny", top_k=0)
    with pytest.raises(ValueError, match="size"):
        MoDEPolicy(SHAPES, _normalizer(), size="huge")
    with pytest.raises(ValueError, match="load_balance_weight"):
        MoDEPolicy(SHAPES, _normalizer(), size="tiny", load_balance_weight=-1)


def test_paper_size_instantiates_on_meta_and_counts_parameters():
    with torch.device("meta"):
        policy = MoDEPolicy(SHAPES, size="paper")
    assert policy.device.type == "meta"
    assert (policy.width, policy.depth, policy.heads) == (1024, 12, 8)
    counts = policy.parameter_counts()
    one_expert = 3 * 1024 * policy.expert_hidden
    assert counts["experts"] == 12 * 4 * one_expert
    assert counts["total"] - counts["active"] == 12 * 2 * one_expert  # 2 of 4 experts idle per layer
    assert counts["active_cached"] == counts["active"] - counts["router"]
    assert 4e8 < counts["total"] < 6e8 and 2e8 < counts["active"] < 3.5e8, counts


def test_tiny_mode_trains_through_the_trainer_and_reloads(toy_store, tmp_path):
    cfg = OmegaConf.create({
        "out_dir": str(tmp_path / "run"),
        "policy": dict(OmegaConf.to_container(OmegaConf.load("configs/policy/mode.yaml")), size="tiny",
                       obs_horizon=2, action_horizon=8, n_action_steps=4),
        "dataset": dict(OmegaConf.to_container(OmegaConf.load("configs/dataset/zarr.yaml")), path=str(toy_store)),
        "logger": {"kind": "none"},
        "train": dict(OmegaConf.to_container(OmegaConf.load("configs/train.yaml").train), steps=4, batch_size=16,
                      checkpoint_every=4, log_every=1, val_every=0, warmup_steps=1, progress=False),
    })
    last = train(cfg)
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*lines)
    assert {"train/load_balance_loss", "train/router_z_loss", "train/expert_usage/0",
            "train/expert_usage_high_noise/3"} <= logged
    policy = robodit.load_policy(tmp_path / "run")
    assert isinstance(policy, MoDEPolicy) and policy.checkpoint_dir == last and policy.expert_cache
    obs = {"state": torch.zeros(2, 2, 5)}
    out = _predict(policy, obs)
    assert out.shape == (2, 8, 3)
    assert (out - _predict(policy, obs, cached=False)).abs().max() <= 1e-5


def test_formulation_by_name_from_the_command_line():
    """`policy.formulation=edm` replaces the config's x0-DDPM block (Hydra would merge a dict into it)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path("configs").resolve()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["policy=mode", "policy.formulation=edm", "policy.size=tiny"])
    policy_cfg = {k: v for k, v in OmegaConf.to_container(cfg.policy).items() if k != "_target_"}
    policy = MoDEPolicy(SHAPES, _normalizer(), **policy_cfg)
    assert policy.formulation.name == "edm" and policy.noise_embedding.scale == 250.0
    assert MoDEPolicy(SHAPES, _normalizer(), size="tiny").formulation.name == "ddpm"  # the measured default
    with pytest.raises(ValueError, match="unknown diffusion formulation 'edn'"):
        MoDEPolicy(SHAPES, _normalizer(), size="tiny", formulation="edn")


def test_in_place_expert_cache_matches_and_copies_nothing():
    """expert_cache='in_place': the fused cache's routes over the experts where they are — same actions
    (≤ 1e-5 fp32), no weight copies; switching modes rebuilds the cache; a bad value is a clear error."""
    policy = _policy(num_inference_steps=5)
    obs = _obs()
    fused = _predict(policy, obs, cached=True)
    assert policy.expert_cache_bytes() > 100 * 1024
    policy.set_expert_cache("in_place")  # also on a loaded policy: drops the fused copies at once
    assert policy.expert_cache_bytes() == 0 and policy.expert_cache and not policy.expert_cache_fused
    in_place = _predict(policy, obs, cached=True)
    assert policy.expert_cache_bytes() == 4 * 5 * policy.width  # only the steps' noise embeddings
    assert (in_place - fused).abs().max().item() <= 1e-5 and fused.abs().max() > 1e-2
    assert (in_place - _predict(policy, obs, cached=False)).abs().max().item() <= 1e-5
    built = MoDEPolicy(SHAPES, _normalizer(), size="tiny", expert_cache="in_place")
    assert built.expert_cache and not built.expert_cache_fused
    with pytest.raises(ValueError, match="expert_cache='views'"):
        MoDEPolicy(SHAPES, _normalizer(), size="tiny", expert_cache="views")
    with pytest.raises(ValueError, match="expert_cache=3"):
        policy.set_expert_cache(3)
    policy.set_expert_cache(False)
    assert not policy.expert_cache


def test_cached_sampling_never_waits_on_the_device():
    """The cache's point on a GPU: routing every step reads which samples each expert got (a host-device sync per
    expert, layer and step); with the routes precomputed, sampling a chunk syncs only for the observation NaN
    check, once the cache is built, in both cache modes."""
    from robodit.profiling import count_host_syncs

    policy = _policy(num_inference_steps=5)
    obs = _obs()
    syncs = {}
    for mode in ("fused", "in_place", "off"):
        policy.set_expert_cache(mode)
        policy.predict_action(obs)  # builds this mode's cache
        syncs[mode] = count_host_syncs(policy.predict_action, obs)
    assert syncs["fused"] == syncs["in_place"] == 1
    assert syncs["off"] >= 5 * policy.depth  # at least one per (step, layer)


def test_the_inference_fast_path_equals_the_reference_path():
    """Cached sampling (fused experts, stacked Q/K/V, DDIM as precomputed coefficients) gives the reference path's
    actions (routing and attention per step, diffusers' scheduler) within 1e-5."""
    from conftest import reference_chunk, trained_looking

    policy = trained_looking(_policy(num_inference_steps=5), scale=0.05)
    obs = _obs()
    fast = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))
    reference = reference_chunk(policy, obs, seed=3)
    assert fast.std() > 0.05 and policy.expert_cache
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
