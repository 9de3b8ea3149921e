"""Outputs of an evaluation: results.json, report.md, success.png (bars with 95% intervals), mp4 videos.

results.json (schema "robodit.eval/2"); rates are fractions in [0, 1], intervals are Wilson 95% [lo, hi]:

    schema, kind ("tasks" | "chains"), ci_method ("wilson95")
    suite            the validated suite: name, source, simulator, max_steps, env, tasks [{name, instruction,
                     goal_image, episodes, max_steps}], seeds (tasks) | chains, chain_length, seed, scenes
    checkpoint, policy   checkpoint dir and policy name, or "expert" for the scripted experts; a served policy
                     (checkpoint=ws://...): its URL, "remote:NAME", and server {url, checkpoint, policy}
    env, episodes_per_task (a number, or {task: count} when tasks differ), seed (first env seed),
    policy_seed (seeds the sampling noise), sampler, num_inference_steps, n_action_steps, device
    training_seeds   evaluation seeds the training demos were collected from (not held out; normally [])
    untrained_tasks  tasks of this run the checkpoint never learned to act on: not in its training store, or
                     there only as action-free video (normally [])
    tasks            {task: {instruction, episodes, successes, success_rate, ci95,
                     [tasks only:] mean_steps, ms_per_chunk (policy time per chunk, batched time shared out
                     over the batch's rows), policy_calls, seeds, success_per_episode, errors, fingerprint
                     (hash of every action executed: equal across runs = identical rollouts)}}
                     (for chains: every attempt of the task at any position in a chain)
    success_rate     tasks: mean over tasks of success_rate; chains: success at the full chain length.
                     A rate over no episodes (none attempted, or all errored) is null, and left out of means
    pooled           tasks only: rate_summary over all episodes (the interval for the overall rate)
    chains           chains only: {"policy" | "expert": {chains, success_at_length {"1".."5": {successes,
                     success_rate, ci95}}, avg_completed, completed_per_chain, per_scene {scene: {chains,
                     success_at_length, avg_completed, transitions}}, per_task {...}, transitions {previous subtask
                     or "(start)": {subtask: {attempts, failures}}} (where chains break), per_chain [{scene, seed,
                     tasks, successes}] (parallel to completed_per_chain), satisfied_at_start (subtasks whose check
                     already passed on the carried state)}}
    avg_completed    chains only: the evaluated policy's average subtasks completed in a row
    run              num_envs, workers, pipeline_groups, wall_time_s, episodes, env_steps, env_steps_per_s,
                     video_fps (videos play in real time: a frame every 4 control steps), policy_calls,
                     policy_seconds, crashes [{worker, pid, exitcode, reason, job (the episode running when it
                     died, or null), key, seed, lane, subtask, at_step, attempt, during ("run", or "replay":
                     the replacement worker failed while restoring it), action, rerun_jobs (every episode of
                     that worker re-run)}], restarted_episodes, errors [{job, key, seed, error}]
                     (an errored episode is excluded from every rate and listed here, never a failure)
    wall_time_s, videos [paths], plot (path)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_video(path: Path, frames: list[np.ndarray], fps: int = 30) -> None:
    import imageio.v2 as imageio

    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=7, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _avg(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def plot_success(path: Path, summary: dict[str, Any]) -> Path:
    """Per-task (or per-chain-length) success bars with Wilson 95% error bars; PNG through matplotlib's Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if summary["kind"] == "tasks":
        rows = {"": [(t, r["success_rate"], r["ci95"]) for t, r in summary["tasks"].items()]}
        xlabel = "task"
    else:
        rows = {who: [(k, v["success_rate"], v["ci95"]) for k, v in m["success_at_length"].items()]
                for who, m in summary["chains"].items()}
        xlabel = "subtasks completed in a row (chain length)"
    labels = [name for name, _, _ in next(iter(rows.values()))]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(labels) + 2), 4.0), dpi=110)
    x = np.arange(len(labels))
    for i, (who, vals) in enumerate(rows.items()):
        rate = np.array([_nan(v) for _, v, _ in vals])  # no episodes: no bar
        lo = np.array([c[0] for _, _, c in vals])
        hi = np.array([c[1] for _, _, c in vals])
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, rate, width, yerr=[rate - lo, hi - rate], capsize=3,
               label=who or None)
    ax.set_xticks(x, labels, rotation=60 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center",
                  fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (Wilson 95%)")
    ax.set_xlabel(xlabel)
    ax.set_title(f"{summary['suite']['name']} · {summary['policy']}")
    if len(rows) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def caption_frames(frames: list[np.ndarray], captions: list[str], scale: int = 2) -> list[np.ndarray]:
    """Frames upscaled `scale`x with their caption on a dark band above them (the chain videos' instruction)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    out = []
    for frame, text in zip(frames, captions):
        h, w = frame.shape[:2]
        img = Image.new("RGB", (w * scale, h * scale + 28), (20, 20, 20))
        img.paste(Image.fromarray(np.ascontiguousarray(frame)).resize((w * scale, h * scale), Image.NEAREST), (0, 28))
        draw, line = ImageDraw.Draw(img), ""
        lines = []
        for word in text.split():  # wrap to the frame's width
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > w * scale - 8:
                lines.append(line)
                trial = word
            line = trial
        lines.append(line)
        for i, ln in enumerate(lines[:2]):
            draw.text((4, 2 + 12 * i), ln, fill=(255, 255, 255), font=font)
        out.append(np.asarray(img))
    return out


def _transition_table(transitions: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown matrix: rows = the subtask a chain had just done ("(start)" first), columns = the one it tried
    next, cells = failures / attempts."""
    cols = sorted({t for row in transitions.values() for t in row})
    rows = sorted(transitions, key=lambda r: (r != "(start)", r))
    lines = ["| after \\ next | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = transitions[r].get(c)
            cells.append("" if v is None else f"{v['failures']}/{v['attempts']} failed")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return lines


def write_report(out: Path, summary: dict[str, Any] | None = None) -> Path:
    """report.md from `summary`, by default read back from out/results.json: every number in the report is one
    results.json holds."""
    if summary is None:
        summary = json.loads((Path(out) / "results.json").read_text())
    s, run = summary["suite"], summary["run"]
    lines = [f"# Evaluation of `{summary['checkpoint']}` on `{s['name']}`", "",
             f"suite `{s['source']}` · {s['simulator']} · policy {summary['policy']}"
             + (f" · sampler {summary['sampler']} × {summary['num_inference_steps']} steps · "
                f"{summary['n_action_steps']} actions per chunk" if summary.get("sampler") else "")
             + f" · {run['num_envs']} envs on {run['workers']} workers · {run['wall_time_s']} s "
             f"({run['env_steps']} env steps, {run['env_steps_per_s']}/s)", "",
             "Intervals are Wilson 95% score intervals.", ""]
    if summary["kind"] == "tasks":
        lines += ["| task | instruction | success | 95% CI | successes | mean steps | ms / chunk |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for task, r in summary["tasks"].items():
            lines.append(f"| {task} | {r['instruction']} | {_pct(r['success_rate'])} | {_ci(r['ci95'])} | "
                         f"{r['successes']}/{r['episodes']} | {_num(r['mean_steps'])} | {_num(r['ms_per_chunk'])} |")
        p = summary["pooled"]
        rated = [t for t, r in summary["tasks"].items() if r["success_rate"] is not None]
        unrated = [t for t in summary["tasks"] if t not in rated]
        lines += ["", f"**Mean success over {len(rated)} task(s): {_pct(summary['success_rate'])}** "
                  + (f"({', '.join(unrated)}: no valid episode, left out) " if unrated else "")
                  + f"(all {p['episodes']} episodes pooled: {_pct(p['success_rate'])}, 95% CI {_ci(p['ci95'])})", ""]
    else:
        length = s["chain_length"]
        lines += [f"{s['chains']} chains of {length} subtasks in one scene each, without reset; a chain stops at "
                  "its first failure. Success at length k: chains whose first k subtasks all succeeded.", "",
                  "| policy | " + " | ".join(str(k) for k in range(1, length + 1)) + " | avg. completed |",
                  "|---|" + "---:|" * (length + 1)]
        for who, m in summary["chains"].items():
            cells = [f"{_pct(v['success_rate'])} {_ci(v['ci95'])}" for v in m["success_at_length"].values()]
            label = summary["policy"] if who == "policy" else "scripted expert (upper bound)"
            ci = m.get("avg_completed_ci95")
            ci = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            lines.append(f"| {label} | " + " | ".join(cells) + f" | **{_avg(m['avg_completed'])}**{ci} |")
        for who, m in summary["chains"].items():
            lines += ["", f"Per scene ({who}):", "", "| scene | chains | avg. completed | full chain |",
                      "|---|---:|---:|---:|"]
            for scene, v in m["per_scene"].items():
                full = v["success_at_length"][str(length)]
                lines.append(f"| {scene} | {v['chains']} | {_avg(v['avg_completed'])} | {_pct(full['success_rate'])} |")
            if m.get("transitions"):
                lines += ["", f"Where chains break ({who}): failures / attempts of each subtask (column) after the "
                          "one before it (row; (start) = the chain's first subtask).", ""]
                for scene, v in m["per_scene"].items():
                    if v.get("transitions"):
                        lines += [f"*{scene}*", "", *_transition_table(v["transitions"]), ""]
            if m["satisfied_at_start"]:
                lines.append(f"\nNote: {m['satisfied_at_start']} subtask(s) already passed their check on the "
                             "carried state (counted as completed, as the simulator says).")
        lines += ["", "| task | instruction | attempts | success | 95% CI |", "|---|---|---:|---:|---:|"]
        for task, r in summary["tasks"].items():
            lines.append(f"| {task} | {r['instruction']} | {r['episodes']} | {_pct(r['success_rate'])} | "
                         f"{_ci(r['ci95'])} |")
        lines.append("")
    if run["crashes"]:
        lines += ["## Env worker crashes", "",
                  f"{len(run['crashes'])} crash(es); affected episodes were re-run, none counted as failures.", "",
                  "| worker | exit code | episode (key, seed) | step | what happened |", "|---|---:|---|---:|---|"]
        for c in run["crashes"]:
            where = f"{c['key']}, {c['seed']}" if c["job"] is not None else "-"
            step = f"{c.get('at_step', '-')}" + (" (replaying)" if c.get("during") == "replay" else "")
            lines.append(f"| {c['worker']} | {c['exitcode']} | {where} | {step} | {c['action']}; "
                         f"re-ran episodes {c['rerun_jobs']} |")
        lines.append("")
    if run["errors"]:
        lines += [f"**{len(run['errors'])} episode(s) errored and are excluded from every rate** "
                  "(see results.json `run.errors`).", ""]
    if summary.get("plot"):
        lines += [f"![success]({Path(summary['plot']).name})", ""]
    if summary.get("videos"):
        lines += ["Videos: " + ", ".join(f"`{Path(v).name}`" for v in summary["videos"]), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def log_wandb(out: Path, summary: dict[str, Any], project: str | None = None) -> None:
    """Tables (per task; per chain length) and the plot into wandb: into the active run (training-time use), or
    into a run of its own when `project` is given (eval.py wandb=PROJECT; WANDB_MODE decides, offline default)."""
    import os

    if project is None:
        try:
            import wandb
        except ImportError:
            return
        if getattr(wandb, "run", None) is None:
            return
        run, own = wandb.run, False
    else:
        import wandb

        run = wandb.init(project=project, mode=os.environ.get("WANDB_MODE", "offline"), dir=str(out),
                         job_type="eval", config={k: summary[k] for k in ("checkpoint", "policy", "suite")})
        own = True
    name = summary["suite"]["name"]
    table = wandb.Table(columns=["task", "instruction", "success_rate", "ci_low", "ci_high", "episodes"])
    for task, r in summary["tasks"].items():
        table.add_data(task, r["instruction"], r["success_rate"], r["ci95"][0], r["ci95"][1], r["episodes"])
    data = {f"eval/{name}/tasks": table, f"eval/{name}/success_rate": summary["success_rate"]}
    for who, m in (summary.get("chains") or {}).items():
        chain_table = wandb.Table(columns=["length", "success_rate", "ci_low", "ci_high"])
        for k, v in m["success_at_length"].items():
            chain_table.add_data(int(k), v["success_rate"], v["ci95"][0], v["ci95"][1])
        data[f"eval/{name}/chains_{who}"] = chain_table
        data[f"eval/{name}/avg_completed_{who}"] = m["avg_completed"]
    if summary.get("plot"):
        data[f"eval/{name}/plot"] = wandb.Image(summary["plot"])
    run.log(data)
    if own:
        run.finish()


def write_outputs(out: Path, summary: dict[str, Any], results: list, wandb_project: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    videos, seen = [], {}
    for r in results:
        if r.frames:
            i = seen[r.job.key] = seen.get(r.job.key, -1) + 1
            frames = r.frames
            if summary["kind"] == "chains":  # the whole chain, each frame captioned with the instruction it follows
                from robodit.envs.metaworld_chains import ChainEpisode

                subs = ChainEpisode.frame_subtasks(r.steps, len(frames))
                frames = caption_frames(frames, [f"{k + 1}/{len(r.job.tasks)}: "
                                                 f"{summary['tasks'][r.job.tasks[k]]['instruction']}" for k in subs])
            key = r.job.key.replace("/", "-")  # LIBERO tasks are "<suite>/<task>"
            name = f"{key}_ep{i:03d}.mp4" if summary["kind"] == "tasks" else f"chain_{key}_{i:03d}.mp4"
            write_video(out / name, frames, fps=max(1, round(summary["run"].get("video_fps", 20))))
            videos.append(str(out / name))
    summary["videos"] = videos
    summary["plot"] = str(plot_success(out / "success.png", summary))
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    write_report(out)  # from the file just written
    log_wandb(out, summary, wandb_project)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def console_summary(summary: dict[str, Any], out_dir) -> str:
    """The few lines eval.py prints: the headline rate(s) and where the files are."""
    lines = []
    if summary["kind"] == "chains":
        s = summary["suite"]
        lines.append(f"full-chain success: {_pct(summary['success_rate'])} over {s['chains']} chains of "
                     f"{s['chain_length']} [{s['name']}]")
        for who, m in summary["chains"].items():
            rates = " ".join(_pct(v["success_rate"]) for v in m["success_at_length"].values())
            lines.append(f"  chains ({who}): success at length 1..{len(m['success_at_length'])}: {rates}; "
                         f"avg completed {_avg(m['avg_completed'])}")
    else:
        per = summary["episodes_per_task"]
        per = f"{per} episodes" if isinstance(per, int) else f"{min(per.values())}-{max(per.values())} episodes"
        rated = sum(r["success_rate"] is not None for r in summary["tasks"].values())
        over = f"{rated} of {len(summary['tasks'])}" if rated < len(summary["tasks"]) else f"{rated}"
        lines.append(f"success rate: {_pct(summary['success_rate'])} (mean over {over} task(s); {per} x "
                     f"{len(summary['tasks'])} task(s), {summary['pooled']['episodes']} valid) "
                     f"[{summary['suite']['name']}]")
        for task, r in summary["tasks"].items():
            lines.append(f"  {task}: {_pct(r['success_rate'])} {_ci(r['ci95'])}  ({_num(r['ms_per_chunk'])} ms per chunk)")
        suite = summary["suite"]
        if suite.get("simulator") == "libero":  # a LIBERO run's numbers only compare at the initial states that ran
            seeds = sorted({x for r in summary["tasks"].values() for x in r.get("seeds") or []})
            if seeds:
                lines.append(f"LIBERO protocol: fixed initial states {seeds[0]}..{seeds[-1]} of each task "
                             f"({len(seeds)} per task; the published numbers use all 50), 10 no-op settle steps, "
                             f"at most {suite.get('max_steps')} steps")
    run = summary["run"]
    if summary.get("training_seeds"):
        lines.append(f"warning: {len(summary['training_seeds'])} evaluation seed(s) are seeds the training demos "
                     "were collected from (not held out)")
    if summary.get("untrained_tasks"):
        lines.append(f"warning: not trained on {', '.join(summary['untrained_tasks'])}")
    if run["crashes"] or run["errors"]:
        lines.append(f"env worker crashes: {len(run['crashes'])} (episodes re-run); "
                     f"errored episodes (excluded): {len(run['errors'])}")
    lines.append(f"report: {out_dir}/report.md  results: {out_dir}/results.json  plot: {summary['plot']}")
    if summary["videos"]:
        more = len(summary["videos"]) - 1
        lines.append(f"video: {summary['videos'][0]}" + (f" (+{more} more in {out_dir})" if more else ""))
    return "\n".join(lines)

