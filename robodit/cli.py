"""`robodit collect | embed | info | convert | compare | serve | export | run`: all but training and evaluating.

Each sub-command lives in the module that owns its job; this file only parses arguments and dispatches,
so `robodit --help` stays fast (no torch / simulator import until a command runs).
"""

from __future__ import annotations

import argparse
import os
import sys


from robodit.errors import CLIError  # noqa: F401 - the old spelling `robodit.cli.CLIError` keeps working


def _cmd_collect(args: argparse.Namespace) -> None:
    if args.source == "metaworld/chains":  # the chain suite defines the scenes, cycles, step limit and seeds
        from robodit.datasets.collect_chains import chains_command
        from robodit.evaluation.suites import load_suite

        chains_command(args, load_suite(args.suite))
        return
    from robodit.datasets.collect import collect_command

    collect_command(args)


def _cmd_embed(args: argparse.Namespace) -> None:
    from robodit.datasets.language import embed_command

    embed_command(args)


def _cmd_info(args: argparse.Namespace) -> None:
    from robodit.training.info import is_checkpoint

    if is_checkpoint(args.path):
        import json

        from robodit.training.info import format_checkpoint, summarize_checkpoint

        summary = summarize_checkpoint(args.path, routes=args.routes)
        print(json.dumps(summary, indent=2) if args.json else format_checkpoint(summary))
        return
    if args.routes:
        raise CLIError(f"--routes is for checkpoints; {args.path} is not one")
    from robodit.deploy.exported import describe_export, is_exported

    if is_exported(args.path):
        print(describe_export(args.path, as_json=args.json))
        return
    from robodit.datasets.info import info_command

    info_command(args)


def _cmd_convert(args: argparse.Namespace) -> None:
    from robodit.datasets.convert import convert_command

    convert_command(args)


def _cmd_compare(args: argparse.Namespace) -> None:
    from robodit.evaluation.compare import compare_command

    compare_command(args)


def _cmd_serve(args: argparse.Namespace) -> None:
    from robodit.deploy.server import serve_command

    serve_command(args)


def _cmd_export(args: argparse.Namespace) -> None:
    from robodit.deploy.export import export_command

    export_command(args)


