import numpy as np
import torch

from robodit.datasets.normalizer import Normalizer, compute_stats
from robodit.datasets.store import DemoStore


def test_round_trip_and_range(toy_store):
    with DemoStore.open(toy_store) as store:
        stats = compute_stats(store, ["state", "action"])
        actions = torch.from_numpy(store.read("action", 0, store.num_frames))
    norm = Normalizer(stats, modes={"state": "gaussian"})
    a = norm.normalize("action", actions)
    assert a.min() >= -1 - 1e-5 and a.max() <= 1 + 1e-5  # limits → [-1, 1]
    assert torch.allclose(norm.unnormalize("action", a), actions, atol=1e-5)
    back = Normalizer.from_flat(norm.state_dict_flat())
    assert torch.allclose(back.unnormalize("action", a), actions, atol=1e-5)
    s = torch.from_numpy(np.asarray(stats["state"]["mean"]))
    assert torch.allclose(norm.normalize("state", s), torch.zeros_like(s), atol=1e-5)


def test_constant_dimension_is_not_blown_up():
    stats = {"x": {"min": np.array([1.0, 0.0]), "max": np.array([1.0, 2.0]), "mean": np.zeros(2), "std": np.ones(2)}}
    norm = Normalizer(stats)
    y = norm.normalize("x", torch.tensor([[1.0, 2.0]]))
    assert torch.isfinite(y).all() and y[0, 0] == 0 and y[0, 1] == 1


def test_unknown_key_and_bad_mode_are_clear():
    import pytest

    norm = Normalizer({"a": {"min": np.zeros(2), "max": np.ones(2), "mean": np.zeros(2), "std": np.ones(2)}})
    with pytest.raises(KeyError, match="'b'"):
        norm.normalize("b", torch.zeros(2))
    with pytest.raises(ValueError, match="last dimension 3"):
        norm.normalize("a", torch.zeros(3))
    with pytest.raises(ValueError, match="bogus"):
        Normalizer({"a": {"min": np.zeros(1), "max": np.ones(1), "mean": np.zeros(1), "std": np.ones(1)}},
                   modes={"a": "bogus"})
