"""robodit.control: chunk execution strategies and the real-time loop that drives any ControlInterface."""

from robodit.control.executors import (STRATEGIES, AsyncInference, ChunkExecutor, RecedingHorizon, TemporalEnsemble,
                                       make_executor, policy_infer)
from robodit.control.loop import ControlLoop, LoopResult

__all__ = ["STRATEGIES", "AsyncInference", "ChunkExecutor", "ControlLoop", "LoopResult", "RecedingHorizon",
           "TemporalEnsemble", "make_executor", "policy_infer"]
