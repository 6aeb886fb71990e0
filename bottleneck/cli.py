"""`bottleneck` command line: parse, check before any work, connect to Ray, call the library.

Exit codes: 0 done; 1 the job ran but left work undone (failed shards, or a lost OUTPUT
lock: rerun to resume); 2 bad arguments, a missing INPUT, an unwritable OUTPUT, a settings
conflict, an unreachable Ray address (every `errors.UsageError`: no work done).
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


def _decode_workers(text: str) -> int | None:
    if text == "auto":
        return None
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"must be 'auto' or a whole number >= 0, not {text!r}")
    return int(text)


def _add_decode_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decode-workers", type=_decode_workers, default=None, metavar="N|auto",
                   help="CPU-only Ray actors (1 CPU, 3 threads each) that read and decode for "
                        "the model actors, anywhere in the cluster; 0: the model actors decode "
                        "on their own nodes. auto: on when the GPU nodes up have fewer than 8 "
                        "cores per GPU and the CPU-only nodes have more cores than they do "
                        "(README, GPUs) (default: auto)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray address, or 'local' for a private Ray (default: $RAY_ADDRESS, "
                        "else the head `ray start` runs on this machine, else a private Ray "
                        "for this job)")
    p.add_argument("--storage-options", type=_storage_options, default={}, metavar="JSON",
                   help="JSON object handed to fsspec, e.g. '{\"anon\": true}' "
                        "(default: the standard AWS variables and config)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no live progress bar")


def _add_input(p: argparse.ArgumentParser) -> None:
    """How INPUT is read: the same for every sharded job."""
    g = p.add_argument_group("INPUT")
    g.add_argument("--input-format", default="auto",
                   choices=["auto", "folder", "list", "inventory", "webdataset", "parquet"],
                   help="auto: a brace pattern, a .tar or a folder of .tar files is WebDataset; "
                        "a .parquet file with an image column, or a folder of .parquet files "
                        "and no images, Parquet tables of images; a manifest.json an S3 "
                        "Inventory report; a .parquet/.csv/.jsonl file a list of paths "
                        "(column `path`, optional `label`); anything else a folder of images "
                        "(default: auto)")
    g.add_argument("--list-requests", type=int, default=None, metavar="N",
                   help="listing requests in flight (default: 64 on object stores, 16 on "
                        "a local disk)")
    g.add_argument("--relist", action="store_true",
                   help="list INPUT again: new files become new shards, vanished ones are "
                        "named; without it a rerun reads the plan in OUTPUT and lists nothing")
    g.add_argument("--prefix", default=None,
                   help="for an inventory report: keep the keys under this prefix; labels "
                        "are their first folder below it (default: every key)")
    g.add_argument("--label-field", default=None, metavar="FIELD",
                   help="for WebDataset tars: the label is this field of KEY.json "
                        "(default: the text of KEY.cls, when present)")
    g.add_argument("--image-column", default=None, metavar="NAME",
                   help="for Parquet tables: the column of encoded images (default: the "
                        "Hugging Face Image column, or the only binary column)")
    g.add_argument("--label-column", default=None, metavar="NAME",
                   help="for Parquet tables: the label column; integer labels take their "
                        "names from the Hugging Face ClassLabel metadata (default: `label`)")


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="images → Parquet VGG16 bottleneck features",
                       description="Turn INPUT/<label>/<images> into Parquet bottleneck features "
                                   "in OUTPUT, on a pool of Ray actors.")
    p.add_argument("input", metavar="INPUT",
                   help="folder or fsspec URL (s3://bucket/prefix) of images or of WebDataset "
                        ".tar shards, a brace pattern of tars (s3://b/{00000..00099}.tar), a "
                        "Parquet table of images, a list file, or an S3 Inventory manifest.json")
    p.add_argument("output", metavar="OUTPUT", help="folder or fsspec URL for the Parquet dataset")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet | random[:SEED] | path or URL of a .h5 / .weights.h5 file "
                        "(default: imagenet)")
    p.add_argument("--image-size", type=int, default=224,
                   help="square input side, >= 32 (default: 224)")
    p.add_argument("--interpolation", default="bilinear",
                   choices=["nearest", "bilinear", "bicubic"],
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
    _add_decode_workers(p)
    p.add_argument("--jpeg-draft", action="store_true",
                   help="decode large JPEGs at reduced scale (faster; fidelity in README)")
    p.add_argument("--precision", default="float32",
                   choices=["float32", "mixed_bfloat16", "mixed_float16"],
                   help="conv base compute precision; mixed is faster on GPUs and AMX CPUs, "
                        "and changes the features (fidelity in README) (default: float32)")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="tries per shard before it is reported as failed (default: 3)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an OUTPUT made with other settings or another INPUT")
    _add_input(p)
    _add_common(p)
    p.set_defaults(func=cmd_extract)


def _options(args: argparse.Namespace, *positional: str) -> dict:
    """The parsed options as the API's keywords (their names are the same)."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", *positional)}


