"""What every converter shares: feature -> key mapping, the resume ledger, and the episode loop.

A converter is a `Source` (format-specific reading, one episode at a time) handed to `convert`, which maps
source features to store keys, prints the mapping, and appends episodes to a DemoStore in order. Memory is
bounded by one episode (plus whatever file the source keeps open).

Resume: the store's `env` attr holds a ledger per source (`env["converted_from"]`): which source episodes
are in the store, and a `pending` record written *before* each append. An append is committed by the store
atomically; on re-open, `pending` tells whether the episode that was being written made it (the store has
one more episode than the ledger counts) or not. So a killed conversion never skips nor duplicates one.
"""

from __future__ import annotations

import abc

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robodit.keys import safe_key  # noqa: F401 - converters import it from here



class ConvertError(ValueError):
    """Bad or missing input; the message names the file, feature or episode at fault."""


@dataclass(frozen=True)
class Feature:
    name: str  # the source's name, e.g. "observation.images.top" or "obs/agentview_image"
    shape: tuple[int, ...]  # per frame, as stored (images H, W, C)
    dtype: np.dtype  # as stored
    kind: str = "array"  # "array" | "image" (frames in the table/file) | "video" (frames in an mp4)


@dataclass
class Episode:
    arrays: dict[str, np.ndarray]  # source feature name -> [T, ...]
    task: str
    instruction: str | None = None
    several_tasks: bool = False  # the source labels frames with more than one task (we keep the first)


class Source(abc.ABC):
    """One dataset being read. Subclasses fill the attributes and implement `episode_ids`/`read_episode`."""

    format: str = ""
    version: str = ""
    path: Path
    fps: float = 0.0
    robot: str = "unknown"
    features: dict[str, Feature]
    unstorable: list[str]  # features that cannot become store keys (strings, ...), shown in the mapping

    @abc.abstractmethod
    def default_key(self, feature: Feature) -> str | None:
        ...

    @abc.abstractmethod
    def episode_ids(self) -> list[int]:
        ...

    def num_frames(self) -> int | None:
        return None

    @abc.abstractmethod
    def read_episode(self, ep: int, names: list[str]) -> Episode:
        """The arrays of features `names` (time-major) with the episode's task and instruction."""

    def close(self) -> None:
        pass


def parse_map(items: Iterable[str] | None) -> dict[str, str]:
    """`--map KEY=FEATURE` items -> {key: feature}."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, feature = item.partition("=")
        key, feature = key.strip(), feature.strip()
        if not sep or not key or not feature:
            raise ConvertError(f"--map {item!r}: expected KEY=FEATURE, e.g. state=observation.state")
        if safe_key(key) != key:
            raise ConvertError(f"--map {item!r}: store key {key!r} must match [A-Za-z0-9_]+")
        if key in out:
            raise ConvertError(f"--map: key {key!r} given twice ({out[key]!r} and {feature!r})")
        out[key] = feature
    return out


def resolve_mapping(source: Source, overrides: dict[str, str], drop: Iterable[str] = ()) -> dict[str, str]:
    """{store key: source feature}: the source's defaults, then `overrides` (a feature mapped by an override
    loses its default key), minus dropped features. Errors name the unknown feature or the clashing keys."""
    drop = set(drop)
    for name in [*overrides.values(), *drop]:
        if name not in source.features:
            why = " (it holds no numbers)" if name in source.unstorable else ""
            raise ConvertError(f"unknown feature {name!r}{why}; {source.path} has: {sorted(source.features)}")
    taken = set(overrides.values())
    mapping: dict[str, str] = {}
    for name, feat in source.features.items():
        key = None if name in taken or name in drop else source.default_key(feat)
        if key is None:
            continue
        if key in mapping:
            raise ConvertError(f"features {mapping[key]!r} and {name!r} both map to key {key!r}; "
                               f"rename one with --map KEY=FEATURE")
        mapping[key] = name
    for key, name in overrides.items():
        if key in mapping and mapping[key] not in taken:
            del mapping[key]  # an override takes the key from the default that had it
        mapping[key] = name
    if "action" not in mapping:
        raise ConvertError(f"no feature maps to 'action'; name one with --map action=FEATURE "
                           f"(features: {sorted(source.features)})")
    return dict(sorted(mapping.items(), key=lambda kv: (kv[0] == "action", kv[0])))


def format_mapping(source: Source, mapping: dict[str, str]) -> str:
    rows = [(name, key, str(list(source.features[name].shape)),
             f"{source.features[name].dtype}" + (f" ({source.features[name].kind})"
                                                 if source.features[name].kind != "array" else ""))
            for key, name in mapping.items()]
    w = [max(len(r[i]) for r in rows + [("feature", "key", "shape", "")]) for i in range(3)]
    lines = [f"  {'feature':<{w[0]}}  ->  {'key':<{w[1]}}  {'shape':<{w[2]}}  dtype"]
    lines += [f"  {a:<{w[0]}}  ->  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows]
    unused = [n for n in source.features if n not in mapping.values()] + list(source.unstorable)
    if unused:
        lines.append(f"  not stored: {', '.join(unused)}  (add one with --map KEY=FEATURE)")
    return "\n".join(lines)


def _runs(ids: Iterable[int]) -> list[list[int]]:
    """Sorted ids as [start, stop) runs: a ledger of a million in-order episodes stays one pair."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def _ids(runs) -> set[int]:
    return {i for a, b in runs for i in range(int(a), int(b))}


