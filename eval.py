"""Evaluate a checkpoint: `python eval.py checkpoint=runs/x episodes=50 out_dir=runs/x/eval`.

Thin Hydra entry point; the logic lives in robodit.evaluation.evaluate.
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from robodit.evaluation.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    kwargs.pop("hydra", None)
    summary = evaluate(**kwargs)
    print(f"success rate: {100 * summary['success_rate']:.1f}% over {summary['episodes_per_task']} episodes "
          f"x {len(summary['tasks'])} task(s)")
    for task, r in summary["tasks"].items():
        print(f"  {task}: {100 * r['success_rate']:.1f}%  ({r['ms_per_chunk']:.1f} ms per chunk)")
    print(f"report: {cfg.out_dir}/report.md  results: {cfg.out_dir}/results.json")
    if summary["videos"]:
        print(f"video: {summary['videos'][0]}")


if __name__ == "__main__":
    main()
