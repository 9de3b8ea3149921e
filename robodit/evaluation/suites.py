"""Evaluation suites (LIBERO-style task lists and CALVIN-style chains), defined in YAML under configs/suite/.

A suite is validated completely before any env or policy is built: an unknown task, zero episodes, a
misspelt key or a missing goal image fails at once with the file and the key in the message.

Task suite (`kind: tasks`)::

    name: mt10
    kind: tasks
    simulator: metaworld
    episodes: 10                 # per task and seed block (a task may override it)
    seeds: [100000]              # seed blocks: episode i of block s starts from env seed s + i
    max_steps: null              # per episode; null = the env's limit
    env: {}                      # extra make_env kwargs
    tasks:
      - {name: reach-v3, instruction: "reach the goal", goal_image: null, episodes: null, max_steps: null}

LIBERO suites (configs/suite/libero_*.yaml, LIBERO-PRO's variants under configs/suite/libero_pro/) are
generated from LIBERO's benchmark table by `python -m robodit.evaluation.suites --write-libero`: every task of
the suite, seeds [0] (episode i starts from the task's fixed initial state i), 50 episodes, the suite's step
limit; `episodes=10` runs initial states 0-9.

Chain suite (`kind: chains`): `chains`, `chain_length`, `seed`, `max_steps` (per subtask), `expert_baseline`,
`scenes: {scene: [task, ...]}` (a cycle walked from a seeded start), `instructions: {task: text}`.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from robodit.evaluation.chains import Job, chain_tasks

SUITE_DIR = Path(__file__).resolve().parents[2] / "configs" / "suite"
_COMMON = {"name", "kind", "simulator", "max_steps", "env", "description"}
_KEYS = {"tasks": _COMMON | {"episodes", "seeds", "tasks"},
         "chains": _COMMON | {"chains", "chain_length", "seed", "scenes", "expert_baseline", "instructions"}}
_TASK_KEYS = {"name", "instruction", "goal_image", "episodes", "max_steps"}


class SuiteError(ValueError):
    """A suite definition is wrong; the message names the file and the key."""


@dataclass
class TaskSpec:
    name: str
    instruction: str
    goal_image: str | None = None
    episodes: int = 1
    max_steps: int | None = None


@dataclass
class Suite:
    name: str
    source: str
    kind: str
    simulator: str
    max_steps: int | None = None
    env: dict[str, Any] = field(default_factory=dict)
    tasks: list[TaskSpec] = field(default_factory=list)  # kind=tasks (and, for chains, every task used)
    seeds: list[int] = field(default_factory=list)
    chains: int = 0
    chain_length: int = 5
    seed: int = 0
    scenes: dict[str, list[str]] = field(default_factory=dict)
    expert_baseline: bool = False

    @property
    def instructions(self) -> dict[str, str]:
        return {t.name: t.instruction for t in self.tasks}

    def jobs(self, videos: int = 1) -> list[Job]:
        """Every episode (or chain) this suite runs, in a fixed order: the order results are reported in."""
        out: list[Job] = []
        if self.kind == "tasks":
            for spec in self.tasks:
                for b, block in enumerate(self.seeds):
                    for i in range(spec.episodes):
                        out.append(Job(len(out), spec.name, [spec.name], block + i,
                                       record=b == 0 and i < videos, max_steps=spec.max_steps or self.max_steps))
            return out
        names = list(self.scenes)
        for i in range(self.chains):
            scene = names[i % len(names)]
            rng = np.random.default_rng([self.seed, i])
            out.append(Job(i, scene, chain_tasks(self.scenes[scene], self.chain_length, rng), self.seed + i,
                           record=i < len(names) * videos, max_steps=self.max_steps))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.kind == "tasks":
            for k in ("chains", "chain_length", "seed", "scenes", "expert_baseline"):
                d.pop(k)
        else:
            d.pop("seeds")
        return d


def resolve_suite_path(name: str | Path) -> Path:
    """A suite name (configs/suite/<name>.yaml) or a path to a YAML file."""
    p = Path(name).expanduser()
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = SUITE_DIR / f"{name}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(f.stem for f in SUITE_DIR.glob("*.yaml"))
    raise SuiteError(f"no suite {str(name)!r}: not a YAML file and not one of configs/suite/ ({', '.join(known)})")


def load_suite(suite: str | Path | dict | Suite, source: str | None = None, check_blocks: bool = True) -> Suite:
    """Load and validate a suite from a name, a path or an already-parsed dict (e.g. Hydra's, with overrides).
    `check_blocks=False` defers the seed-block overlap check to a caller that changes the episode counts."""
    if isinstance(suite, Suite):
        return suite
    if isinstance(suite, dict):
        return _validate(dict(suite), source or f"suite {suite.get('name', '?')!r}", check_blocks)
    path = resolve_suite_path(suite)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: expected a mapping at the top level")
    return _validate(data, str(path), check_blocks)


def suite_from_tasks(simulator: str, tasks: list[str], episodes: int, seed: int, max_steps: int | None = None,
                     env: dict | None = None) -> Suite:
    """The ad-hoc suite of a plain `eval.py checkpoint=... episodes=N` run (the tasks the checkpoint names)."""
    return _validate({"name": "checkpoint-tasks", "kind": "tasks", "simulator": simulator, "episodes": episodes,
                      "seeds": [seed], "max_steps": max_steps, "env": dict(env or {}),
                      "tasks": [{"name": t} for t in tasks]}, "eval arguments")


def _int(value, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SuiteError(f"{where}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _check_task(simulator: str, task: Any, where: str) -> str:
    from robodit.envs import parse_env_name

    if not isinstance(task, str) or not task:
        raise SuiteError(f"{where}: a task name (string) is required, got {task!r}")
    try:
        parse_env_name(f"{simulator}/{task}")
    except ValueError as exc:
        raise SuiteError(f"{where}: {exc}") from None
    return task


def _default_instruction(simulator: str, task: str) -> str:
    if simulator == "metaworld":
        from robodit.envs.metaworld import task_instruction

        return task_instruction(task)
    if simulator == "libero":
        from robodit.envs.libero_tasks import instruction

        return instruction(task)
    return task


def libero_suite(suite: str) -> dict[str, Any]:
    """The suite definition of LIBERO suite `suite` (the published protocol: fixed initial states, its step
    limit, LIBERO's own instructions)."""
    from robodit.envs import libero_tasks

    tasks = []
    for t in libero_tasks.suite_tasks(suite):
        n = libero_tasks.init_state_count(t)
        if n:  # a task the package ships no initial states for cannot be evaluated by the protocol
            fewer = {"episodes": n} if n < 50 else {}  # some LIBERO-PRO variants ship 10
            tasks.append({"name": t, "instruction": libero_tasks.instruction(t), **fewer})
    return {"name": suite, "kind": "tasks", "simulator": "libero", "episodes": 50, "seeds": [0],
            "max_steps": libero_tasks.max_steps(suite), "env": {}, "tasks": tasks}


def check_libero_states(suite: Suite) -> None:
    """Every LIBERO episode needs a fixed initial state: seed + episodes may not run past the task's count."""
    if suite.simulator != "libero" or suite.kind != "tasks":
        return
    from robodit.envs.libero_tasks import init_state_count

    for t in suite.tasks:
        n, last = init_state_count(t.name), max(suite.seeds) + t.episodes
        if last > n:
            raise SuiteError(f"{suite.source}: {t.name} has {n} fixed initial states; seeds {suite.seeds} with "
                             f"{t.episodes} episodes would need state {last - 1} (episode i uses state seed + i)")


def libero_suite_path(suite: str) -> Path:
    from robodit.envs.libero_tasks import STANDARD_SUITES

    return SUITE_DIR / (f"{suite}.yaml" if suite in STANDARD_SUITES else f"libero_pro/{suite}.yaml")


def write_libero_suites() -> list[Path]:
    """(Re)write configs/suite/libero_*.yaml and configs/suite/libero_pro/*.yaml from the task table."""
    from robodit.envs.libero_tasks import STANDARD_SUITES, suites

    paths = []
    for suite in suites():
        definition = libero_suite(suite)
        if not definition["tasks"]:
            continue
        path = libero_suite_path(suite)
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = "LIBERO" if suite in STANDARD_SUITES else "LIBERO-PRO"
        header = (f"# {kind} suite {suite} (generated: python -m robodit.evaluation.suites --write-libero).\n"
                  f"# Run: python eval.py checkpoint=<ckpt> suite={path.relative_to(SUITE_DIR).with_suffix('')} "
                  f"[episodes=10: initial states 0-9 only]\n# Episode i starts from the task's fixed initial state i (seeds: [0]); "
                  f"10 no-op settle steps first.\n")
        path.write_text(header + yaml.safe_dump(definition, sort_keys=False, width=200))
        paths.append(path)
    return paths


@functools.cache
def _scene_model(task: str) -> str:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    env = ALL_V3_ENVIRONMENTS[task]()
    try:
        return Path(env.model_name).name
    finally:
        env.close()


def check_seed_blocks(suite: Suite) -> None:
    """Seed blocks must not overlap at the episode counts that will run: two blocks sharing seeds would run the
    same initial states twice and count them as independent episodes."""
    longest = max(t.episodes for t in suite.tasks)
    for a, b in itertools.pairwise(sorted(suite.seeds)):
        if b - a < longest:
            raise SuiteError(f"{suite.source}: seeds: blocks {a} and {b} overlap with {longest} episodes per block")


def _validate(d: dict, src: str, check_blocks: bool = True) -> Suite:
    kind = d.get("kind", "tasks")
    if kind not in _KEYS:
        raise SuiteError(f"{src}: kind: must be 'tasks' or 'chains', got {kind!r}")
    _check_keys(d, _KEYS[kind], src)
    simulator = d.get("simulator")
    from robodit.envs import SIMULATORS

    if simulator not in SIMULATORS:
        raise SuiteError(f"{src}: simulator: must be one of {sorted(SIMULATORS)}, got {simulator!r}")
    max_steps = d.get("max_steps")
    if max_steps is not None:
        max_steps = _int(max_steps, f"{src}: max_steps", 1)
    env = d.get("env") or {}
    if not isinstance(env, dict):
        raise SuiteError(f"{src}: env: must be a mapping of make_env kwargs, got {env!r}")
    from robodit.envs import check_env_kwargs

    try:
        check_env_kwargs(simulator, env)
    except ValueError as exc:
        raise SuiteError(f"{src}: env: {exc}") from None
    suite = Suite(name=str(d.get("name") or Path(src).stem), source=src, kind=kind, simulator=simulator,
                  max_steps=max_steps, env=dict(env))
    if kind == "tasks":
        episodes = _int(d.get("episodes", 1), f"{src}: episodes", 1)
        seeds = d.get("seeds", [100_000])
        if isinstance(seeds, int):
            seeds = [seeds]
        if not isinstance(seeds, (list, tuple)) or not seeds:
            raise SuiteError(f"{src}: seeds: must be a non-empty list of seed blocks, got {seeds!r}")
        suite.seeds = [_int(s, f"{src}: seeds[{i}]", 0) for i, s in enumerate(seeds)]
        tasks = d.get("tasks")
        if not isinstance(tasks, (list, tuple)) or not tasks:
            raise SuiteError(f"{src}: tasks: must be a non-empty list")
        seen = set()
        for i, t in enumerate(tasks):
            where = f"{src}: tasks[{i}]"
            t = {"name": t} if isinstance(t, str) else t
            if not isinstance(t, dict):
                raise SuiteError(f"{where}: expected a task name or a mapping, got {t!r}")
            _check_keys(t, _TASK_KEYS, where)
            name = _check_task(simulator, t.get("name"), f"{where}.name")
            if name in seen:
                raise SuiteError(f"{where}.name: task {name!r} is listed twice")
            seen.add(name)
            ep = _int(t["episodes"], f"{where}.episodes", 1) if t.get("episodes") is not None else episodes
            ms = _int(t["max_steps"], f"{where}.max_steps", 1) if t.get("max_steps") is not None else None
            goal_image = t.get("goal_image")
            if goal_image is not None:
                p = Path(goal_image)
                p = p if p.is_absolute() else Path(src).parent / p
                if not p.exists():
                    raise SuiteError(f"{where}.goal_image: {p} does not exist")
                goal_image = str(p)
            suite.tasks.append(TaskSpec(name, str(t.get("instruction") or _default_instruction(simulator, name)),
                                        goal_image, ep, ms))
        if check_blocks:
            check_seed_blocks(suite)
            check_libero_states(suite)
        return suite
    suite.chains = _int(d.get("chains", 100), f"{src}: chains", 1)
    suite.chain_length = _int(d.get("chain_length", 5), f"{src}: chain_length", 1)
    suite.seed = _int(d.get("seed", 300_000), f"{src}: seed", 0)
    suite.expert_baseline = bool(d.get("expert_baseline", True))
    if simulator != "metaworld":
        raise SuiteError(f"{src}: simulator: chains need a scene carrier; only 'metaworld' has one")
    scenes = d.get("scenes")
    if not isinstance(scenes, dict) or not scenes:
        raise SuiteError(f"{src}: scenes: must be a non-empty mapping scene -> [task, ...]")
    instructions = d.get("instructions") or {}
    for scene, cycle in scenes.items():
        where = f"{src}: scenes.{scene}"
        if not isinstance(cycle, (list, tuple)) or len(cycle) < 2:
            raise SuiteError(f"{where}: must list at least 2 tasks that share one scene")
        cycle = [_check_task(simulator, t, f"{where}[{i}]") for i, t in enumerate(cycle)]
        models = {t: _scene_model(t) for t in cycle}
        if len(set(models.values())) > 1:
            raise SuiteError(f"{where}: tasks do not share one scene model: {models}")
        suite.scenes[str(scene)] = cycle
    for task in sorted({t for c in suite.scenes.values() for t in c}):
        suite.tasks.append(TaskSpec(task, str(instructions.get(task) or _default_instruction(simulator, task))))
    unknown = sorted(set(instructions) - set(suite.instructions))
    if unknown:
        raise SuiteError(f"{src}: instructions: tasks {unknown} are in no scene")
    return suite


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write-libero"]:
        raise SystemExit("usage: python -m robodit.evaluation.suites --write-libero")
    print(f"wrote {len(write_libero_suites())} LIBERO suites under {SUITE_DIR}")
