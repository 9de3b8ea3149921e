"""Evaluate a checkpoint: `python eval.py checkpoint=runs/x [suite=mt10] episodes=50 out_dir=runs/x/eval`.

Thin Hydra entry point; the logic lives in robodit.evaluation.evaluate (heavy imports stay inside `main`, so
config errors and --help come back at once). `checkpoint=expert` evaluates the scripted experts;
`checkpoint=ws://HOST:PORT` a policy served by `robodit serve` (token from $ROBODIT_TOKEN).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from robodit.evaluation.evaluate import EvaluationError, evaluate
    from robodit.evaluation.report import console_summary

    kwargs = OmegaConf.to_container(cfg, resolve=True)
    kwargs.pop("hydra", None)
    if kwargs.get("suite") is not None:  # name the file the suite came from, for validation errors
        hc = HydraConfig.get()
        name = hc.runtime.choices.get("suite")
        dirs = [Path(__file__).parent / "configs"] + [Path(p[7:]) for p in hc.searchpath if p.startswith("file://")]
        found = [d / "suite" / f"{name}.yaml" for d in dirs if (d / "suite" / f"{name}.yaml").exists()]
        kwargs["suite_source"] = str(found[0]) if found else f"suite={name}"
    try:
        summary = evaluate(**kwargs)
    except EvaluationError as exc:
        sys.exit(f"eval.py: {exc}")
    print(console_summary(summary, cfg.out_dir))


if __name__ == "__main__":
    main()