def cmd_extract(args: argparse.Namespace) -> int:
    from . import api
    from .runner.memory import configure_driver

    configure_driver()

    summary = api.extract(args.input, args.output, **_options(args, "input", "output"))
    print("\n".join(summary.lines()))
    return EXIT_OK if summary.ok else EXIT_INCOMPLETE


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the dense head on FEATURES, export the classifier",
                       description="Train Flatten → Dense → Dropout → softmax on Parquet "
                                   "bottleneck features (one Ray task), evaluate it, and write "
                                   "the head, the full classifier, metrics and plots to MODEL_DIR.")
    p.add_argument("features", metavar="FEATURES", help="feature dataset from `bottleneck extract`")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder or fsspec URL for the model")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--validation", metavar="FEATURES_VAL", default=None,
                     help="a separate validation feature dataset")
    val.add_argument("--validation-split", type=float, default=None,
                     help="fraction held out by a hash of each path (default: 0.2)")
    p.add_argument("--hidden", type=int, default=256, help="hidden units (default: 256)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout rate (default: 0.5)")
    p.add_argument("--optimizer", default="rmsprop", choices=["rmsprop", "adam", "sgd"],
                   help="(default: rmsprop)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="(default: 0.001)")
    p.add_argument("--epochs", type=int, default=50, help="(default: 50)")
    p.add_argument("--batch-size", type=int, default=16, help="(default: 16)")
    p.add_argument("--seed", type=int, default=0,
                   help="initialisation and shuffling seed (default: 0)")
    p.add_argument("--early-stopping", type=int, default=None, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a better val_loss (default: off)")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="do not standardize the features (the 2017 recipe; learns far worse)")
    p.add_argument("--shuffle-buffer", type=int, default=1024,
                   help="rows held for shuffling; memory is about this × row size (default: 1024)")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="write TensorBoard logs there, a folder or bucket prefix (default: none)")
    p.add_argument("--export", action="append", default=[], choices=["saved_model"],
                   help="also write the classifier for serving: saved_model (a TensorFlow "
                        "SavedModel in MODEL_DIR/saved_model/); repeatable (default: none)")
    p.add_argument("--weights", default=None,
                   help="the weights file the features were made with, if it moved since "
                        "(default: where their metadata says it was)")
    _add_common(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from . import api
    from .training import format_metrics

    options = _options(args, "features", "model_dir")
    options["verbose"] = 2 if options.pop("progress") else 0  # a line per epoch, or none
    metrics = api.train(args.features, args.model_dir, **options).metrics
    if metrics.get("val_accuracy") is not None:
        print(format_metrics(metrics))
    print(f"model: {args.model_dir}")
    return EXIT_OK


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a trained head on a labelled feature dataset")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("features", metavar="FEATURES")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--storage-options", type=_storage_options, default={}, metavar="JSON")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import api
    from .training import dumps, format_metrics

    m = api.evaluate(args.model_dir, args.features, args.storage_options)
    print(dumps(m) if args.json else format_metrics(m))
    return EXIT_OK


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images with a trained MODEL_DIR")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("input", metavar="INPUT",
                   help="an image, a folder or fsspec URL of images, WebDataset tars or a "
                        "Parquet table of images, or a list file (as for extract)")
    p.add_argument("--output", default=None, metavar="PREDICTIONS.parquet",
                   help="write every prediction to Parquet (default: print a table)")
    p.add_argument("--top-k", type=int, default=1,
                   help="also store the K best classes (default: 1)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    p.add_argument("--shard-size", type=int, default=256, help="(default: 256)")
    p.add_argument("--actors", type=int, default=None, help="(default: as extract)")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="(default: as extract)")
    _add_decode_workers(p)
    p.add_argument("--max-attempts", type=int, default=3, help="(default: 3)")
    _add_input(p)
    _add_common(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from .runner.memory import configure_driver

    configure_driver()  # before anything imports pyarrow
    from . import api
    from .prediction.job import format_rows, header

    printed = False

    def show(table: object) -> None:  # each shard's predictions as it finishes
        nonlocal printed
        if not printed:
            print(header())
            printed = True
        print("\n".join(format_rows(table)), flush=True)

    s = api.predict(args.model_dir, args.input,
                    on_table=None if args.output else show, **_options(args, "model_dir", "input"))
    if s.output:
        print(f"{s.rows} predictions written to {s.output}" if s.ok else
              f"{s.output} not written: shards failed")
    for path, reason in s.errors[:20]:
        print(f"unreadable: {path}: {reason}", file=sys.stderr)
    if len(s.errors) > 20:
        print(f"… and {len(s.errors) - 20} more unreadable", file=sys.stderr)
    for i, err in sorted(s.failed.items()):
        print(f"FAILED shard {i}: {err}; rerun the same command to retry", file=sys.stderr)
    return EXIT_OK if s.ok else EXIT_INCOMPLETE


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what a features OUTPUT, a MODEL_DIR or a predictions "
                                    "file holds, and whether it is finished")
    p.add_argument("path", metavar="PATH", help="folder, file or fsspec URL")
    p.add_argument("--json", action="store_true", help="print it as one JSON object")
    p.add_argument("--storage-options", type=_storage_options, default={}, metavar="JSON")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from .info import describe, format_info

    info = describe(args.path, args.storage_options)
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_info(info))
    return EXIT_OK


