"""The unified 128-d state/action space (RDT layout) and the adapters that map each embodiment into it.

One model can then train on robots whose native vectors differ: every embodiment's state and action are
scattered into fixed, *named* slots, and an availability mask (1 = the robot has this quantity) travels with
the values, so a slot a robot does not have is zero and masked — never guessed.

| slots      | name                     | meaning                                                             |
|------------|--------------------------|---------------------------------------------------------------------|
| [0, 10)    | right_joint_pos          | arm joint positions (single-arm robots use the right slots)         |
| [10, 15)   | right_gripper_pos        | gripper joint positions / open-close command                        |
| [15, 25)   | right_joint_vel          | arm joint velocities                                                |
| [25, 30)   | right_gripper_vel        | gripper joint velocities                                            |
| [30, 33)   | right_eef_pos            | end-effector position xyz                                           |
| [33, 39)   | right_eef_rot6d          | end-effector rotation, first two rotation-matrix columns            |
| [39, 42)   | right_eef_lin_vel        | end-effector linear velocity; *delta* EEF position actions go here  |
| [42, 45)   | right_eef_ang_vel        | end-effector angular velocity; *delta* EEF rotation actions go here |
| [45, 50)   | right_reserved           |                                                                     |
| [50, 100)  | left_* (same, +50)       | the left arm, mirroring [0, 50)                                     |
| [100, 102) | base_lin_vel             | mobile base linear velocity xy                                      |
| 102        | base_ang_vel             | mobile base yaw rate                                                |
| [103, 128) | reserved                 |                                                                     |

Adapters here are index maps (native dim i ↔ one unified slot), so round trips are exact and a per-dimension
normalisation commutes with them: the policy normalises in native units and scatters the result.
A gripper's open/close command is a *position* target, so it goes in the gripper-position slot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

UNIFIED_DIM = 128
LEFT_OFFSET = 50

# name -> (start, stop) for the right arm; "left_<name>" is the same range + 50.
_ARM_FIELDS = {
    "joint_pos": (0, 10), "gripper_pos": (10, 15), "joint_vel": (15, 25), "gripper_vel": (25, 30),
    "eef_pos": (30, 33), "eef_rot6d": (33, 39), "eef_lin_vel": (39, 42), "eef_ang_vel": (42, 45),
}
SLOTS: dict[str, tuple[int, int]] = {}
for _side, _off in (("right", 0), ("left", LEFT_OFFSET)):
    for _name, (_a, _b) in _ARM_FIELDS.items():
        SLOTS[f"{_side}_{_name}"] = (_a + _off, _b + _off)
SLOTS["base_lin_vel"] = (100, 102)
SLOTS["base_ang_vel"] = (102, 103)


def slots(name: str, count: int | None = None) -> tuple[int, ...]:
    """Unified indices of the named field (its first `count` entries), e.g. slots("right_joint_pos", 6)."""
    if name not in SLOTS:
        raise KeyError(f"unknown unified slot {name!r}; known: {', '.join(SLOTS)}")
    a, b = SLOTS[name]
    count = b - a if count is None else count
    if not 0 < count <= b - a:
        raise ValueError(f"slot {name!r} holds {b - a} values, asked for {count}")
    return tuple(range(a, a + count))


def _check_slots(what: str, idx: tuple[int, ...]) -> tuple[int, ...]:
    if len(set(idx)) != len(idx) or any(not 0 <= i < UNIFIED_DIM for i in idx):
        raise ValueError(f"{what}: slots must be distinct indices in [0, {UNIFIED_DIM}), got {idx}")
    return idx


@dataclass(frozen=True)
class Adapter:
    """One embodiment: native action dim i ↔ unified slot `action_slots[i]`; native state index
    `state_index[j]` ↔ unified slot `state_slots[j]` (state entries that are not proprioception — object poses,
    goals — stay out of the unified state; the policy still sees them as observation tokens)."""

    robot: str
    action_slots: tuple[int, ...]
    state_index: tuple[int, ...] = ()
    state_slots: tuple[int, ...] = ()
    control_hz: float | None = None  # the embodiment's usual rate, when the store does not say

    def __post_init__(self):
        _check_slots(f"{self.robot} action", self.action_slots)
        _check_slots(f"{self.robot} state", self.state_slots)
        if len(self.state_index) != len(self.state_slots):
            raise ValueError(f"{self.robot}: state_index and state_slots differ in length")

    @property
    def action_dim(self) -> int:
        return len(self.action_slots)

    @property
    def action_mask(self) -> np.ndarray:
        return _mask(self.action_slots)

    @property
    def state_mask(self) -> np.ndarray:
        return _mask(self.state_slots)

    # -- actions ---------------------------------------------------------------------------------------------
    def action_to_unified(self, action):
        """[..., A] → ([..., 128] values with zeros where masked, [128] mask); numpy or torch in, same out."""
        if action.shape[-1] != self.action_dim:
            raise ValueError(f"{self.robot} actions have {self.action_dim} values, got shape {tuple(action.shape)}")
        return _scatter(action, self.action_slots), _like(action, self.action_mask)

    def action_from_unified(self, unified):
        """[..., 128] → native [..., A] (only the robot's own slots are read)."""
        return _gather(unified, self.action_slots)

    # -- state -----------------------------------------------------------------------------------------------
    def state_to_unified(self, state):
        """Native state vector [..., S] → ([..., 128], [128] mask) of its proprioceptive entries."""
        if self.state_index and state.shape[-1] <= max(self.state_index):
            raise ValueError(f"{self.robot} state needs at least {max(self.state_index) + 1} values, "
                             f"got shape {tuple(state.shape)}")
        sub = state[..., list(self.state_index)] if self.state_index else state[..., :0]
        return _scatter(sub, self.state_slots), _like(state, self.state_mask)

    def state_from_unified(self, unified):
        """[..., 128] → the mapped native state entries [..., len(state_index)], in `state_index` order."""
        return _gather(unified, self.state_slots)


def _mask(idx) -> np.ndarray:
    m = np.zeros(UNIFIED_DIM, np.float32)
    m[list(idx)] = 1.0
    return m


def _like(ref, mask: np.ndarray):
    return torch.as_tensor(mask, device=ref.device) if isinstance(ref, torch.Tensor) else mask


def _scatter(x, idx):
    if isinstance(x, torch.Tensor):
        out = x.new_zeros(*x.shape[:-1], UNIFIED_DIM)
        out[..., list(idx)] = x
        return out
    x = np.asarray(x)
    out = np.zeros((*x.shape[:-1], UNIFIED_DIM), dtype=x.dtype if x.dtype.kind == "f" else np.float32)
    out[..., list(idx)] = x
    return out


def _gather(u, idx):
    if u.shape[-1] != UNIFIED_DIM:
        raise ValueError(f"expected a unified vector of {UNIFIED_DIM} values, got shape {tuple(u.shape)}")
    return u[..., list(idx)]


@dataclass(frozen=True)
class UnifiedLayout:
    """Where one store's native observation and action go in a unified-space model, so that stores of different
    robots batch together: proprioception and actions into the 128 slots (the adapter, value + mask), every
    other low-dim observation value (object poses, goals: what the unified state leaves out) into a
    zero-padded `context` vector of fixed width `context_dim`, in key order. Works on numpy and torch."""

    adapter: Adapter
    lowdim: tuple[tuple[str, int], ...]  # (key, width) of the low-dim observation keys, sorted
    state_key: str | None  # the key the adapter's state_index reads; None: no unified state
    context_dim: int

    @classmethod
    def build(cls, robot: str | None, obs_shapes: dict, state_key: str | None, context_dim: int,
              where: str = "") -> "UnifiedLayout":
        """`obs_shapes`: {key: (shape, dtype)}; `where` names the store in errors."""
        adapter = adapter_for(robot)
        at = f"{where}: " if where else ""
        lowdim = tuple((k, int(shape[0])) for k, (shape, _) in sorted(obs_shapes.items()) if len(shape) == 1)
        widths = dict(lowdim)
        key = state_key if state_key in widths and adapter.state_index else None
        if key is not None and widths[key] <= max(adapter.state_index):
            raise ValueError(f"{at}robot {robot!r} reads {key}[{max(adapter.state_index)}] but observation "
                             f"{key!r} has shape ({widths[key]},)")
        layout = cls(adapter, lowdim, key, int(context_dim))
        if layout.context_width > layout.context_dim:
            raise ValueError(f"{at}robot {robot!r} has {layout.context_width} low-dim observation values outside "
                             f"the unified state (keys {list(widths)}), more than policy.context_dim="
                             f"{layout.context_dim}: raise it")
        return layout

    def _context_index(self) -> list[tuple[str, list[int]]]:
        mapped = set(self.adapter.state_index)
        return [(k, [i for i in range(w) if not (k == self.state_key and i in mapped)]) for k, w in self.lowdim]

    @property
    def context_width(self) -> int:
        return sum(len(idx) for _, idx in self._context_index())

    @property
    def state_mask(self) -> np.ndarray:
        return self.adapter.state_mask if self.state_key else np.zeros(UNIFIED_DIM, np.float32)

    @property
    def action_mask(self) -> np.ndarray:
        return self.adapter.action_mask

    def state(self, lowdim: dict):
        """{key: [..., D]} → unified proprioceptive state [..., 128] (zeros where the robot has none)."""
        if self.state_key is None:
            ref = next(iter(lowdim.values()))
            return _scatter(ref[..., :0], ())
        return self.adapter.state_to_unified(lowdim[self.state_key])[0]

    def context(self, lowdim: dict):
        """{key: [..., D]} → [..., context_dim]: the values the unified state leaves out, zero-padded."""
        parts = [lowdim[k][..., idx] for k, idx in self._context_index() if idx]
        ref = next(iter(lowdim.values()))
        if isinstance(ref, torch.Tensor):
            out = ref.new_zeros(*ref.shape[:-1], self.context_dim)
            if parts:
                out[..., :self.context_width] = torch.cat(parts, dim=-1)
            return out
        out = np.zeros((*ref.shape[:-1], self.context_dim), np.float32)
        if parts:
            out[..., :self.context_width] = np.concatenate(parts, axis=-1)
        return out

    def action(self, action):
        return self.adapter.action_to_unified(action)[0]

    def native_action(self, unified):
        return self.adapter.action_from_unified(unified)

    def affine(self, stats: dict) -> dict[str, np.ndarray]:
        """Native per-key (offset, scale) → the same affine map on the unified state / context / action (identity
        where the robot has nothing): normalising native values then scattering equals scattering then this."""
        dims = dict(self.lowdim)
        zero = {k: np.zeros(d, np.float32) for k, d in dims.items()}
        off = {k: np.asarray(stats[k][0], np.float32) if k in stats else zero[k] for k in dims}
        sc = {k: np.asarray(stats[k][1], np.float32) - 1 if k in stats else zero[k] for k in dims}  # 0 = scale 1
        a_dim = self.adapter.action_dim
        a_off, a_sc = stats.get("action", (np.zeros(a_dim, np.float32), np.ones(a_dim, np.float32)))
        if not dims:  # no low-dim keys at all: identity state and context
            off = sc = {"_": np.zeros(1, np.float32)}
        return {"state_offset": self.state(off), "state_scale": self.state(sc) + 1,
                "context_offset": self.context(off), "context_scale": self.context(sc) + 1,
                "action_offset": self.action(np.asarray(a_off, np.float32)),
                "action_scale": self.action(np.asarray(a_sc, np.float32) - 1) + 1}


# -- the embodiments we ship -----------------------------------------------------------------------------------
def metaworld_sawyer() -> Adapter:
    """Meta-World: action = xyz EEF delta + gripper effort (4); state[0:3] hand xyz, state[3] gripper opening."""
    return Adapter("metaworld_sawyer", slots("right_eef_lin_vel") + slots("right_gripper_pos", 1),
                   state_index=(0, 1, 2, 3), state_slots=slots("right_eef_pos") + slots("right_gripper_pos", 1),
                   control_hz=80.0)


# robosuite's proprioceptive state as robodit.envs.robosuite lays it out per arm (25 values):
# joint_pos 7 | joint_vel 7 | gripper_qpos 2 | gripper_qvel 2 | eef_pos 3 | eef_quat 4 (not mapped: a rotation
# to rot6d is not an index map; the policy still sees it as an observation).
ROBOSUITE_ARM_STATE = 25


def _robosuite_arm(side: str, state_offset: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    act = slots(f"{side}_eef_lin_vel") + slots(f"{side}_eef_ang_vel") + slots(f"{side}_gripper_pos", 1)
    s_idx = tuple(range(state_offset, state_offset + 21))
    s_slots = (slots(f"{side}_joint_pos", 7) + slots(f"{side}_joint_vel", 7) + slots(f"{side}_gripper_pos", 2)
               + slots(f"{side}_gripper_vel", 2) + slots(f"{side}_eef_pos"))
    return act, s_idx, s_slots


def robosuite_panda() -> Adapter:
    """robosuite Panda, OSC_POSE: action = xyz delta, axis-angle delta, gripper (7)."""
    act, s_idx, s_slots = _robosuite_arm("right", 0)
    return Adapter("robosuite_panda", act, s_idx, s_slots, control_hz=20.0)


def robosuite_two_panda() -> Adapter:
    """Two Pandas (TwoArmLift/Handover): robot0 is the right arm, robot1 the left; 14-d action."""
    a0, i0, s0 = _robosuite_arm("right", 0)
    a1, i1, s1 = _robosuite_arm("left", ROBOSUITE_ARM_STATE)
    return Adapter("robosuite_two_panda", a0 + a1, i0 + i1, s0 + s1, control_hz=20.0)


def joint_arm(robot: str, n_joints: int, gripper: bool = True, control_hz: float | None = None) -> Adapter:
    """A joint-space arm: action = state = joint position targets (+ gripper last), e.g. SO-100/101 (5 + 1)."""
    idx = slots("right_joint_pos", n_joints) + (slots("right_gripper_pos", 1) if gripper else ())
    return Adapter(robot, idx, tuple(range(len(idx))), idx, control_hz=control_hz)


ADAPTERS: dict[str, Callable[[], Adapter]] = {
    "metaworld_sawyer": metaworld_sawyer,
    "robosuite_panda": robosuite_panda,
    "robosuite_two_panda": robosuite_two_panda,
    "so100_follower": lambda: joint_arm("so100_follower", 5, True, 30.0),
    "so101_follower": lambda: joint_arm("so101_follower", 5, True, 30.0),
}


def register_adapter(robot: str, factory: Callable[[], Adapter]) -> None:
    """Add an embodiment (a factory, so adapters stay immutable and cheap to import)."""
    ADAPTERS[robot.lower()] = factory


def adapter_for(robot: str | None) -> Adapter:
    """The adapter of a store's / env's robot name; ValueError naming the robot when there is none."""
    if not robot:
        raise ValueError("no robot name given: the unified action space needs the store's robot "
                         f"(known: {', '.join(sorted(ADAPTERS))})")
    factory = ADAPTERS.get(str(robot).lower())
    if factory is None:
        raise ValueError(f"robot {robot!r} has no unified-action-space adapter; known robots: "
                         f"{', '.join(sorted(ADAPTERS))} (add one with robodit.action_space.register_adapter)")
    return factory()


__all__ = [
    "ADAPTERS",
    "LEFT_OFFSET",
    "SLOTS",
    "UNIFIED_DIM",
    "Adapter",
    "UnifiedLayout",
    "adapter_for",
    "joint_arm",
    "register_adapter",
    "slots",
]
