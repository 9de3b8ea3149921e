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
                             instruction="reach the goal" if i == 1 else None, seed=None if i == 2 else 4 + i)
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
    assert "seeds:      2 episode(s) with their collection seed; 2 seed(s) used, 0 failed attempt(s)" in out


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


def _checkpoint(store, out, policy):
    """A 2-step tiny training run of `policy`: its checkpoint is what `info` describes."""
    from omegaconf import OmegaConf

    from robodit.training.trainer import train

    base = OmegaConf.load("configs/train.yaml")
    cfg = OmegaConf.create({
        "out_dir": str(out),
        "policy": dict(OmegaConf.to_container(OmegaConf.load(f"configs/policy/{policy}.yaml")), size="tiny",
                       num_inference_steps=3),
        "dataset": dict(OmegaConf.to_container(OmegaConf.load("configs/dataset/zarr.yaml")), path=str(store)),
        "logger": {"kind": "none"},
        "train": dict(OmegaConf.to_container(base.train), steps=2, batch_size=4, checkpoint_every=100, log_every=1,
                      val_every=0, warmup_steps=1, progress=False),
    })
    return train(cfg)


def test_info_checkpoint_text_json_and_routes(toy_store, tmp_path, capsys):
    """A run dir resolves to its latest checkpoint; sizes come from the headers; --routes shows MoDE's plan."""
    import robodit

    ckpt = _checkpoint(toy_store, tmp_path / "run", "mode")
    assert main(["info", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {ckpt} (step 2)" in out and "MoDEPolicy, size tiny" in out
    assert "sampler ddim x 3 steps" in out and "observes:   state (5,)" in out and "action:     (3,)" in out
    assert str(toy_store.resolve()) in out and "routes:" not in out

    assert main(["info", str(ckpt), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    policy = robodit.load_policy(ckpt)
    counts = policy.parameter_counts()
    assert s["parameters"]["total"] == counts["total"] == sum(p.numel() for p in policy.parameters())
    assert s["parameters"]["active"] == counts["active"] < counts["total"]
    assert s["step"] == 2 and s["action"] == [3] and s["stores"][0]["tasks"] == ["toy-task"]
    assert s["policy"]["formulation"]["name"] == "ddpm"
    assert s["policy"]["formulation"]["prediction"] == "sample"  # every option spelled out, defaults included

    assert main(["info", str(ckpt), "--json", "--routes"]) == 0
    routes = json.loads(capsys.readouterr().out)["routes"]
    expected = policy.inference_routing()
    assert len(routes) == 3 and [r["experts"] for r in routes] == [[list(e) for e in r["experts"]] for r in expected]
    assert main(["info", str(ckpt), "--json", "--routes"]) == 0
    cache = json.loads(capsys.readouterr().out)["expert_cache"]
    assert cache["bytes"] == policy.expert_cache_bytes() > 0 and cache["fused_mlps"] == 3 * policy.depth
    assert main(["info", str(ckpt), "--routes"]) == 0
    out = capsys.readouterr().out
    assert out.count("+") == 3 * policy.depth  # top-2: one "a+b" per step and layer
    assert f"cache:      {cache['bytes'] / 2**20:.1f} MiB, {3 * policy.depth} fused MLPs" in out
    import yaml  # the same checkpoint deployed with the in-place cache: no fused copies to report

    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["policy"]["expert_cache"] = "in_place"
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["info", str(ckpt), "--routes"]) == 0
    assert "routes only, the experts used in place" in capsys.readouterr().out


def test_info_routes_errors(toy_store, tmp_path, capsys):
    ckpt = _checkpoint(toy_store, tmp_path / "run", "dit")
    assert main(["info", str(ckpt)]) == 0
    assert "DiTPolicy" in capsys.readouterr().out
    assert main(["info", str(ckpt), "--routes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DiTPolicy has no expert routing" in err
    assert main(["info", str(toy_store), "--routes"]) == 2
    assert "--routes is for checkpoints" in capsys.readouterr().err


def test_info_piped_into_a_reader_that_stops_early_is_quiet(toy_store):
    """`robodit info STORE | head -1`: the closed pipe ends the command cleanly, with no traceback."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "robodit.cli", "info", str(toy_store)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_a_bare_formulation_name_means_that_process_as_the_family_runs_it():
    """`policy.formulation=ddpm` on an x0-DDPM family kept DDPM's class defaults (epsilon, 1000 linear levels:
    5% on reach-v3); now it is the family's own process, and `info` shows which."""
    from robodit.policies.dit import DiTPolicy
    from robodit.policies.mode import MoDEPolicy
    from robodit.policies.pad import PADPolicy
    from robodit.training.info import _formulation

    for cls in (DiTPolicy, MoDEPolicy, PADPolicy):
        assert cls.formulation_config("ddpm")["prediction"] == "sample", cls
        assert cls.formulation_config("edm") == "edm"  # another process: its own defaults
    shape_meta = {"obs": {"state": {"shape": [5], "dtype": "float32"}}, "action": {"shape": [3]}}
    assert MoDEPolicy(shape_meta, size="tiny", formulation="ddpm").formulation.prediction == "sample"
    shown = _formulation({"_target_": "robodit.policies.dit.DiTPolicy", "formulation": "ddpm"})
    assert shown["prediction"] == "sample" and shown["num_train_timesteps"] == 100
    assert _formulation({"_target_": "robodit.policies.mdt.MDTPolicy"})["name"] == "edm"
