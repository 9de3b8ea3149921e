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
