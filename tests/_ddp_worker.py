"""Training process for tests/test_ddp.py: run under `torchrun` (DDP, gloo) or plainly (the reference).

argv[1] is JSON: store, out, steps, batch_size, report (a folder outside `out`), resume, det, rank_key.
Each rank saves its parameters at every checkpoint step into `report` (so ranks can be compared) and a
JSON of which writers it called, so the test can check that only rank 0 wrote into `out`.
`det`: diffusion noise and timesteps become a fixed function of each sample's actions instead of the RNG,
so the loss no longer depends on how a batch is split over ranks and DDP must equal one process exactly.
"""

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from test_training import _cfg  # noqa: E402

import robodit.diffusion.base as diffusion_base  # noqa: E402
from robodit.training import checkpoint as ckpt_io  # noqa: E402
from robodit.training import trainer as trainer_mod  # noqa: E402


def _deterministic_loss():
    original = diffusion_base.Formulation.loss

    def loss(self, denoise_fn, x0, mask=None, generator=None):
        key = (x0.flatten(1).double() * torch.arange(1, x0[0].numel() + 1, dtype=torch.float64)).sum(1)
        noise = torch.sin(key.view(-1, 1, 1) + torch.arange(x0[0].numel()).view(1, *x0.shape[1:])).to(x0.dtype)
        level = (key.abs() * 1e4).long() % self.num_train_timesteps
        randn, self.sample_level = diffusion_base.randn, lambda *a, **k: level
        diffusion_base.randn = lambda *a, **k: noise
        try:
            return original(self, denoise_fn, x0, mask)
        finally:
            diffusion_base.randn = randn
            del self.sample_level

    diffusion_base.Formulation.loss = loss


def main():
    args = json.loads(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    report = Path(args["report"])
    calls = {"rank": rank, "save_checkpoint": 0}
    if args.get("det"):
        _deterministic_loss()
    if args.get("rank_key"):  # a metric only rank 1 reports (MoDE's per-noise-half usage can do this)
        from robodit.policies.dit import DiTPolicy

        compute_loss = DiTPolicy.compute_loss
        DiTPolicy.compute_loss = lambda self, batch: {**compute_loss(self, batch),
                                                      **({"only_rank1": torch.tensor(5.0)} if rank == 1 else {})}
    save_checkpoint = ckpt_io.save_checkpoint

    def counted_save(*a, **k):
        calls["save_checkpoint"] += 1
        return save_checkpoint(*a, **k)

    ckpt_io.save_checkpoint = counted_save
    original_save = trainer_mod.Trainer._save

    def save(self, step, policy, *a, **k):
        flat = torch.cat([p.detach().flatten() for p in policy.parameters()])
        torch.save(flat, report / f"params_rank{rank}_step{step}.pt")
        return original_save(self, step, policy, *a, **k)

    trainer_mod.Trainer._save = save
    cfg = _cfg(args["store"], args["out"], args["steps"], resume=bool(args.get("resume")))
    cfg.train.batch_size = args["batch_size"]
    cfg.train.checkpoint_every = args.get("checkpoint_every", 3)
    trainer_mod.train(cfg)
    (report / f"calls_rank{rank}.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    main()
