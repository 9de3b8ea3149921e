"""PAD: the attention mask, action-free co-training, predicted frames, and a mixed store through the trainer."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import robodit
from robodit.datasets.normalizer import Normalizer
from robodit.datasets.sampler import WindowConfig, WindowDataset
from robodit.datasets.store import DemoStore
from robodit.policies.pad import PADPolicy
from robodit.training.trainer import train

SHAPES = {"obs": {"state": {"shape": [5], "dtype": "float32"}, "wrist": {"shape": [16, 16, 3], "dtype": "uint8"}},
          "action": {"shape": [3]}, "num_tasks": 2}


def _policy(**kw):
    st = lambda d: {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d)}
    args = {"size": "tiny", "action_horizon": 4, "n_action_steps": 2, "future_frames": 2, "image_size": 16,
            "patch_size": 4, "num_inference_steps": 3}
    return PADPolicy(SHAPES, Normalizer({"state": st(5), "action": st(3)}), **{**args, **kw})


def _batch(b=6, action_free=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    img = lambda *s: torch.randint(0, 256, (b, *s, 3, 16, 16), dtype=torch.uint8, generator=g)
    batch = {"obs.state": torch.randn(b, 1, 5, generator=g), "obs.wrist": img(1), "future.wrist": img(2),
             "action": torch.rand(b, 4, 3, generator=g) * 2 - 1, "action_is_pad": torch.zeros(b, 4, dtype=torch.bool),
             "task_id": torch.arange(b) % 2}
    for i in action_free:  # what the sampler yields for a has_actions=False episode
        batch["action"][i] = 0.0
        batch["action_is_pad"][i] = True
    return batch


def _randomise(policy):
    """AdaLN-Zero starts as the identity with zero outputs: give every weight a value so the test means something."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0.0, 0.2)
    return policy


def test_image_tokens_do_not_attend_to_action_tokens():
    policy = _randomise(_policy()).eval()
    batch = _batch(b=2)
    obs = policy.normalize_obs(policy.split_batch(batch, "obs"))
    cond = policy.encode(obs, {"task_id": batch["task_id"]})
    x = torch.randn(2, policy.flat_dim)
    n_img = policy.num_image_tokens * policy.frame_dim
    x_act = x.clone()
    x_act[:, n_img:] += 3.0 * torch.randn(2, x.shape[1] - n_img)  # perturb only the action tokens
    x_img = x.clone()
    x_img[:, :n_img] += 3.0 * torch.randn(2, n_img)  # perturb only the future-frame tokens
    level = torch.full((2,), 500.0)
    out, out_act, out_img = (policy.denoise(v, level, cond) for v in (x, x_act, x_img))
    assert torch.allclose(out[:, :n_img], out_act[:, :n_img], atol=1e-5)  # images blind to actions
    assert not torch.allclose(out[:, n_img:], out_act[:, n_img:], atol=1e-3)
    assert not torch.allclose(out[:, n_img:], out_img[:, n_img:], atol=1e-3)  # actions see the images
    policy.attn_mask.fill_(True)  # without the mask the same perturbation does reach the image outputs
    assert not torch.allclose(policy.denoise(x, level, cond)[:, :n_img], policy.denoise(x_act, level, cond)[:, :n_img],
                              atol=1e-3)


def test_action_loss_is_zero_weighted_for_action_free_samples():
    policy = _randomise(_policy())

    def loss(batch):
        torch.manual_seed(1)
        return policy.compute_loss(batch)

    mixed = _batch(action_free=(1, 4))
    base = loss(mixed)
    assert base["action_fraction"].item() == pytest.approx(4 / 6)
    junk = {k: v.clone() for k, v in mixed.items()}
    junk["action"][[1, 4]] = 5.0  # whatever an action-free row holds, it must not count
    other = loss(junk)
    assert torch.equal(base["loss"], other["loss"]) and torch.equal(base["action_loss"], other["action_loss"])

    free = _batch(action_free=range(6))
    out = loss(free)
    assert out["action_loss"].item() == 0.0 and torch.equal(out["loss"], out["image_loss"])
    out["loss"].backward()  # the image loss trains; nothing flows into the action input (the mask blocks it)
    assert policy.future_in.weight.grad.abs().sum() > 0
    assert policy.action_in.weight.grad.abs().sum() == 0


