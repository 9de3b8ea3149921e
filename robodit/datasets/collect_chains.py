"""`robodit collect metaworld/chains`: CALVIN-style play data, the scripted experts chaining subtasks in one scene.

A chain is driven by the same `ChainEpisode` that evaluation drives (robodit/envs/metaworld_chains.py): the same
scene carrying, the same per-subtask step limit, the same success checks; only the expert supplies the actions.
Each successful subtask becomes one episode (its task, its instruction, `chain` = the chain's env seed and
`chain_pos` = its place), starting from the state the previous subtask left. A subtask that fails ends the
chain: that segment is dropped and the ones before it are kept.

A chain's segments go into the store under one commit (`DemoStore.append_episodes`), so a killed collection
leaves whole chains; `--chains N` is the number of chains the store ends with, so running the same command
again resumes where the kill left it. A chain's env seed is committed with its segments (`meta/episode_seed`, and
`meta/episode_chain` = that seed), a chain that fails its first subtask goes to the `env` attr's `seeds_failed`;
neither is tried again, and a chain killed before its commit is simply collected again from the same seed. Seeds
stay below the chain suite's first evaluation seed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from robodit.datasets.collect import _merge_env_attr
from robodit.datasets.language import paraphrases
from robodit.errors import CLIError

SOURCE = "metaworld/chains"


def chain_count(store) -> int:
    """Chains held by a store: distinct chain ids of its episodes."""
    chain = np.asarray(store.episode_chain)
    return len(np.unique(chain[chain >= 0]))


def _rollout_chain(episode, low: np.ndarray, high: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Drive `episode` (a ChainEpisode) with each subtask's expert; the successful segments' arrays, each with
    its observations taken before its actions (the first one is the state the previous subtask left)."""
    segments: list[dict[str, np.ndarray]] = []
    obs = episode.start()
    frames: dict[str, list[np.ndarray]] = {k: [] for k in obs}
    actions: list[np.ndarray] = []
    while True:
        action = np.clip(np.asarray(episode.expert_action(), dtype=np.float32), low, high)
        for k, v in obs.items():
            frames[k].append(v)
        actions.append(action)
        obs, event = episode.apply(action)
        if event is None:
            continue
        if episode.successes[-1]:
            segments.append({**{k: np.stack(v) for k, v in frames.items()},
                             "action": np.stack(actions).astype(np.float32)})
        if event == "done":
            return segments
        frames, actions = {k: [] for k in obs}, []


