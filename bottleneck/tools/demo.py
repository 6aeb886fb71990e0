"""`bottleneck demo`: the whole job on real images, on a local Ray, with no download.

Real handwritten digits (they ship inside scikit-learn) → extract with a seeded random
VGG16 → train the head → predict held-out digits with the exported classifier.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from ..errors import UsageError

# What a demo run leaves in its folder, and all it removes when it runs again.
DEMO_NAMES = {"images", "features", "model", "predictions.parquet", "predictions.errors.parquet",
              "_predictions.parquet.parts", "_tmp"}


def run_demo(workdir: str, per_class: int = 60, image_size: int = 32, weights: str = "random",
             epochs: int = 20, address: str | None = None, held_out: int = 10) -> int:
    import pyarrow.parquet as pq

    from ..extraction import ExtractOptions, run_extract
    from ..prediction import PredictOptions, run_predict
    from ..prediction.job import format_rows, header
    from ..runner.pool import connect
    from ..training import HeadConfig, TrainOptions, format_metrics, run_train
    from .demo_data import sklearn_datasets, write_digit_split

    sklearn_datasets()  # its images: refuse now if it is missing, before touching workdir
    t0 = time.perf_counter()
    root = Path(workdir).resolve()
    if root.exists():
        others = sorted(p.name for p in root.iterdir() if p.name not in DEMO_NAMES)
        if others:
            raise UsageError(f"{root} holds files the demo did not write ({', '.join(others[:3])}"
                             "…); the demo starts its folder afresh: give it a new one")
        shutil.rmtree(root)
    new_dir = root / "images" / "new"
    n_train, n_new = write_digit_split(root / "images", per_class, held_out, image_size)
    say = lambda m: print(f"\n== {m}", flush=True)  # noqa: E731
    say(f"{n_train} training and {n_new} held-out digit images (scikit-learn's UCI digits, "
        f"{image_size} px) in {root / 'images'}")
    print(f"Ray: {connect(address)}")

    say("bottleneck extract")
    features = str(root / "features")
    summary = run_extract(ExtractOptions(str(root / "images" / "train"), features, weights=weights,
                                         image_size=image_size, shard_size=128, batch_size=32))
    print("\n".join(summary.lines()))
    if not summary.ok:
        return 1

    say("bottleneck train")
    model_dir = str(root / "model")
    metrics = run_train(TrainOptions(features, model_dir, validation_split=0.2,
                                     head=HeadConfig(epochs=epochs), verbose=2))
    print(format_metrics(metrics))

    say("bottleneck predict (held-out images the head never saw)")
    output = str(root / "predictions.parquet")
    pred = run_predict(PredictOptions(model_dir, str(new_dir), output=output, top_k=3))
    table = pq.read_table(output)
    truth = [Path(p).parent.name for p in table.column("path").to_pylist()]
    hits = sum(t == p for t, p in zip(truth, table.column("prediction").to_pylist()))
    print("\n".join([header(), *format_rows(table.slice(0, 10)),
                     f"… and {table.num_rows - 10} more in {output}"]))
    say(f"held-out accuracy {hits}/{table.num_rows} = {hits / max(table.num_rows, 1):.3f}; "
        f"validation accuracy {metrics['val_accuracy']:.3f}; {time.perf_counter() - t0:.0f}s")
    print(f"features: {features}\nmodel:    {model_dir} (training.png, confusion.png, "
          f"metrics.json)\npredictions: {output}")
    return 0 if pred.ok else 1


if __name__ == "__main__":
    sys.exit(run_demo("demo-output"))
