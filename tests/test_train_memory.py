"""Training memory is bounded by batch and buffer sizes, not by the dataset's size.

Two trainings in fresh processes, on 200 rows and on 512 MiB of 7×7×512 float32 features
(eight times the growth this check allows). Peak RSS is sampled from outside the process.
"""

from __future__ import annotations

import pytest

from bottleneck.tools.bench_train import train_in_child, write_synthetic_features

pytestmark = pytest.mark.slow

ROW_BYTES = 25088 * 4
ALLOWED_GROWTH = 64 * 2**20  # the big run may use at most this much more than the small one


def test_memory_does_not_grow_with_the_dataset(tmp_path):
    big_rows = 8 * ALLOWED_GROWTH // ROW_BYTES  # 512 MiB of features
    write_synthetic_features(str(tmp_path / "small"), 200)
    write_synthetic_features(str(tmp_path / "big"), big_rows)
    small_peak, _ = train_in_child(str(tmp_path / "small"), str(tmp_path / "m1"))
    big_peak, m = train_in_child(str(tmp_path / "big"), str(tmp_path / "m2"))
    assert m["train_rows"] + m["validation_rows"] == big_rows
    growth = big_peak - small_peak
    assert growth < ALLOWED_GROWTH, (
        f"peak RSS grew by {growth / 2**20:.0f} MiB ({small_peak / 2**20:.0f} → "
        f"{big_peak / 2**20:.0f} MiB) for {big_rows * ROW_BYTES / 2**30:.2f} GiB of features")
    # The synthetic classes are separable: a head that sees the data learns them.
    assert m["val_accuracy"] > 0.5