def test_action_loss_switches_on_after_the_start_step():
    policy = _randomise(_policy(action_loss_start_step=2)).train()
    parts = [policy.compute_loss(_batch()) for _ in range(3)]
    assert [torch.equal(p["loss"], p["image_loss"]) for p in parts] == [True, True, False]
    assert int(policy.train_steps) == 3 and "train_steps" in policy.state_dict()


def test_tiny_pad_learns_a_toy():
    """Actions = f(state), a static scene (future = current frame): both losses must fall within 150 steps."""
    torch.manual_seed(0)
    policy = _policy()
    batch = _batch(b=16)
    batch["action"] = torch.tanh(batch["obs.state"][:, -1:] @ torch.randn(5, 3)).expand(16, 4, 3).contiguous()
    batch["future.wrist"] = batch["obs.wrist"].expand(16, 2, 3, 16, 16).contiguous()
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    hist = []
    for _ in range(150):
        out = policy.compute_loss(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        hist.append([out["image_loss"].item(), out["action_loss"].item()])
    first, last = np.mean(hist[:10], 0), np.mean(hist[-10:], 0)
    assert last[0] < 0.7 * first[0] and last[1] < 0.3 * first[1], (first, last)


def test_predicted_frames_shape_range_and_determinism():
    policy = _randomise(_policy(image_size=8, patch_size=4)).eval()  # store frames are 16 px: resized to 8
    obs = {"state": torch.randn(3, 1, 5), "wrist": torch.randint(0, 256, (3, 1, 16, 16, 3), dtype=torch.uint8)}
    actions, frames = policy.predict(obs, {"task_id": 1}, generator=torch.Generator().manual_seed(0))
    assert actions.shape == (3, 4, 3) and set(frames) == {"wrist"}
    f = frames["wrist"]
    assert f.shape == (3, 2, 3, 8, 8) and f.min() >= 0 and f.max() <= 1 and f.std() > 0
    again = policy.predict_frames(obs, {"task_id": 1}, generator=torch.Generator().manual_seed(0))["wrist"]
    assert torch.equal(f, again)
    assert torch.equal(policy.predict_action(obs, {"task_id": 1}, generator=torch.Generator().manual_seed(0)), actions)
    with pytest.raises(ValueError, match="task_id"):
        policy.predict_action(obs)


def _mixed_store(path, size=16):
    """Two tasks with actions + one task as action-free video, frames that encode their own index."""
    rng = np.random.default_rng(0)
    keys = {"state": ((5,), "float32"), "action": ((3,), "float32"), "wrist": ((size, size, 3), "uint8")}
    with DemoStore.create(path, keys, fps=10.0, robot="toy", env={"name": "toy/none"}) as store:
        for e, (task, acts) in enumerate([("a", True), ("b", True), ("v", False), ("a", True), ("v", False)]):
            n = 12 + e
            img = np.broadcast_to((np.arange(n) * 10 + e)[:, None, None, None], (n, size, size, 3)).astype(np.uint8)
            arrays = {"state": rng.normal(size=(n, 5)).astype(np.float32), "wrist": img}
            if acts:
                arrays["action"] = rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)
            store.append_episode(arrays, task=task, has_actions=acts)
    return path


def test_sampler_future_frames(tmp_path):
    store = _mixed_store(tmp_path / "mixed.zarr")
    plain = WindowDataset(store, WindowConfig(obs_horizon=1, action_horizon=4), train=False)
    assert not any(k.startswith("future.") for k in plain[0])  # backwards compatible: off by default
    ds = WindowDataset(store, WindowConfig(obs_horizon=1, action_horizon=4, future_frames=2, future_stride=3),
                       train=False)
    s = ds[10]  # episode 0 (12 frames), t = 10: futures t+3, t+6 clip to the last frame (11)
    assert s["future.wrist"].shape == (2, 3, 16, 16) and s["future.wrist"].dtype == torch.uint8
    assert s["future.wrist"][:, 0, 0, 0].tolist() == [110, 110] and s["obs.wrist"][0, 0, 0, 0] == 100
    assert ds[2]["future.wrist"][:, 0, 0, 0].tolist() == [50, 80]
    video = ds[12 + 13 + 1]  # episode 2: action-free
    assert video["action_is_pad"].all() and video["future.wrist"][:, 0, 0, 0].tolist() == [42, 72]