def _cmd_run(args: argparse.Namespace) -> None:
    from robodit.control.loop import run_command

    run_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robodit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="run a simulator's scripted expert and store successful demos")
    p.add_argument("source", help="SIMULATOR/TASK, e.g. metaworld/reach-v3, or a benchmark: metaworld/MT10, "
                   "libero/libero_object")
    p.add_argument("--episodes", type=int, default=None, help="successful episodes to keep")
    p.add_argument("--episodes-per-task", type=int, default=None, help="for a benchmark: episodes per task")
    p.add_argument("--language-fraction", type=float, default=None,
                   help="share of episodes that keep their instruction (templated paraphrases), rounded, at "
                        "least one per task when > 0; the rest are goal-image only (default: all keep it, one "
                        "sentence per task)")
    p.add_argument("--language-encoder", default="minilm",
                   help="embed the instructions into meta/lang_emb with this encoder ('' to skip)")
    p.add_argument("--out", required=True, help="path of the Zarr store (created, or appended to)")
    p.add_argument("--image-size", type=int, default=0, help="render cameras at this size (0: no images)")
    p.add_argument("--cameras", default=None, help="comma-separated camera names (with --image-size; default: "
                   "the simulator's: corner2 in Meta-World, image,image2 (agent view, wrist) in LIBERO)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="episode step limit (simulator default)")
    p.add_argument("--max-attempts", type=int, default=None, help="give up after this many rollouts")
    p.add_argument("--no-actions", action="store_true", help="store video-only episodes (has_actions=false)")
    g = p.add_argument_group("chains (source metaworld/chains: CALVIN-style play, one episode per subtask)")
    g.add_argument("--chains", type=int, default=None, help="chains the store ends with (a rerun resumes)")
    g.add_argument("--chain-length", type=int, default=5, help="subtasks per chain")
    g.add_argument("--scenes", default=None, help="comma-separated scenes of the suite (default: all of them)")
    g.add_argument("--suite", default="metaworld_chains", help="the chain suite whose scenes, cycles, step limit "
                                                             "and evaluation seeds the chains follow")
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("embed", help="cache a store's instruction embeddings (meta/lang_emb)")
    p.add_argument("store")
    p.add_argument("--encoder", default="minilm", help="language encoder (robodit.nn.language.ENCODERS)")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("info", help="summarise a demonstration store or a checkpoint")
    p.add_argument("path", help="a NAME.zarr store, a checkpoint dir, or a training out_dir (its latest checkpoint)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--routes", action="store_true",
                   help="checkpoints: load the weights and show MoDE's experts per sampling step and layer")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="convert a LeRobot dataset or a robomimic HDF5 file into a store")
    p.add_argument("format", choices=["lerobot", "robomimic"])
    p.add_argument("source", help="LeRobot dataset folder (v3.0/v2.1) or robomimic .hdf5 file")
    p.add_argument("--out", required=True, help="path of the Zarr store (created, or resumed)")
    p.add_argument("--map", action="append", metavar="KEY=FEATURE", help="store FEATURE as KEY (repeatable)")
    p.add_argument("--drop", action="append", metavar="FEATURE", help="do not store FEATURE (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="convert at most N more episodes")
    p.add_argument("--filter", default=None, help="robomimic: only demos of mask/FILTER (e.g. train)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out (and list) episodes with NaN / missing / misshapen data instead of stopping")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("compare", help="evaluations side by side: per-task success, seeds, a paired test")
    p.add_argument("results", nargs="+", metavar="RUN",
                   help="an eval out_dir or results.json, or LABEL=GLOB: a group of runs (e.g. one per seed)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--json", default=None, help="also write the comparison as JSON here")
    p.add_argument("--plot", default=None, help="also draw grouped bars with intervals into this PNG")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("serve", help="serve a checkpoint's policy over a websocket (token required)")
    p.add_argument("checkpoint", help="checkpoint directory or training out_dir")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; ws:// is unencrypted)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token", default=None, help="shared secret, >= 16 chars (default: $ROBODIT_TOKEN)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-clients", type=int, default=8)
    p.add_argument("--num-inference-steps", type=int, default=None, help="override the sampler's step count")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "aoti", "native"],
                   help="torch: a checkpoint; onnx / aoti / native: a directory written by `robodit export`")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("export", help="write a checkpoint's whole chunk computation as one ONNX / AOTInductor file "
                                      "(or, for a DiT, a condition graph plus a C denoising loop)")
    p.add_argument("checkpoint", help="checkpoint directory or training out_dir")
    p.add_argument("--out", required=True,
                   help="directory to write (policy.onnx, policy.pt2 or encoder.onnx + denoiser.safetensors; export.json)")
    p.add_argument("--format", default="onnx", choices=["onnx", "aoti", "native"],
                   help="native: DiT only, the denoising loop in C (compiled on first load; fastest for small DiTs)")
    p.add_argument("--sampler", default=None, help="override the sampler (a deterministic one: the noise is an input)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="override the (fixed) step count")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("run", help="drive a robot (or --dry-run a simulated one) with a policy in real time")
    p.add_argument("--policy", required=True, help="checkpoint directory, or ws://HOST:PORT of `robodit serve`")
    p.add_argument("--robot", required=True, help="robot config YAML (configs/robot/*.yaml)")
    p.add_argument("--strategy", choices=["receding", "ensemble", "async"], default=None,
                   help="chunk execution (default: the config's, else receding)")
    p.add_argument("--hz", type=float, default=None, help="control rate (default: the config's control_hz)")
    p.add_argument("--dry-run", action="store_true", help="a simulated robot shaped like the policy; no hardware")
    p.add_argument("--steps", type=int, default=200, help="control ticks to run")
    p.add_argument("--n-action-steps", type=int, default=None, help="actions executed per chunk (receding/async)")
    p.add_argument("--token", default=None, help="server token for a ws:// policy (default: $ROBODIT_TOKEN)")
    p.add_argument("--policy-timeout", type=float, default=30.0,
                   help="seconds to wait for a ws:// policy server's reply; past it the robot is e-stopped")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--task", default=None, help="task name for simulators")
    p.add_argument("--goal-task", default=None,
                   help="a multi-task policy's task by name (default: --task, when the policy was trained on it)")
    p.add_argument("--instruction", default=None, help="the instruction for a language-conditioned policy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="write per-step timing as JSON lines here")
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from robodit.datasets.store import StoreError

    try:
        args.func(args)
    except (CLIError, StoreError, FileNotFoundError, ValueError) as exc:
        print(f"robodit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `robodit info ... | head`: the reader left; say nothing more, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0
    return 0


if __name__ == "__main__":
    # `python -m robodit.cli`: dispatch through the importable module so CLIError is one class everywhere.
    from robodit.cli import main as _main

    sys.exit(_main())