class Ledger:
    """The per-source record in `store.env["converted_from"]` (see the module docstring)."""

    def __init__(self, store, source: Source, mapping: dict[str, str]):
        self.store = store
        env = dict(store.env)
        entries = [dict(e) for e in env.get("converted_from", [])]
        if len(store) and not entries:
            raise ConvertError(f"{store.path} already holds {len(store)} episodes that no conversion wrote "
                               f"(made by another command); use another --out")
        pending = env.get("convert_pending")
        counted = sum(len(_ids(e["episodes"])) for e in entries)
        if pending is not None and len(store) == int(pending["store_len"]) + 1 == counted + 1:
            entries[pending["source"]]["episodes"] = _runs(
                _ids(entries[pending["source"]]["episodes"]) | {int(pending["episode"])})
            counted += 1  # the append it announced was committed before the process stopped
        if counted != len(store):
            raise ConvertError(f"{store.path}: its conversion ledger counts {counted} episodes but the store "
                               f"holds {len(store)}; it was changed by something else; use another --out")
        ident = {"format": source.format, "path": str(Path(source.path).resolve())}
        found = [i for i, e in enumerate(entries) if {k: e.get(k) for k in ident} == ident]
        if found:
            self.index = found[0]
            old = entries[self.index].get("mapping")
            if old != mapping:
                raise ConvertError(f"{store.path} was converted from {source.path} with mapping {old}, not "
                                   f"{mapping}; use the same --map options, or another --out")
        else:
            entries.append({**ident, "version": source.version, "mapping": mapping, "episodes": []})
            self.index = len(entries) - 1
        self.entries = entries
        self.done = _ids(entries[self.index]["episodes"])
        self._write(None)

    def _write(self, pending) -> None:
        env = dict(self.store.env)
        env["converted_from"] = self.entries
        env["convert_pending"] = pending
        self.store.set_attr("env", env)

    def begin(self, ep: int) -> None:
        self._write({"source": self.index, "episode": int(ep), "store_len": len(self.store)})

    def commit(self, ep: int) -> None:
        self.done.add(int(ep))
        self.entries[self.index]["episodes"] = _runs(self.done)
        self._write(None)


def _check_arrays(arrays: dict[str, np.ndarray], mapping: dict[str, str], source: Source, ep: int) -> None:
    """Shape/dtype/length checks that name the source feature (the store's own checks name our key)."""
    lengths = {}
    for key, name in mapping.items():
        feat, a = source.features[name], arrays.get(name)
        where = f"episode {ep}, feature {name!r}"
        if a is None:
            raise ConvertError(f"{where}: missing from the source data")
        if a.shape[1:] != feat.shape:
            raise ConvertError(f"{where}: frames of shape {list(a.shape[1:])}, expected {list(feat.shape)}")
        if feat.dtype.kind != "f" and a.dtype != feat.dtype:
            raise ConvertError(f"{where}: dtype {a.dtype}, expected {feat.dtype}")
        if feat.dtype.kind == "f" and not np.isfinite(a).all():
            frame = int(np.argwhere(~np.isfinite(a.reshape(len(a), -1)))[0, 0])
            raise ConvertError(f"{where}: non-finite value (NaN/inf) at frame {frame}")
        lengths[name] = len(a)
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ConvertError(f"episode {ep}: features have different or zero lengths: {lengths}")