def _train_cfg(store, out, steps=3, action_loss_start_step=1, action_fraction=None, **train_kw):
    base = OmegaConf.load("configs/train.yaml")
    policy_cfg = dict(OmegaConf.to_container(OmegaConf.load("configs/policy/pad.yaml")), size="tiny",
                      action_horizon=4, n_action_steps=2, future_frames=2, future_stride=3, image_size=16,
                      patch_size=4, num_inference_steps=2, action_loss_start_step=action_loss_start_step)
    return OmegaConf.create({
        "out_dir": str(out), "policy": policy_cfg,
        "dataset": dict(OmegaConf.to_container(OmegaConf.load("configs/dataset/zarr.yaml")), path=str(store),
                        action_fraction=action_fraction),
        "logger": {"kind": "none"},
        "train": dict(OmegaConf.to_container(base.train), steps=steps, batch_size=8, checkpoint_every=steps,
                      log_every=1, val_every=0, warmup_steps=1, progress=False, device="cpu", **train_kw),
    })


@pytest.mark.parametrize("action_fraction", [None, 0.5])
def test_mixed_store_trains_through_the_trainer_and_reloads(tmp_path, action_fraction):
    store = _mixed_store(tmp_path / "mixed.zarr")
    last = train(_train_cfg(store, tmp_path / "run", action_fraction=action_fraction))
    assert last is not None and last.name == "step_00000003"
    if action_fraction:  # every logged batch had exactly half its windows with actions
        import json

        rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        logged = [r["train/action_fraction"] for r in rows if "train/action_fraction" in r]
        assert logged and all(f == 0.5 for f in logged)
    policy = robodit.load_policy(tmp_path / "run")
    assert isinstance(policy, PADPolicy) and policy.num_tasks == 3 and int(policy.train_steps) == 3
    obs = {"state": np.zeros((1, 5), np.float32), "wrist": np.zeros((1, 16, 16, 3), np.uint8)}
    actions = policy.predict_action(obs, {"task_id": 0})
    frames = policy.predict_frames(obs, {"task_id": 2})["wrist"]
    assert actions.shape == (1, 4, 3) and torch.isfinite(actions).all()
    assert frames.shape == (1, 2, 3, 16, 16) and 0 <= frames.min() and frames.max() <= 1


def test_collect_video_only_episodes_next_to_demos(tmp_path, capsys):
    """`robodit collect --no-actions` appends action-free video to a store of demos (other tasks' scripted runs)."""
    pytest.importorskip("metaworld")
    from robodit.cli import main

    out = tmp_path / "mixed.zarr"
    assert main(["collect", "metaworld/reach-v3", "--episodes", "1", "--out", str(out)]) == 0
    assert main(["collect", "metaworld/reach-v3", "--episodes", "1", "--out", str(out), "--no-actions"]) == 0
    capsys.readouterr()
    with DemoStore.open(out) as store:
        assert store.episode_has_actions.tolist() == [True, False]
        assert store.episode(0)["action"].any() and not store.episode(1)["action"].any()
    ds = WindowDataset(out, WindowConfig(obs_horizon=1, action_horizon=4), train=False)
    assert ds[len(ds) - 1]["action_is_pad"].all() and not ds[0]["action_is_pad"].any()