DEMO = ("Writes real handwritten-digit images (shipped in scikit-learn), extracts features "
        "with a seeded random VGG16, trains the head, and classifies held-out images. No "
        "cluster, no download.")
BENCHMARK = ("Measures, on the same images: the conv base alone on in-memory tensors (the "
             "limit), the whole extract command, its steady state, and a Ray Data pipeline; "
             "prints img/s and ratios.")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole job on real digit images, on a local Ray",
                       description=DEMO)
    p.add_argument("workdir", nargs="?", default="demo-output", help="(default: ./demo-output)")
    p.add_argument("--per-class", type=int, default=60, help="images per digit (default: 60)")
    p.add_argument("--image-size", type=int, default=32, help="(default: 32)")
    p.add_argument("--weights", default="random", help="(default: random, seeded)")
    p.add_argument("--epochs", type=int, default=20, help="(default: 20)")
    p.add_argument("--address", default=None, help="(default: as extract)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import run_demo

    return run_demo(args.workdir, per_class=args.per_class, image_size=args.image_size,
                    weights=args.weights, epochs=args.epochs, address=args.address)


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", description=BENCHMARK,
                       help="extract's img/s against the conv base limit and Ray Data")
    p.add_argument("--images", default=None,
                   help="folder of images (default: COUNT photos of 500x375 generated from "
                        "scikit-learn's sample photographs)")
    p.add_argument("--count", type=int, default=1024, help="(default: 1024)")
    p.add_argument("--image-size", type=int, default=224, help="(default: 224)")
    p.add_argument("--weights", default="random", help="(default: random)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    p.add_argument("--limit-seconds", type=float, default=30.0,
                   help="how long to time the conv base alone (default: 30)")
    p.add_argument("--precision", default="float32",
                   choices=["float32", "mixed_bfloat16", "mixed_float16"],
                   help="conv base precision, for all three measurements (default: float32)")
    p.add_argument("--no-ray-data", dest="ray_data", action="store_false",
                   help="skip the Ray Data comparison")
    p.add_argument("--ceiling", action="store_true",
                   help="the pipeline's own ceiling instead: extract with a stand-in of no "
                        "cost in place of the conv base (recorded outputs replayed), against "
                        "decoding alone on the same cores")
    p.add_argument("--decode-workers", type=_decode_workers, default=None, metavar="N|auto",
                   help="as for extract; with --ceiling, N also runs the extract path a "
                        "second time with N decode workers (default: auto)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--workdir", default=None, help="where temporary files go (default: $TMPDIR)")
    p.set_defaults(func=cmd_benchmark)


def cmd_benchmark(args: argparse.Namespace) -> int:
    import json

    if args.ceiling:
        from .tools.bench_ceiling import format_ceiling, run_ceiling

        r = run_ceiling(args.images, args.count, args.image_size, args.batch_size,
                        workdir=args.workdir, decode_workers=args.decode_workers)
        print(format_ceiling(r))
    else:
        from .tools.benchmark import format_results, run_benchmark

        r = run_benchmark(args.images, args.count, args.image_size, args.weights,
                          args.batch_size, args.limit_seconds, args.ray_data,
                          workdir=args.workdir, precision=args.precision,
                          decode_workers=args.decode_workers)
        print(format_results(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return EXIT_OK


def _fail(e: BaseException, code: int = EXIT_USAGE) -> int:
    print(f"bottleneck: error: {e}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, `bottleneck: error: …`, exit code 2 (the usage is in --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"bottleneck: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bottleneck",
        description="VGG16 bottleneck features on Ray, and a classifier trained on them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_extract(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_info(sub)
    _add_demo(sub)
    _add_benchmark(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import UsageError
    from .runner.lock import LockLost

    try:
        return args.func(args)
    except UsageError as e:
        return _fail(e)
    except LockLost as e:
        return _fail(e, EXIT_INCOMPLETE)


if __name__ == "__main__":
    sys.exit(main())
