"""The README's `python train.py` lines are what users paste: each must compose and build its policy.

(The README once said `policy.formulation.name=edm`, which merges EDM's name into the DDPM block and fails at
build time; `policy.formulation=edm` is the working spelling.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
SHAPE_META = {"obs": {"state": {"shape": [5], "dtype": "float32"},
                      "image_corner2": {"shape": [64, 64, 3], "dtype": "uint8"}},
              "action": {"shape": [3]}, "num_tasks": 2}


def readme_train_commands() -> list[list[str]]:
    """Overrides of every `python train.py` line in a README code block; `...` stands for the first line's."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands, first = [], None
    for line in (ln for b in blocks for ln in b.splitlines()):
        line = line.split(" #")[0].strip()
        if not line.startswith("python train.py"):
            continue
        words = shlex.split(line)[2:]
        if words[:1] == ["..."]:
            words = [w for w in first if not any(w.startswith(k.split("=")[0] + "=") for k in words[1:])] + words[1:]
        elif first is None:
            first = words
        commands.append(words)
    return commands


def test_readme_has_train_commands():
    assert len(readme_train_commands()) >= 5


@pytest.mark.parametrize("overrides", readme_train_commands(), ids=lambda o: " ".join(o)[-60:])
def test_readme_train_command_composes_and_builds(overrides):
    from robodit.datasets.normalizer import Normalizer
    from robodit.training.checkpoint import build_policy

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    with torch.device("meta"):
        policy = build_policy(policy_cfg, SHAPE_META, Normalizer())
    assert sum(p.numel() for p in policy.parameters()) > 0
