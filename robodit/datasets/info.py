"""`robodit info PATH [--json]`: summarise a demonstration store (what is in it, and what it costs on disk).

The summary is built once as a plain dict so the text and `--json` outputs can never disagree.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from robodit.datasets.store import DemoStore


def summarize(store: DemoStore) -> dict:
    """Everything `info` reports, as JSON-ready values."""
    lengths = np.diff(store.episode_ends, prepend=0) if len(store) else np.zeros(0, np.int64)
    tasks = []
    for t, task in enumerate(store.tasks):
        mine = store.episode_task == t
        tasks.append({"name": task["name"], "episodes": int(mine.sum()),
                      "with_language": int((mine & store.episode_has_language).sum()),
                      "instructions": len(task["instructions"])})
    stored, raw = store.nbytes_stored(), store.nbytes_uncompressed()
    lang = store.language_embeddings()
    return {
        "path": str(store.path),
        "format": store.attrs["format"],
        "version": store.attrs["version"],
        "robot": store.robot,
        "fps": store.fps,
        "env": store.env,
        "episodes": len(store),
        "episodes_with_actions": int(store.episode_has_actions.sum()),
        "episodes_with_language": int(store.episode_has_language.sum()),
        # collection seeds: one per committed episode (meta/episode_seed), and the attempts that failed
        "seeds": {"episodes_with_seed": int((store.episode_seed >= 0).sum()), "used": len(store.seeds_used),
                  "failed": len(store.env.get("seeds_failed") or [])},
        "frames": {"total": store.num_frames,
                   "min": int(lengths.min()) if len(lengths) else 0,
                   "mean": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
                   "max": int(lengths.max()) if len(lengths) else 0},
        "keys": {k: {"shape": list(shape), "dtype": dtype.name, "chunk_frames": int(store.array(k).chunks[0])}
                 for k, (shape, dtype) in sorted(store.keys.items())},
        "tasks": tasks,
        "language_embeddings": None if lang is None else {
            "encoder": lang[0], "instructions": len(lang[1]),
            "dim": len(next(iter(lang[1].values()))) if lang[1] else 0,
            "missing": len(set(store.instructions()) - set(lang[1]))},
        "bytes_on_disk": stored,
        "bytes_uncompressed": raw,
        "compression_ratio": round(raw / stored, 2) if stored else None,
        # None: a store from before chunks were always written cannot be checked
        "missing_chunks": store.missing_chunks() if store.attrs.get("chunks_complete") else None,
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def format_summary(s: dict) -> str:
    f = s["frames"]
    lines = [
        f"path:       {s['path']}",
        f"format:     {s['format']} version {s['version']}",
        f"robot:      {s['robot']}",
        f"fps:        {s['fps']:g}",
        f"env:        {json.dumps(s['env'], sort_keys=True)}",
        f"episodes:   {s['episodes']} ({s['episodes_with_actions']} with actions, "
        f"{s['episodes_with_language']} with language)",
        f"frames:     {f['total']} total; episode length min {f['min']} / mean {f['mean']:.1f} / max {f['max']}",
        "keys:",
    ]
    width = max((len(k) for k in s["keys"]), default=0)
    for k, v in s["keys"].items():
        shape = "(" + ", ".join(map(str, v["shape"])) + ("," if len(v["shape"]) == 1 else "") + ")"
        lines.append(f"  {k:<{width}}  {v['dtype']:<8} {shape:<14} chunk {v['chunk_frames']} frames")
    seeds = s.get("seeds") or {}
    if seeds.get("used") or seeds.get("failed"):
        lines.append(f"seeds:      {seeds['episodes_with_seed']} episode(s) with their collection seed; "
                     f"{seeds['used']} seed(s) used, {seeds['failed']} failed attempt(s)")
    lines.append("tasks:" if s["tasks"] else "tasks:      (none)")
    width = max((len(t["name"]) for t in s["tasks"]), default=0)
    for t in s["tasks"]:
        lines.append(f"  {t['name']:<{width}}  {t['episodes']} episodes, {t['with_language']} with language, "
                     f"{t['instructions']} instructions")
    lang = s.get("language_embeddings")
    if lang:
        lines.append(f"language:   meta/lang_emb from {lang['encoder']!r}: {lang['instructions']} instruction(s) x "
                     f"{lang['dim']}" + (f", {lang['missing']} instruction(s) not embedded" if lang["missing"] else ""))
    missing = s.get("missing_chunks")
    if missing:
        lines.append(f"DAMAGED:    {sum(map(len, missing.values()))} chunk(s) of committed frames missing (read as "
                     f"zeros): " + "; ".join(f"{k} chunks {v[:5]}" for k, v in missing.items()))
    ratio = f"{s['compression_ratio']:.2f}x" if s["compression_ratio"] else "n/a"
    lines.append(f"bytes:      {_size(s['bytes_on_disk'])} on disk ({s['bytes_on_disk']}), "
                 f"{_size(s['bytes_uncompressed'])} uncompressed ({s['bytes_uncompressed']}); "
                 f"compression ratio {ratio}")
    return "\n".join(lines)


def info_command(args: argparse.Namespace) -> None:
    """Print the summary of the store at args.path (StoreError, caught by the CLI, if it is not one)."""
    with DemoStore.open(args.path, "r") as store:
        summary = summarize(store)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