def convert(source: Source, out: str | Path, overrides: dict[str, str] | None = None, drop: Iterable[str] = (),
            limit: int | None = None, progress: bool = True, log=None, skip_bad: bool = False) -> dict:
    """Append every source episode not yet in the store at `out` (created if missing); returns a summary.

    `limit` converts at most that many new episodes (a partial run; re-run to continue). `skip_bad` leaves out
    an episode the checks refuse (NaN, missing or misshapen features, unreadable data), says which and why, and
    goes on: one corrupt demo need not stop a dataset. Nothing of a refused episode is written; a re-run tries
    it again. Without it the first bad episode stops the conversion (what came before stays stored).
    """
    from tqdm import tqdm

    from robodit.datasets.store import DemoStore

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    mapping = resolve_mapping(source, dict(overrides or {}), drop)
    nframes = source.num_frames()
    ids = source.episode_ids()
    log(f"convert {source.format}: {source.path} ({source.format} {source.version}, {len(ids)} episodes"
        + (f", {nframes} frames" if nframes is not None else "") + f", {source.fps:g} fps, "
        f"robot {source.robot!r})\n" + format_mapping(source, mapping))
    keys = {key: (source.features[name].shape, source.features[name].dtype) for key, name in mapping.items()}
    with DemoStore.open_or_create(out, keys, fps=source.fps, robot=source.robot) as store:
        ledger = Ledger(store, source, mapping)
        todo = [e for e in ids if e not in ledger.done]
        skipped = len(ids) - len(todo)
        if limit is not None:
            todo = todo[:max(0, int(limit))]
        if skipped:
            log(f"  resuming: {skipped} episodes already in {out}")
        frames, multi, rejected = 0, 0, []
        names = list(mapping.values())
        bar = tqdm(todo, desc=f"convert {source.format}", unit="ep", disable=not progress, file=sys.stderr)
        for ep in bar:
            try:
                episode = source.read_episode(ep, names)
                _check_arrays(episode.arrays, mapping, source, ep)
            except (ConvertError, ValueError, OSError, KeyError) as exc:
                if not skip_bad:
                    raise
                why = str(exc) if isinstance(exc, ConvertError) else f"episode {ep}: {type(exc).__name__}: {exc}"
                rejected.append({"episode": int(ep), "error": why})
                log(f"  skipped (--skip-bad): {why}")
                continue
            multi += int(episode.several_tasks)
            ledger.begin(ep)
            store.append_episode({key: episode.arrays[name] for key, name in mapping.items()},
                                 task=episode.task, instruction=episode.instruction)
            ledger.commit(ep)
            frames += len(episode.arrays[mapping["action"]])
        bar.close()
        total = len(store)
    summary = {"source": str(source.path), "format": f"{source.format} {source.version}", "out": str(out),
               "converted": len(todo) - len(rejected), "frames": frames, "skipped_existing": skipped,
               "remaining": len(ids) - skipped - len(todo), "total_episodes": total, "mapping": mapping,
               "episodes_with_several_tasks": multi, "rejected": rejected}
    note = f"; {multi} episodes had several tasks (the first frame's is kept)" if multi else ""
    if rejected:
        note += (f"; {len(rejected)} bad episode(s) left out: "
                 + ", ".join(str(r["episode"]) for r in rejected[:10]) + (", ..." if len(rejected) > 10 else ""))
    log(f"convert {source.format}: {summary['converted']} episodes ({frames} frames) -> {out} ({total} in store"
        + (f", {summary['remaining']} left: re-run to continue" if summary["remaining"] else "") + f"){note}")
    return summary
