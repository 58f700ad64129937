"""Held-out evaluation: retrieval (volume, span distance, cosine) and linear probes.

Retrieval keys (flat, percent): ``retrieval/<anchor>_to_rest/<score>/<R@1|R@5|R@10|MdR|MnR>``
ranks each anchor's item among all candidates (anchor -> the other modalities together) and
``retrieval/rest_to_<anchor>/<score>/...`` the reverse, with ``<score>``:

* ``volume``: GRAM volume of (anchor, candidate's modalities) (lower is better);
* ``span_distance``: distance of the anchor to the span of the candidate's modalities;
* ``cosine``: cosine between the anchor and the normalised mean of the candidate's
  modality embeddings (the usual multi-modal cosine baseline, ImageBind-style score sum).

Plus ``retrieval/<anchor>_to_<m>/cosine/...`` for each single other modality, and for CoMM
``retrieval/<anchor>_to_rest/fused_cosine/...``: the anchor's single-modality embedding
against the fused embedding of the other modalities. ``chance/R@1`` is 100 / N.

Linear probe (``eval.probe_tasks``): features of the probe-train split and the held-out split
are standardised; a multinomial logistic regression (L2) is fit with full-batch L-BFGS for
each penalty in a small grid, the penalty is chosen on a 60/40 split of the training
features by balanced accuracy, the probe is refit on all training features and scored by
balanced accuracy on the held-out split (``probe/<task>/balanced_accuracy``; for binary
tasks also ``probe/<task>/auc``), as CoMM's evaluation (docs/authors_code.md 9, 12).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.multihost_utils import process_allgather
from jax.sharding import NamedSharding

from gram_jax.data import make_iterator
from gram_jax.data.order import PaddedSource
from gram_jax.metrics import check_finite_rows, chunked_retrieval, metrics_from_ranks
from gram_jax.models import l2_normalize

__all__ = ["collect", "retrieval_report", "linear_probe", "balanced_accuracy", "roc_auc"]


def collect(
    fn: Callable[[dict], Any],
    source,
    *,
    batch_size: int,
    sharding: NamedSharding,
    modalities: dict[str, str],
    max_examples: int = 0,
    label_keys: tuple[str, ...] = (),
    split: str = "eval",
) -> tuple[Any, dict[str, np.ndarray]]:
    """Run ``fn`` (jitted, batch -> pytree of (B, ...) arrays with replicated outputs) over a
    whole split, in order.

    Each process reads and converts only its rows of each batch (``gram_jax.data.order``;
    batches placed with ``sharding``); the split is padded to whole batches by repeating its
    last example, so one compiled shape serves all batches and every process runs every
    batch. Returns the concatenated outputs (NumPy, on every process) and the requested
    ``label/<name>`` arrays, truncated to ``max_examples`` (0 = all). Non-finite outputs raise
    (:func:`check_finite`, naming ``split``): a NaN embedding must not be scored.
    """
    n = len(source) if max_examples <= 0 else min(max_examples, len(source))
    it = make_iterator(
        PaddedSource(source, n, batch_size),
        batch_size=batch_size,
        shuffle=False,
        num_epochs=1,
        modalities=modalities,
        mesh=sharding.mesh,
        data_axis=sharding.spec[0],
    )
    outs, labels = [], {k: [] for k in label_keys}
    for batch in it:
        model_batch = {k: v for k, v in batch.items() if k != "index" and "/" not in k}
        outs.append(jax.tree.map(np.asarray, fn(model_batch)))
        for k in label_keys:
            labels[k].append(process_allgather(batch[f"label/{k}"], tiled=True))
    cat = jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *outs)
    check_finite(cat, split)
    return cat, {k: np.concatenate(v)[:n] for k, v in labels.items()}


def check_finite(outputs, split: str) -> None:
    """Raise ``ValueError`` naming the split, the modality (output key) and the row count
    when any row of ``outputs`` (a ``{name: (N, ...)}`` dict or one (N, ...) array) holds NaN
    or inf. Retrieval would otherwise score them (NaN compares false: a NaN query would beat
    nothing and rank first)."""
    named = outputs.items() if isinstance(outputs, dict) else [("features", outputs)]
    for name, x in named:
        check_finite_rows(f"evaluation on the {split!r} split: the {name!r} embeddings", x)


def _ranks(anchor, others, score: str, direction: str, chunk: int):
    # Not under jit: on concrete tables chunked_retrieval scores each distinct row once, so
    # duplicated items (repeated captions) tie exactly; its block loop is compiled.
    ranks, _ = chunked_retrieval(
        anchor, *others, score=score, direction=direction, chunk_size=chunk, top_k=1
    )
    return ranks


def retrieval_report(
    emb: dict[str, np.ndarray],
    anchor: str,
    others: list[str],
    scores: tuple[str, ...],
    fused_key: str | None = None,
    chunk: int = 512,
    split: str = "eval",
) -> dict[str, float]:
    """Flat retrieval metrics (module docstring) from ``{modality: (N, D)}`` unit embeddings.

    Non-finite embeddings raise (:func:`check_finite`) before anything is scored.
    """
    check_finite(emb, split)
    a = jnp.asarray(emb[anchor], jnp.float32)
    xs = [jnp.asarray(emb[m], jnp.float32) for m in others]
    n = a.shape[0]
    chunk = min(chunk, n)
    out: dict[str, float] = {"chance/R@1": 100.0 / n, "eval/examples": float(n)}

    def put(prefix: str, ranks) -> None:
        for k, v in metrics_from_ranks(np.asarray(ranks)).items():
            out[f"{prefix}/{k}"] = v

    for score in scores:
        if score == "cosine":
            cands = [l2_normalize(sum(xs) / len(xs))]
        else:
            cands = xs
        put(f"retrieval/{anchor}_to_rest/{score}", _ranks(a, cands, score, "anchor_to_rest", chunk))
        put(f"retrieval/rest_to_{anchor}/{score}", _ranks(a, cands, score, "rest_to_anchor", chunk))
    if "cosine" in scores and len(others) > 1:
        for m, x in zip(others, xs, strict=True):
            put(
                f"retrieval/{anchor}_to_{m}/cosine",
                _ranks(a, [x], "cosine", "anchor_to_rest", chunk),
            )
    if fused_key is not None:
        f = [jnp.asarray(emb[fused_key], jnp.float32)]
        put(
            f"retrieval/{anchor}_to_rest/fused_cosine",
            _ranks(a, f, "cosine", "anchor_to_rest", chunk),
        )
        put(
            f"retrieval/rest_to_{anchor}/fused_cosine",
            _ranks(a, f, "cosine", "rest_to_anchor", chunk),
        )
    return out


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the classes present in ``y_true`` of the per-class recall (percent)."""
    recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    return float(100.0 * np.mean(recalls))


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Binary ROC-AUC (percent) by the rank-sum (Mann-Whitney) formula, ties averaged."""
    y = np.asarray(y_true).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_s = np.asarray(score)[order]
    i = 0
    while i < len(sorted_s):  # average ranks over ties
        j = i
        while j + 1 < len(sorted_s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return float(100.0 * (ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


@functools.partial(jax.jit, static_argnames=("num_classes", "iters"))
def _fit_logreg(x, y, l2, num_classes: int, iters: int = 100):
    """Multinomial logistic regression ``W, b`` minimising mean CE + l2 * ||W||^2 (L-BFGS)."""
    d = x.shape[1]
    params = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}

    def loss(p):
        logits = x @ p["w"] + p["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + l2 * jnp.sum(p["w"] ** 2)

    opt = optax.lbfgs()
    vg = optax.value_and_grad_from_state(loss)

    def body(carry, _):
        p, s = carry
        value, grad = vg(p, state=s)
        updates, s = opt.update(grad, s, p, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=iters)
    return params


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    penalties: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1),
    seed: int = 0,
) -> dict[str, float]:
    """Balanced accuracy (and binary AUC) of a linear probe; see the module docstring."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr = jnp.asarray((x_train - mean) / std, jnp.float32)
    xte = jnp.asarray((x_test - mean) / std, jnp.float32)
    k = int(max(y_train.max(), y_test.max())) + 1
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(xtr))
    cut = int(0.6 * len(perm))
    fit_idx, val_idx = perm[:cut], perm[cut:]
    best, best_acc = penalties[0], -1.0
    for l2 in penalties:
        p = _fit_logreg(xtr[fit_idx], jnp.asarray(y_train[fit_idx]), l2, k)
        pred = np.asarray(jnp.argmax(xtr[val_idx] @ p["w"] + p["b"], -1))
        acc = balanced_accuracy(y_train[val_idx], pred)
        if acc > best_acc:
            best, best_acc = l2, acc
    p = _fit_logreg(xtr, jnp.asarray(y_train), best, k)
    logits = np.asarray(xte @ p["w"] + p["b"])
    out = {"balanced_accuracy": balanced_accuracy(y_test, logits.argmax(-1)), "l2": best}
    if k == 2:
        out["auc"] = roc_auc(y_test, logits[:, 1] - logits[:, 0])
    return out