def test_eval_writes_a_grid_of_predicted_vs_real_frames(tmp_path, capsys):
    """collect (images) → train pad 2 steps → evaluate: results.json names frames.png, a real PNG."""
    pytest.importorskip("metaworld")
    from robodit.cli import main
    from robodit.evaluation.evaluate import evaluate
    from robodit.evaluation.frames import frame_rollout

    store = tmp_path / "reach.zarr"
    assert main(["collect", "metaworld/reach-v3", "--episodes", "1", "--out", str(store), "--image-size", "16"]) == 0
    capsys.readouterr()
    base = OmegaConf.load("configs/train.yaml")
    policy_cfg = dict(OmegaConf.to_container(OmegaConf.load("configs/policy/pad.yaml")), size="tiny",
                      action_horizon=4, n_action_steps=2, future_frames=2, future_stride=2, image_size=16,
                      patch_size=4, num_inference_steps=2)
    cfg = OmegaConf.create({
        "out_dir": str(tmp_path / "run"), "policy": policy_cfg,
        "dataset": dict(OmegaConf.to_container(OmegaConf.load("configs/dataset/zarr.yaml")), path=str(store)),
        "logger": {"kind": "none"},
        "train": dict(OmegaConf.to_container(base.train), steps=2, batch_size=4, checkpoint_every=2, log_every=1,
                      val_every=0, warmup_steps=1, progress=False, device="cpu"),
    })
    train(cfg)
    summary = evaluate(tmp_path / "run", episodes=1, out_dir=tmp_path / "eval", max_steps=6, videos=0,
                       num_envs=1, workers=0, pipeline_groups=1, progress=False, frame_grid=2)
    grid = tmp_path / "eval" / "frames.png"
    assert summary["frame_grid"] == str(grid) and grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from robodit.envs import make_env

    policy = robodit.load_policy(tmp_path / "run")
    env = make_env("metaworld/reach-v3", image_size=16, cameras=("corner2",))
    rows = frame_rollout(policy, env, seed=100_000, replans=2)
    env.close()
    assert [r["step"] for r in rows] == [0, 4]  # each replan executes k * stride = 4 actions open-loop
    assert all(f.shape == (16, 16, 3) for r in rows for f in r["predicted"] + r["real"] + [r["current"]])


@pytest.mark.parametrize("tasks", [[1, 0, 1], [1, 1, 1]])
def test_inference_cache_matches_uncached_and_is_dropped_when_weights_change(tasks):
    """Mixed tasks in one batch: each sample gathers its own row; one task: the batch shares each step's modulation
    and runs the fast path (AdaLNZeroBlock.infer)."""
    policy = _randomise(_policy(num_inference_steps=4)).eval()
    obs = {"state": torch.randn(3, 1, 5), "wrist": torch.randint(0, 256, (3, 1, 16, 16, 3), dtype=torch.uint8)}
    goal = {"task_id": torch.tensor(tasks)}

    def run(cached=True):
        orig = policy.denoise
        if not cached:
            policy.denoise = lambda x, c, cond, step_index=None: orig(x, c, cond, None)
        try:
            return policy.predict(obs, goal, generator=torch.Generator().manual_seed(3))
        finally:
            policy.__dict__.pop("denoise", None)

    (a_c, f_c), (a_u, f_u) = run(), run(cached=False)
    assert policy._mod_cache  # the cached path really ran
    assert ("steps" in next(iter(policy._mod_cache.values()))) == (len(set(tasks)) == 1)
    if len(set(tasks)) == 1:
        return  # what follows (the cache follows the weights) holds for any task mix
    assert torch.allclose(a_c, a_u, atol=1e-5) and torch.allclose(f_c["wrist"], f_u["wrist"], atol=1e-5)
    # a weight change (what the trainer's optimizer step does) must not leave stale modulations behind
    with torch.no_grad():
        for block in policy.blocks:
            block.ada[-1].weight.mul_(-1.5)
        policy.task_embedding.weight.add_(0.3)
    stale = run()[0]
    assert not torch.allclose(stale, run(cached=False)[0], atol=1e-3)  # the stale cache does give wrong answers
    policy.on_weights_changed()
    assert torch.allclose(run()[0], run(cached=False)[0], atol=1e-5)
    run()
    policy.train().eval()  # a round through training mode drops it too
    assert not policy._mod_cache
    run()
    policy.load_state_dict(_policy(num_inference_steps=4).state_dict())  # and a reload
    assert not policy._mod_cache and torch.allclose(run()[0], run(cached=False)[0], atol=1e-5)
    run()
    policy.to(torch.float64)  # and a move to another dtype or device (the cache held the old one's tensors)
    assert not policy._mod_cache
    policy.to(torch.float32)
    assert torch.allclose(run()[0], run(cached=False)[0], atol=1e-5)


