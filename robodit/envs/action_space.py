"""The old spelling of `robodit.action_space` (the unified action layout is a data convention, not a simulator's:
it moved below policies and datasets). Kept so `from robodit.envs.action_space import ...` still works."""

from robodit.action_space import *  # noqa: F401,F403
from robodit.action_space import ROBOSUITE_ARM_STATE  # noqa: F401 - not in __all__
