"""`robodit collect SIM/TASK`: roll out a simulator's scripted expert and keep the successful episodes.

Each attempt k uses episode seed `seed + k` (one seed = one task layout), skipping seeds the store has already
used, so re-running on the same store appends new layouts instead of duplicating old ones. A kept episode's
seed is committed with the episode (`meta/episode_seed`; `DemoStore.seeds_used` derives the used seeds from
the committed episodes), so a collection killed at any instant and run again yields the same episodes, seed
for seed, as one that was never interrupted. Failed attempts go to the `env` attr's `seeds_failed` (a kill
before that write only means the seed is tried again, and fails again); the attr also holds everything needed
to rebuild the env for evaluation (and to pick evaluation seeds it has not seen).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from robodit.datasets.language import paraphrases
from robodit.errors import CLIError

# env-attr fields that must agree when appending to an existing store (they decide the stored keys / meaning)
_MUST_MATCH = ("simulator", "image_size", "cameras", "goal_observable")


def _rollout(env, seed: int) -> tuple[dict[str, np.ndarray], bool]:
    """One expert episode; observations are recorded *before* each action, up to and including the first success."""
    obs = env.reset(seed=seed)
    frames: dict[str, list[np.ndarray]] = {k: [] for k in obs}
    actions: list[np.ndarray] = []
    low, high = env.spec.action_low, env.spec.action_high
    while True:
        action = np.clip(np.asarray(env.expert_action(), dtype=np.float32), low, high)
        for k, v in obs.items():
            frames[k].append(v)
        actions.append(action)
        obs, success, done, _ = env.step(action)
        if success or done:
            break
    arrays = {k: np.stack(v) for k, v in frames.items()}
    arrays["action"] = np.stack(actions).astype(np.float32)
    return arrays, bool(success)


def _labelled_episodes(episodes: int, fraction: float, seed: int) -> np.ndarray:
    """Which of the `episodes` kept episodes carry language: exactly round(fraction * n) (>= 1 if fraction > 0)."""
    n = 0 if fraction <= 0 else max(1, int(round(fraction * episodes)))
    mask = np.zeros(episodes, dtype=bool)
    mask[np.random.default_rng(seed).permutation(episodes)[:n]] = True
    return mask


def _merge_env_attr(existing: dict | None, new: dict, task: str, path: str) -> dict:
    if not existing:
        return {**new, "seeds_failed": []}
    for field in _MUST_MATCH:
        if field in existing and existing[field] != new[field]:
            raise ValueError(
                f"{path} was collected with {field}={existing[field]!r}, not {new[field]!r}; use another --out"
            )
    merged = dict(existing)  # an older store's `seeds_used` stays as written (DemoStore.seeds_used reads it)
    merged.setdefault("seeds_failed", [])
    tasks = list(merged.get("tasks", []))
    if task not in tasks:
        tasks.append(task)  # a multi-task store: `name` keeps the first task; reset(task=...) switches
    merged["tasks"] = tasks
    return merged


def collect(
    source: str,
    episodes: int,
    out: str | Path,
    image_size: int = 0,
    cameras: tuple[str, ...] | list[str] | str | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    max_attempts: int | None = None,
    progress: bool = True,
    has_actions: bool = True,
    language_fraction: float = 1.0,
    paraphrase: bool = False,
    language_seed: int | None = None,
) -> dict[str, Any]:
    """Store `episodes` successful expert demos of `source` ("SIM/TASK") in the DemoStore at `out`.

    Stored per step: "state", "action" (clipped, as sent) and "image_<cam>" per camera when image_size > 0, each
    observation taken before its action. Raises ValueError (unknown simulator/task, incompatible store) before
    anything is written, RuntimeError after `max_attempts` rollouts (default 3 * episodes + 10) with the
    successful episodes kept. Returns a summary dict.

    has_actions=False stores video-only episodes (actions dropped, `has_actions=False` per episode): the expert
    still drives the rollout, but the store keeps only what action-free video would have (co-training, PAD).

    language_fraction: the share of the kept episodes stored with an instruction (exactly
    round(fraction * episodes), at least one when > 0, picked by `language_seed`, default `seed`); the others are goal-image only
    (MDT's sparse labels). paraphrase=True cycles the labelled episodes through the instruction's training
    paraphrases (robodit.datasets.language) instead of repeating one sentence.
    """
    from tqdm import tqdm

    from robodit.datasets.store import DemoStore
    from robodit.envs import make_env, parse_env_name

    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if isinstance(cameras, str):
        cameras = [c.strip() for c in cameras.split(",") if c.strip()]
    if image_size > 0 and cameras is not None and not cameras:
        raise ValueError("--image-size needs at least one camera")
    sim, task = parse_env_name(source)
    if not 0.0 <= language_fraction <= 1.0:
        raise ValueError(f"--language-fraction must be in [0, 1], got {language_fraction}")
    labelled = _labelled_episodes(episodes, language_fraction, seed if language_seed is None else language_seed)
    max_attempts = 3 * episodes + 10 if max_attempts is None else int(max_attempts)

    env_kwargs = dict(image_size=image_size, seed=seed, max_episode_steps=max_steps)
    if cameras is not None:  # else the simulator's default cameras (Meta-World corner2, LIBERO image + image2)
        env_kwargs["cameras"] = tuple(cameras)
    if sim == "libero":  # layouts from the placement sampler: a demo never starts from an evaluation state
        env_kwargs["init_states"] = False
    env = make_env(source, **env_kwargs)
    try:
        if not hasattr(env, "expert_action"):
            raise ValueError(f"{source} has no scripted expert to collect demos with")
        spec = env.spec
        keys = {k: (tuple(a.shape), a.dtype) for k, a in spec.observation.items()}
        keys["action"] = ((spec.action_dim,), "float32")
        env_cfg = env.config()
        instruction = env.instruction() if hasattr(env, "instruction") else None
        texts = (paraphrases(instruction) if paraphrase else [instruction]) if instruction else [None]

        # env=None: an existing store keeps its env attr (with its seeds); we merge into it and write it back
        with DemoStore.open_or_create(out, keys, fps=spec.control_hz, robot=spec.robot) as store:
            env_attr = _merge_env_attr(store.env, env_cfg, task, str(out))
            store.set_attr("env", env_attr)
            seen = set(store.seeds_used) | set(env_attr["seeds_failed"])
            kept_seeds, failed_seeds, lengths = [], [], []
            s, attempts = int(seed), 0
            bar = tqdm(total=episodes, desc=f"collect {source}", unit="ep", disable=not progress)
            try:
                while len(kept_seeds) < episodes and attempts < max_attempts:
                    while s in seen:
                        s += 1
                    seen.add(s)
                    attempts += 1
                    arrays, success = _rollout(env, s)
                    if success:
                        length = len(arrays["action"])
                        if not has_actions:  # video only: the store keeps zeros and has_actions=False
                            arrays.pop("action")
                        # an instruction given -> the episode is stored with has_language=True
                        k = len(kept_seeds)
                        text = texts[sum(labelled[:k]) % len(texts)] if labelled[k] else None
                        # the seed is a row of the episode's own commit: both land, or neither
                        store.append_episode(arrays, task=task, instruction=text, has_actions=has_actions, seed=s)
                        kept_seeds.append(s)
                        lengths.append(length)
                        bar.update(1)
                    else:
                        env_attr["seeds_failed"] = [*env_attr["seeds_failed"], s]
                        store.set_attr("env", env_attr)
                        failed_seeds.append(s)
                    s += 1
            finally:
                bar.close()
            total = len(store)
    finally:
        env.close()

    summary = {
        "source": source,
        "out": str(out),
        "kept": len(kept_seeds),
        "failed": len(failed_seeds),
        "attempts": attempts,
        "seeds": kept_seeds,
        "failed_seeds": failed_seeds,
        "episode_lengths": lengths,
        "total_episodes": total,
        "has_actions": bool(has_actions),
    }
    if progress or failed_seeds:
        print(
            f"collect {source}: kept {len(kept_seeds)}/{episodes} episodes "
            f"({len(failed_seeds)} failed of {attempts} attempts) -> {out} ({total} episodes in store)",
            file=sys.stderr,
        )
    if len(kept_seeds) < episodes:
        raise RuntimeError(
            f"collect {source}: only {len(kept_seeds)} of {episodes} episodes succeeded after {attempts} attempts "
            f"(max_attempts={max_attempts}); the {len(kept_seeds)} successful ones are stored in {out}"
        )
    return summary


def benchmark_tasks(source: str) -> list[str] | None:
    """The tasks of a multi-task source such as "metaworld/MT10" or "libero/libero_object", or None for a
    single task."""
    sim, _, name = source.partition("/")
    if sim == "metaworld":
        from robodit.envs.metaworld import BENCHMARKS

        if name in BENCHMARKS:
            return list(BENCHMARKS[name])
    if sim == "libero" and "/" not in name:
        from robodit.envs.libero_tasks import suite_tasks

        return suite_tasks(name)  # an unknown suite: ValueError naming close matches
    return None


def collect_multitask(source: str, tasks: list[str], episodes_per_task: int, out: str | Path, *,
                      language_fraction: float = 1.0, language_encoder: str | None = "minilm",
                      paraphrase: bool = True, seed: int = 0, **kwargs) -> dict[str, Any]:
    """`collect` each task into one store (task `i` draws its labelled episodes with seed + i), then cache the
    instructions' embeddings (`meta/lang_emb`) unless language_encoder is None."""
    from robodit.datasets.language import embed_store

    sim = source.split("/", 1)[0]
    summaries = [collect(f"{sim}/{task}", episodes_per_task, out, seed=seed, language_fraction=language_fraction,
                         paraphrase=paraphrase, language_seed=seed + i, **kwargs) for i, task in enumerate(tasks)]
    embedded = embed_store(out, language_encoder) if language_encoder and language_fraction > 0 else None
    return {"source": source, "out": str(out), "tasks": summaries, "language": embedded}


def collect_command(args) -> None:
    """CLI entry (`robodit collect`): failures become one-line errors with exit status 2."""
    common = dict(out=args.out, image_size=args.image_size, cameras=args.cameras, seed=args.seed,
                  max_steps=args.max_steps, max_attempts=args.max_attempts, progress=True,
                  has_actions=not getattr(args, "no_actions", False))
    fraction = args.language_fraction
    try:
        tasks = benchmark_tasks(args.source)
        if tasks is not None:
            if not args.episodes_per_task:
                raise CLIError(f"{args.source} is a multi-task benchmark: give --episodes-per-task N")
            collect_multitask(args.source, tasks, args.episodes_per_task, language_encoder=args.language_encoder,
                              language_fraction=1.0 if fraction is None else fraction, **common)
            return
        if not args.episodes:
            raise CLIError("give --episodes N (--episodes-per-task is for multi-task sources such as "
                           "metaworld/MT10)")
        collect(args.source, episodes=args.episodes, language_fraction=1.0 if fraction is None else fraction,
                paraphrase=fraction is not None, **common)
        if (fraction is None or fraction > 0) and args.language_encoder:  # as multi-task collection does
            from robodit.datasets.language import embed_store

            embed_store(args.out, args.language_encoder)
    except RuntimeError as exc:
        raise CLIError(str(exc)) from exc
