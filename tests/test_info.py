"""`robodit info`: text and JSON summaries, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import numpy as np

from robodit.cli import main
from robodit.datasets.store import DemoStore

KEYS = {"state": ((6,), "float32"), "action": ((2,), "float32"), "image_corner2": ((16, 16, 3), "uint8")}


def _store(path):
    rng = np.random.default_rng(0)
    with DemoStore.create(path, KEYS, fps=80, robot="sawyer", env={"simulator": "metaworld"}) as w:
        for i, T in enumerate([10, 20, 30]):
            arrays = {"state": rng.normal(size=(T, 6)).astype(np.float32),
                      "action": rng.normal(size=(T, 2)).astype(np.float32),
                      "image_corner2": np.full((T, 16, 16, 3), i, np.uint8)}
            w.append_episode(arrays, task="reach-v3" if i < 2 else "push-v3",
                             instruction="reach the goal" if i == 1 else None)
    return path


def test_info_text(tmp_path, capsys):
    path = _store(tmp_path / "d.zarr")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "version 1" in out and "sawyer" in out and "metaworld" in out
    assert "episodes:   3 (3 with actions, 1 with language)" in out
    assert "60 total; episode length min 10 / mean 20.0 / max 30" in out
    assert "image_corner2  uint8    (16, 16, 3)" in out and "chunk 1024 frames" in out
    assert "reach-v3  2 episodes, 1 with language, 1 instructions" in out
    assert "compression ratio" in out


def test_info_json(tmp_path, capsys):
    path = _store(tmp_path / "d.zarr")
    assert main(["info", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["episodes"] == 3 and s["frames"] == {"total": 60, "min": 10, "mean": 20.0, "max": 30}
    assert s["keys"]["image_corner2"] == {"shape": [16, 16, 3], "dtype": "uint8", "chunk_frames": 1024}
    assert s["keys"]["state"]["chunk_frames"] == 2048
    assert [(t["name"], t["episodes"], t["with_language"]) for t in s["tasks"]] == [("reach-v3", 2, 1),
                                                                                   ("push-v3", 1, 0)]
    assert s["bytes_on_disk"] > 0
    assert s["compression_ratio"] == round(s["bytes_uncompressed"] / s["bytes_on_disk"], 2)


def test_info_empty_store(tmp_path, capsys):
    DemoStore.create(tmp_path / "e.zarr", KEYS, fps=10, robot="r").close()
    assert main(["info", str(tmp_path / "e.zarr")]) == 0
    assert "episodes:   0" in capsys.readouterr().out


def test_info_errors_exit_2_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("robodit info: error: ") and "missing.zarr" in err
    (tmp_path / "plain").mkdir()
    assert main(["info", str(tmp_path / "plain")]) == 2
    assert "not a robodit demonstration store" in capsys.readouterr().err
    path = _store(tmp_path / "c.zarr")
    (path / "zarr.json").write_text("{")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and err.count("\n") == 1