def test_instruction_conditioning_replaces_the_task_id_where_present():
    """With a language encoder PAD conditions on goal.lang_emb (sampler key) and falls back to the task id."""
    policy = _randomise(_policy(language_encoder="minilm", lang_dim=8)).train()
    batch = _batch(b=4)
    batch["goal.lang_emb"] = torch.randn(4, 8)
    batch["goal.has_lang"] = torch.tensor([True, False, True, False])
    out = policy.compute_loss(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and policy.lang_proj[0].weight.grad.abs().sum() > 0
    policy.eval()
    obs = {"state": batch["obs.state"][:1], "wrist": batch["obs.wrist"][:1]}
    e1, e2 = torch.randn(1, 8), torch.randn(1, 8)
    gen = lambda: torch.Generator().manual_seed(0)
    a1 = policy.predict_action(obs, goal={"lang_emb": e1}, generator=gen())  # no task id needed with language
    assert a1.shape == (1, 4, 3)
    obs_n = policy.normalize_obs(policy.prepare_obs(obs))
    c1, c2 = (policy.encode(obs_n, {"lang_emb": e}) for e in (e1, e2))
    c_task = policy.encode(obs_n, {"task_id": torch.tensor([1])})
    assert not torch.allclose(c1["task"], c2["task"]) and not torch.allclose(c1["task"], c_task["task"])
    x, level = torch.randn(1, policy.flat_dim), torch.full((1,), 500.0)
    assert not torch.allclose(policy.denoise(x, level, c1), policy.denoise(x, level, c2))
    with pytest.raises(ValueError, match="task_id"):
        policy.predict_action(obs, goal=None)


def test_a_task_by_name_reaches_pad():
    """`robodit run --goal-task` and `robodit serve` pass goal={"task": NAME}; PAD handed the name to
    torch.as_tensor (TypeError), so a multi-task PAD checkpoint could only be driven by the evaluator's ids."""
    policy = _randomise(_policy()).eval()
    policy.task_names = ["drawer-close-v3", "drawer-open-v3"]  # as load_policy records the store's table
    obs = {"state": np.zeros((1, 5), np.float32), "wrist": np.zeros((1, 16, 16, 3), np.uint8)}
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    by_name = policy.predict_action(obs, goal={"task": "drawer-open-v3"}, generator=gen())
    assert torch.equal(by_name, policy.predict_action(obs, goal={"task_id": 1}, generator=gen()))
    assert not torch.equal(by_name, policy.predict_action(obs, goal={"task": "drawer-close-v3"}, generator=gen()))
    with pytest.raises(ValueError, match=r"goal task \['door-open-v3'\] is not one this policy was trained on"):
        policy.predict_action(obs, goal={"task": "door-open-v3"})


def test_fine_tuning_counts_its_own_steps_before_the_action_loss(tmp_path):
    """train.init_from takes the weights, not the source run's step counter: with action_loss_start_step=2 the
    fine-tune's first two steps train on the image loss alone (the copied counter of 3 skipped them)."""
    import json

    store = _mixed_store(tmp_path / "mixed.zarr")
    src = train(_train_cfg(store, tmp_path / "src", steps=3))
    assert int(robodit.load_policy(src).train_steps) == 3
    ft = train(_train_cfg(store, tmp_path / "ft", steps=3, action_loss_start_step=2, init_from=str(src)))
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    assert [r["train/loss"] == r["train/image_loss"] for r in rows] == [True, True, False]
    assert int(robodit.load_policy(ft).train_steps) == 3
