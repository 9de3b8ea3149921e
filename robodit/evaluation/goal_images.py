"""Goal images for image-goal evaluation: the last frame of a scripted expert's success on a held-out seed.

A goal-image policy is evaluated on a fixed picture of the task done (one per task, as a user would give it),
not on the final frame of the very episode being evaluated, which would leak that episode's layout. The seeds
(`seed`, `seed + 1`, ...) sit far from both collection seeds (0+) and evaluation seeds (100000+).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

GOAL_SEED = 900_000


def expert_goal_image(source: str, env_kwargs: dict, seed: int = GOAL_SEED, attempts: int = 10) -> dict:
    """{image key: HWC uint8} after the first success of `source`'s expert, trying seeds seed..seed+attempts-1."""
    from robodit.envs import make_env

    env = make_env(source, **env_kwargs)
    try:
        if not hasattr(env, "expert_action"):
            raise ValueError(f"{source} has no scripted expert to make a goal image with; give goal_image in the suite")
        for s in range(seed, seed + attempts):
            obs, success, done = env.reset(seed=s), False, False
            while not (success or done):
                obs, success, done, _ = env.step(np.asarray(env.expert_action(), dtype=np.float32))
            if success:
                images = {k: np.asarray(v) for k, v in obs.items() if np.asarray(v).dtype == np.uint8}
                if not images:
                    raise ValueError(f"{source}: the env renders no images (image_size=0?)")
                return images
    finally:
        env.close()
    raise RuntimeError(f"{source}: the scripted expert failed on seeds {seed}..{seed + attempts - 1}")


def fill_goal_images(suite, env_kwargs: dict, out_dir: str | Path, seed: int = GOAL_SEED) -> None:
    """Give every task of `suite` without a goal image one made by its expert, saved as out_dir/<task>.npz/.png."""
    import imageio.v3 as iio

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec in suite.tasks:
        if spec.goal_image is not None:
            continue
        path = out_dir / f"{spec.name}.npz"
        if not _matches(path, env_kwargs):  # missing, or made for other cameras / another image size
            images = expert_goal_image(f"{suite.simulator}/{spec.name}", env_kwargs, seed)
            np.savez(path, **images)
            iio.imwrite(out_dir / f"{spec.name}.png", np.concatenate(list(images.values()), axis=1))
        spec.goal_image = str(path)


def _matches(path: Path, env_kwargs: dict) -> bool:
    """Whether a goal image saved by an earlier evaluation has the cameras and size this one renders."""
    if not path.exists():
        return False
    size, cameras = env_kwargs.get("image_size"), env_kwargs.get("cameras")
    with np.load(path) as saved:
        shapes = {k: saved[k].shape for k in saved.files}
    if cameras is not None and set(shapes) != {f"image_{c}" for c in cameras}:
        return False
    return size is None or all(s[:2] == (size, size) for s in shapes.values())
