"""`bottleneck` command line: parse, check before any work, connect to Ray, call the library.

Exit codes: 0 done; 1 the job ran but left work undone (failed shards: rerun to resume);
2 bad arguments, a missing INPUT, an unwritable OUTPUT or a settings conflict (no work done).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2


def _storage_options(text: str | None) -> dict:
    from .storage import parse_storage_options

    try:
        return parse_storage_options(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray address (default: $RAY_ADDRESS, else a running local head, "
                        "else a local Ray started for the job)")
    p.add_argument("--storage-options", type=_storage_options, default={}, metavar="JSON",
                   help="JSON object handed to fsspec, e.g. '{\"anon\": true}' "
                        "(default: the standard AWS variables and config)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no live progress bar")


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="images → Parquet VGG16 bottleneck features",
                       description="Turn INPUT/<label>/<images> into Parquet bottleneck features "
                                   "in OUTPUT, on a pool of Ray actors.")
    p.add_argument("input", metavar="INPUT", help="folder or fsspec URL (s3://bucket/prefix)")
    p.add_argument("output", metavar="OUTPUT", help="folder or fsspec URL for the Parquet dataset")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet | random[:SEED] | path or URL of a .h5 / .weights.h5 file "
                        "(default: imagenet)")
    p.add_argument("--image-size", type=int, default=224, help="square input side, >= 32 (default: 224)")
    p.add_argument("--interpolation", default="bilinear", choices=["nearest", "bilinear", "bicubic"],
                   help="resize filter (default: bilinear; nearest matches flow_from_directory)")
    p.add_argument("--pooling", default="none", choices=["none", "avg", "max"],
                   help="none: H×W×512 features; avg/max: 512 (default: none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="stored feature type (default: float32)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default: 32)")
    p.add_argument("--shard-size", type=int, default=256,
                   help="images per shard and Parquet file (default: 256)")
    p.add_argument("--actors", type=int, default=None,
                   help="extractor actors (default: one per GPU; on CPUs, one per 8 cores)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs each actor reserves (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="TensorFlow threads per actor (default: the CPUs the actor reserves)")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="decode large JPEGs at reduced scale (faster; fidelity in README)")
    p.add_argument("--xla", action="store_true", help="compile the conv base with XLA")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="tries per shard before it is reported as failed (default: 3)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an OUTPUT made with other settings or another INPUT")
    _add_common(p)
    p.set_defaults(func=cmd_extract)


def cmd_extract(args: argparse.Namespace) -> int:
    from .extract import ExtractOptions, UsageError, check_extract, run_extract
    from .manifest import OutputConflict

    o = ExtractOptions(
        input=args.input, output=args.output, weights=args.weights, image_size=args.image_size,
        interpolation=args.interpolation, pooling=args.pooling, dtype=args.dtype,
        batch_size=args.batch_size, shard_size=args.shard_size, actors=args.actors,
        gpus_per_actor=args.gpus_per_actor, threads=args.threads, address=args.address,
        storage_options=args.storage_options, overwrite=args.overwrite,
        jpeg_draft=args.jpeg_draft, xla=args.xla, max_attempts=args.max_attempts,
        progress=args.progress)
    try:
        checked = check_extract(o)
        summary = run_extract(o, checked)
    except (UsageError, OutputConflict) as e:
        return _fail(e)
    print("\n".join(summary.lines()))
    return EXIT_OK if summary.ok else EXIT_INCOMPLETE


def _fail(e: BaseException, code: int = EXIT_USAGE) -> int:
    print(f"bottleneck: error: {e}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bottleneck",
        description="VGG16 bottleneck features on Ray, and a classifier trained on them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_extract(sub)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Other modules add their subcommands here (train, evaluate, predict, benchmark, demo).
_EXTRA_COMMANDS: list = []


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
