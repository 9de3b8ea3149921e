import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

# One thread: 2-thread OpenMP collapses (100x slower) when anything else shares the 2 cores.
torch.set_num_threads(1)


# Camera keys as real stores name them (`convert --map` allows any name): nothing may find a camera by its name
# (RDT once kept only keys starting with "image" and lost a `wrist` camera); cameras are uint8 H x W x C arrays.
CAMERAS = ("wrist", "agentview_image")


def make_toy_store(path, episodes=6, length=(20, 40), state_dim=5, action_dim=3, image_size=0, seed=0,
                   tasks=("toy-task",), robot="toy", fps=10.0, cameras=CAMERAS):
    """A store whose action is a fixed function of the state: learnable by any policy; with `image_size`, one
    random uint8 image per camera of `cameras`."""
    from robodit.datasets.store import DemoStore

    rng = np.random.default_rng(seed)
    keys = {"state": ((state_dim,), "float32"), "action": ((action_dim,), "float32")}
    for cam in cameras if image_size else ():
        keys[cam] = ((image_size, image_size, 3), "uint8")
    w = np.random.default_rng(123).normal(size=(state_dim, action_dim)).astype(np.float32)
    store = DemoStore.create(path, keys, fps=fps, robot=robot, env={"name": "toy/none"})
    with store:
        for e in range(episodes):
            n = int(rng.integers(length[0], length[1] + 1))
            state = rng.normal(size=(n, state_dim)).astype(np.float32)
            arrays = {"state": state, "action": np.tanh(state @ w).astype(np.float32)}
            for cam in cameras if image_size else ():
                arrays[cam] = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
            store.append_episode(arrays, task=tasks[e % len(tasks)])
    return path


@pytest.fixture
def toy_store(tmp_path):
    return make_toy_store(tmp_path / "toy.zarr")


def reference_chunk(policy, obs, seed: int) -> torch.Tensor:
    """A DDPM-process policy's chunk along the reference path the inference fast path must equal: the denoiser
    without its step caches (`denoise(..., step_index=None)`: the modules' own forward, modulations and routes
    computed per step) under diffusers' DDIMScheduler.step, from the noise predict_action draws for `seed`."""
    from diffusers import DDIMScheduler

    form = policy.formulation
    sch = DDIMScheduler(num_train_timesteps=form.num_train_timesteps, trained_betas=form.betas.numpy(),
                        prediction_type=form.prediction, timestep_spacing=form.timestep_spacing,
                        clip_sample=form.clip_sample is not None, clip_sample_range=form.clip_sample or 1.0,
                        set_alpha_to_one=True)
    sch.set_timesteps(policy.num_inference_steps)
    with torch.no_grad():
        obs_t, goal_t = policy.inference_inputs(obs)
        cond = policy.encode(policy.normalize_obs(obs_t), goal_t)
        x = policy.chunk_noise(next(iter(obs_t.values())).shape[0], torch.Generator().manual_seed(seed))
        for t in sch.timesteps:
            raw = policy.denoise(x, torch.full((x.shape[0],), float(t)), cond, None)
            x = sch.step(raw, int(t), x).prev_sample
        return policy.chunk_to_actions(x)


def trained_looking(policy, scale: float = 0.1):
    """Random weights everywhere: the zero-initialised gates and heads of a fresh policy make its output constant,
    which would hide any bug in the path under test."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * scale)
    policy.on_weights_changed()
    return policy.eval()
