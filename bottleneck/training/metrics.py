"""Evaluation figures (pure NumPy) and the plots people would rather look at than read."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """cm[i, j] = rows of true class i predicted as j."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return cm


def classification_report(cm: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    """Per-class precision, recall, F1 and support from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    actual = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {c: {"precision": float(precision[i]), "recall": float(recall[i]),
                "f1": float(f1[i]), "support": int(actual[i])} for i, c in enumerate(classes)}


def log_loss(probs: np.ndarray, y_true: np.ndarray) -> float:
    """Mean categorical cross-entropy, as Keras computes it (probabilities clipped at 1e-7)."""
    p = np.clip(probs[np.arange(len(y_true)), y_true], 1e-7, 1.0)
    return float(-np.log(p).mean())


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def training_plot(history: dict[str, list[float]]) -> bytes:
    """Loss and accuracy per epoch, training and validation, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in history:
                ax.plot(range(1, len(history[key]) + 1), history[key], style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def confusion_plot(cm: np.ndarray, classes: list[str]) -> bytes:
    """The confusion matrix as a labelled heat map, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    side = min(4 + 0.5 * n, 20)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        top = cm.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > top / 2 else "black", fontsize=8)
    ax.set_title("confusion matrix (validation)")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data