def collect_chains(scenes: dict[str, list[str]], chains: int, chain_length: int, out: str | Path, *,
                   eval_seed: int, instructions: dict[str, str] | None = None, image_size: int = 0,
                   cameras: tuple[str, ...] | list[str] | str = ("corner2",), seed: int = 0,
                   max_steps: int | None = 300, language_fraction: float = 1.0, paraphrase: bool = True,
                   language_seed: int | None = None, max_attempts: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Fill the store at `out` up to `chains` expert chains of `chain_length` subtasks over `scenes`
    ({scene: task cycle}, as the chain suite defines them).

    Chain k (k = chains already stored) plays scene k mod #scenes, from env seed s (the next seed >= `seed` not
    yet used or failed); its subtasks walk the scene's cycle from a start drawn with s. `eval_seed`: the chain
    suite's first evaluation seed; collection refuses to reach it. `language_fraction`: each segment keeps its
    instruction with this probability (drawn with `language_seed`, default `seed`, the chain seed and the
    position), as a training paraphrase when `paraphrase`; the others are goal-image only.
    """
    from tqdm import tqdm

    from robodit.datasets.store import DemoStore
    from robodit.envs import make_env
    from robodit.envs.metaworld_chains import ChainEpisode, chain_tasks

    if chains < 1 or chain_length < 1:
        raise ValueError(f"--chains and --chain-length must be >= 1, got {chains} and {chain_length}")
    if not scenes or any(not cycle for cycle in scenes.values()):
        raise ValueError(f"--scenes: need at least one scene with tasks, got {scenes}")
    if not 0.0 <= language_fraction <= 1.0:
        raise ValueError(f"--language-fraction must be in [0, 1], got {language_fraction}")
    if not 0 <= seed < eval_seed:
        raise ValueError(f"--seed {seed}: chain collection seeds must be in [0, {eval_seed}), below the chain "
                         f"suite's evaluation seeds (from {eval_seed})")
    if cameras is None:  # the CLI's "not given": Meta-World's default camera
        cameras = ("corner2",)
    if isinstance(cameras, str):
        cameras = [c.strip() for c in cameras.split(",") if c.strip()]
    if image_size > 0 and not cameras:
        raise ValueError("--image-size needs at least one camera")
    instructions = dict(instructions or {})
    language_seed = seed if language_seed is None else int(language_seed)
    tasks = [t for cycle in scenes.values() for t in cycle]
    envs: dict[str, Any] = {}

    def make(task: str):
        if task not in envs:
            envs[task] = make_env(f"metaworld/{task}", image_size=image_size, cameras=tuple(cameras), seed=seed,
                                  max_episode_steps=max_steps)
        return envs[task]

    try:
        first = make(tasks[0])
        spec = first.spec
        keys = {k: (tuple(a.shape), a.dtype) for k, a in spec.observation.items()}
        keys["action"] = ((spec.action_dim,), "float32")
        chain_cfg = {"scenes": {k: list(v) for k, v in scenes.items()}, "chain_length": int(chain_length),
                     "max_steps": max_steps}
        new_attr = {**first.config(), "name": SOURCE, "chains": chain_cfg}
        with DemoStore.open_or_create(out, keys, fps=spec.control_hz, robot=spec.robot) as store:
            old = store.env.get("chains")
            if old is not None and old != chain_cfg:
                raise ValueError(f"{out} holds chains of {old}, not {chain_cfg}; use another --out")
            env_attr = None
            for task in tasks:
                env_attr = _merge_env_attr(env_attr if env_attr is not None else store.env, new_attr, task, str(out))
            env_attr["chains"] = chain_cfg
            store.set_attr("env", env_attr)
            seen = set(store.seeds_used) | set(env_attr["seeds_failed"])
            have = chain_count(store)
            todo = max(0, chains - have)
            limit = 3 * todo + 10 if max_attempts is None else int(max_attempts)
            names = list(scenes)
            kept, failed, lengths, cut_at = [], [], [], {}
            s, attempts = int(seed), 0
            bar = tqdm(total=todo, desc=f"collect {SOURCE}", unit="chain", disable=not progress)
            try:
                while len(kept) < todo and attempts < limit:
                    while s in seen:
                        s += 1
                    if s >= eval_seed:
                        raise RuntimeError(f"chain collection reached seed {s}, the chain suite's evaluation "
                                           f"seeds; start lower (--seed)")
                    seen.add(s)
                    attempts += 1
                    scene = names[(have + len(kept)) % len(names)]
                    subtasks = chain_tasks(scenes[scene], chain_length, np.random.default_rng([s, 1]))
                    episode = ChainEpisode(subtasks, s, max_steps, make)
                    segments = _rollout_chain(episode, spec.action_low, spec.action_high)
                    if len(segments) < len(subtasks):
                        cut_at[subtasks[len(segments)]] = cut_at.get(subtasks[len(segments)], 0) + 1
                    if not segments:
                        env_attr["seeds_failed"] = [*env_attr["seeds_failed"], s]
                        store.set_attr("env", env_attr)
                        failed.append(s)
                        s += 1
                        continue
                    rows = []
                    for pos, arrays in enumerate(segments):
                        task = subtasks[pos]
                        rng = np.random.default_rng([language_seed, s, pos])
                        text = instructions.get(task) or make(task).instruction(task)
                        if paraphrase:
                            options = paraphrases(text)
                            text = options[int(rng.integers(len(options)))]
                        labelled = rng.random() < language_fraction
                        rows.append(dict(arrays=arrays, task=task, instruction=text if labelled else None,
                                         seed=s, chain=s, chain_pos=pos))
                    store.append_episodes(rows)  # the whole chain and its seed under one commit
                    kept.append(s)
                    lengths.append(len(segments))
                    bar.update(1)
                    s += 1
            finally:
                bar.close()
            total_chains, total_episodes = chain_count(store), len(store)
            labelled_share = float(np.mean(store.episode_has_language)) if len(store) else 0.0
    finally:
        for env in envs.values():
            env.close()
    summary = {"source": SOURCE, "out": str(out), "chains": total_chains, "new_chains": len(kept),
               "failed_first_subtask": len(failed), "attempts": attempts, "seeds": kept,
               "segments_per_chain": lengths, "cut_before": cut_at, "episodes": total_episodes,
               "language_share": labelled_share}
    if progress:
        print(f"collect {SOURCE}: +{len(kept)} chains ({sum(lengths)} segments, {len(failed)} failed at the first "
              f"subtask, chains cut before {cut_at or 'none'}) -> {out} ({total_chains} chains, {total_episodes} "
              f"episodes, {100 * labelled_share:.0f}% with language)", file=sys.stderr)
    if total_chains < chains:
        raise RuntimeError(f"collect {SOURCE}: the store holds {total_chains} of {chains} chains after {attempts} "
                           f"attempts (max_attempts={limit}); rerun to go on")
    return summary


def chains_command(args, suite) -> None:
    """CLI entry for `robodit collect metaworld/chains`; `suite` is the loaded chain suite (scenes, instructions,
    per-subtask step limit, first evaluation seed). Failures become one-line errors with exit status 2."""
    if suite.kind != "chains":
        raise CLIError(f"--suite {suite.name}: not a chain suite (kind: {suite.kind})")
    if not args.chains:
        raise CLIError("give --chains N (the number of chains the store should hold)")
    wanted = [s.strip() for s in (args.scenes or "").split(",") if s.strip()] or list(suite.scenes)
    unknown = [s for s in wanted if s not in suite.scenes]
    if unknown:
        raise CLIError(f"--scenes {unknown} are not scenes of suite {suite.name} ({', '.join(suite.scenes)})")
    fraction = 1.0 if args.language_fraction is None else args.language_fraction
    try:
        collect_chains({s: suite.scenes[s] for s in wanted}, args.chains, args.chain_length, args.out,
                       eval_seed=suite.seed, instructions=suite.instructions, image_size=args.image_size,
                       cameras=args.cameras, seed=args.seed, max_steps=args.max_steps or suite.max_steps,
                       language_fraction=fraction, max_attempts=args.max_attempts)
        if fraction > 0 and args.language_encoder:
            from robodit.datasets.language import embed_store

            embed_store(args.out, args.language_encoder)
    except (RuntimeError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
