"""`robodit convert lerobot DIR | robomimic FILE.hdf5 --out STORE`: other formats into a DemoStore.

    from robodit.datasets.convert import convert_lerobot, convert_robomimic
    convert_lerobot("path/to/lerobot_dataset", "demos.zarr", overrides={"state": "observation.state"})

Both stream one episode at a time, print the feature -> key mapping, and resume (see common.py).
"""

from __future__ import annotations

from pathlib import Path

from robodit.datasets.convert.common import ConvertError, convert, parse_map

__all__ = ["ConvertError", "convert_lerobot", "convert_robomimic", "convert_command"]


def convert_lerobot(root: str | Path, out: str | Path, overrides: dict[str, str] | None = None, drop=(),
                    limit: int | None = None, progress: bool = True, log=None, skip_bad: bool = False) -> dict:
    from robodit.datasets.convert.lerobot import LeRobotSource

    source = LeRobotSource(root)
    try:
        return convert(source, out, overrides, drop, limit, progress, log, skip_bad=skip_bad)
    finally:
        source.close()


def convert_robomimic(path: str | Path, out: str | Path, overrides: dict[str, str] | None = None, drop=(),
                      limit: int | None = None, filter_key: str | None = None, progress: bool = True,
                      log=None, skip_bad: bool = False) -> dict:
    from robodit.datasets.convert.robomimic import RobomimicSource

    source = RobomimicSource(path, filter_key=filter_key)
    try:
        return convert(source, out, overrides, drop, limit, progress, log, skip_bad=skip_bad)
    finally:
        source.close()


def convert_command(args) -> None:
    """CLI entry (`robodit convert`); ConvertError is a ValueError, which the CLI prints as one line."""
    kw = dict(overrides=parse_map(args.map), drop=args.drop or (), limit=args.limit, progress=True,
              skip_bad=getattr(args, "skip_bad", False))
    if args.format == "lerobot":
        convert_lerobot(args.source, args.out, **kw)
    else:
        convert_robomimic(args.source, args.out, filter_key=args.filter, **kw)
