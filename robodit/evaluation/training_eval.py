"""Training-time evaluation: every N steps a small suite runs with the EMA weights; the best k checkpoints by
success are kept under out_dir/best/ (validation loss is a poor proxy for success in diffusion policies).

The trainer calls `PeriodicEvaluator.run(step, policy, ema, config)` on the main rank when `due(step)`; it
evaluates a copy (the training weights and every RNG are left exactly as they were, so exact resume still
holds), logs `eval/*` metrics, writes out_dir/evals/step_N.json, and keeps out_dir/best/step_N checkpoint dirs
(EMA weights, loadable with `robodit.load_policy`) plus best.json ranking them: higher success first, the
later step on a tie (more training at equal success). A resumed run reads best.json and continues the ranking.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robodit.evaluation.stats import mean_rate, rate_summary
from robodit.evaluation.suites import load_suite, suite_from_tasks

DEFAULTS = {"every": 0, "suite": None, "episodes": 5, "tasks": None, "max_steps": None, "keep_best": 3,
            "num_envs": 10, "workers": 2, "pipeline_groups": 2, "seed": 100_000, "timeout_s": 300.0}


class PeriodicEvaluator:
    def __init__(self, cfg: dict | None, out_dir: str | Path, store_record: dict):
        cfg = {**DEFAULTS, **(cfg or {})}
        unknown = sorted(set(cfg) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"train.eval: unknown key(s) {unknown}; allowed: {sorted(DEFAULTS)}")
        self.cfg, self.every, self.keep = cfg, int(cfg["every"] or 0), int(cfg["keep_best"])
        self.out_dir = Path(out_dir)
        self.best_dir = self.out_dir / "best"
        self.suite = self._suite(cfg, store_record) if self.every > 0 else None  # bad config fails at start
        if self.suite is not None:
            self._check_tasks(store_record)
        index = self.best_dir / "best.json"
        self.entries: list[dict] = []
        if index.exists() and self.suite is not None:  # a resumed run continues its ranking, if it is the same one
            saved = json.loads(index.read_text())
            if (saved.get("suite"), saved.get("metric")) != (self.suite.name, self.metric):
                raise ValueError(f"{index} ranks checkpoints by {saved.get('metric')} on {saved.get('suite')!r}; "
                                 f"this run evaluates {self.metric} on {self.suite.name!r}: scores of the two "
                                 "cannot share a ranking. Keep the same train.eval, or move best/ away")
            self.entries = saved["ranking"]

    def _check_tasks(self, record: dict) -> None:
        """A multi-task policy can only be evaluated on its own tasks (it needs their ids): say so before
        training, not at the first evaluation."""
        trained = list(record.get("tasks") or [])
        missing = [t.name for t in self.suite.tasks if t.name not in trained]
        if len(trained) > 1 and missing:
            raise ValueError(f"train.eval: tasks {missing[:5]} are not in the training store's tasks {trained}: a "
                             "multi-task policy has no task id for them (set train.eval.tasks)")

    @staticmethod
    def _suite(cfg: dict, record: dict):
        episodes = int(cfg["episodes"])
        if cfg["suite"]:
            from robodit.evaluation.evaluate import restrict_suite

            s = restrict_suite(load_suite(cfg["suite"], check_blocks=False), cfg["tasks"], episodes,
                               cfg["max_steps"] or None)
        else:
            env = dict(record.get("env") or {})
            if "/" not in str(env.get("name") or ""):
                raise ValueError("train.eval.every > 0 but the store records no SIM/TASK env; set train.eval.suite")
            tasks = list(cfg["tasks"] or env.get("tasks") or record.get("tasks") or [env["name"].split("/", 1)[1]])
            s = suite_from_tasks(env["name"].split("/", 1)[0], tasks, episodes, int(cfg["seed"]))
        if cfg["max_steps"]:
            s.max_steps = int(cfg["max_steps"])
        return s

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def run(self, step: int, policy, ema, config: dict) -> dict[str, Any]:
        from robodit.evaluation.evaluate import (
            env_kwargs_from_record,
            run_suite,
            summarize_chains,
        )
        from robodit.training import checkpoint as ckpt_io

        t0 = time.time()
        states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            evaluated = copy.deepcopy(policy)
            if ema is not None:
                ema.copy_to(evaluated.parameters())
            evaluated.eval()
            evaluated.on_weights_changed()
            evaluated.checkpoint_config, evaluated.checkpoint_dir = config, None
            record = (config.get("store") or {}).get("env") or {}
            c = self.cfg
            results, engine = run_suite(self.suite, evaluated, env_kwargs_from_record(record, evaluated),
                                        num_envs=c["num_envs"], workers=c["workers"],
                                        pipeline_groups=c["pipeline_groups"], seed=c["seed"], videos=0,
                                        timeout_s=c["timeout_s"], progress=False)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
        ok = [r for r in results if r.error is None]
        metrics: dict[str, Any] = {}
        if self.suite.kind == "tasks":  # the numbers eval.py reports: tasks with no valid episode have no rate
            per = {t.name: rate_summary([r.success for r in ok if r.job.key == t.name]) for t in self.suite.tasks}
            rate = score = mean_rate(per)
            metrics.update({f"eval/{k}": v["success_rate"] for k, v in per.items() if v["success_rate"] is not None})
        else:  # full-chain success as eval.py reports it; ranked by subtasks completed (finer with few chains)
            chains = summarize_chains(results, self.suite)
            rate = chains["success_at_length"][str(self.suite.chain_length)]["success_rate"]
            score = chains["avg_completed"]
            metrics["eval/avg_completed"] = score
        if rate is not None:
            metrics["eval/success_rate"] = rate
        metrics.update({"eval/episodes": len(ok), "eval/errors": len(results) - len(ok),
                        "eval/crashes": len(engine.crashes), "eval/seconds": round(time.time() - t0, 2)})
        evals = self.out_dir / "evals"
        evals.mkdir(parents=True, exist_ok=True)
        (evals / f"step_{step:08d}.json").write_text(json.dumps({"step": step, "suite": self.suite.name, **metrics},
                                                                indent=2))
        if score is not None:  # every episode errored: nothing measured, nothing to rank
            self._keep_if_best(step, score, evaluated, config, ckpt_io)
        return metrics

    @property
    def metric(self) -> str:
        """What the best-k ranking orders by."""
        return "eval/success_rate" if self.suite.kind == "tasks" else "eval/avg_completed"

    def _keep_if_best(self, step: int, score: float, policy, config: dict, ckpt_io) -> None:
        """Insert (score, step) into the ranking; write its checkpoint only if it makes the top k."""
        entries = [e for e in self.entries if e["step"] != step] + [{"step": step, "score": score}]
        for e in entries:  # best.json written before the "score" key held "success_rate"
            e.setdefault("score", e.pop("success_rate", None))
        entries.sort(key=lambda e: (-e["score"], -e["step"]))
        kept, dropped = entries[: self.keep], entries[self.keep:]
        if any(e["step"] == step for e in kept):
            path = self.best_dir / f"step_{step:08d}"
            ckpt_io.save_checkpoint(path, model_state=ckpt_io.export_state(policy), ema_state=None,
                                    normalizer_state=policy.normalizer.state_dict_flat(), config=config)
        for e in dropped:
            shutil.rmtree(self.best_dir / f"step_{e['step']:08d}", ignore_errors=True)
        for e in kept:
            e["path"] = str(self.best_dir / f"step_{e['step']:08d}")
        self.entries = kept
        self.best_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.best_dir / "best.json.tmp"
        tmp.write_text(json.dumps({"suite": self.suite.name, "metric": self.metric,
                                   "best": kept[0]["path"] if kept else None, "ranking": kept}, indent=2))
        tmp.replace(self.best_dir / "best.json")
