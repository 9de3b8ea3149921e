"""Train a policy: `python train.py policy=dit dataset.path=demos.zarr train.steps=2000 logger=none out_dir=runs/x`.

Thin Hydra entry point; the loop lives in robodit.training.trainer. Under `torchrun` it trains with DDP.
"""

import os
import sys

import hydra
from omegaconf import DictConfig

from robodit.evaluation.training_eval import PeriodicEvaluator
from robodit.training.trainer import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg, evaluator_factory=PeriodicEvaluator)


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 writes: no .hydra/ or train.log here
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                     "hydra.run.dir=."]
    main()
