"""Precision of the float32 pairwise volume on aligned tuples, by decade of the true volume.

GRAM's positives are clustered tuples: all k vectors are a common direction plus a small
perturbation (``x_m = normalise(e + sigma g_m)``, ``g_m ~ N(0, I / D)``), whose volume is
``~ sigma^(k-1)``. For k = 2..5 and D in {16, 512} this script draws tuples with true volumes
spread over 1e-1 .. 1e-5 and reports, per decade, the max relative error of

- ``ours``: :func:`gram_jax.pairwise_volume` in float32 (the positives, i.e. the diagonal of a
  (B, B + 7) matrix), value and gradient (of the sum of positive volumes, w.r.t. all k inputs);
  each row's smallest volume, here the positive, is recomputed per item (``refine=1``, the
  default);
- ``ours_refine0``: the same with ``refine=0``: every entry from the k - 1 dot products, the
  accuracy of the entries that are not refined (e.g. a third copy of a duplicated item);
- ``authors``: the authors' formulation in NumPy float32: the k x k Gram matrix of each tuple
  from float32 products and ``np.linalg.det`` (the LU of ``torch.det``), ``sqrt(abs(det))``;
  its gradient ``vol G^-1 A`` with a float32 ``np.linalg.inv`` (what autograd of
  ``torch.det`` evaluates; ``inf`` in the table where float32 LU finds G singular);
- ``adjugate``: the previous ``pairwise_volume`` (``benchmarks/volume_bench.py``), value only;

against float64 references on the same float32 inputs (``np.linalg.slogdet``, and
``vol G^-1 A`` in float64 for the gradient; the gradient error is ``|g - g64| / |g64|`` per
tuple). ``--x64`` adds ``ours`` evaluated on the inputs cast to float64 with
``jax_enable_x64`` (the more-accurate-dot-product recipe of ``docs/precision.md``).

``--loss`` measures the GRAM loss instead (``loss_case``): per decade of the positives'
volume, a batch of 32 clustered tuples (the negatives are the pairs across tuples, volumes
~1), the relative error ``|g - g64| / |g64|`` of the loss gradient w.r.t. all k inputs and of
the loss value, for

- ``ours``: :func:`gram_jax.gram_contrastive_loss` (its positives, the diagonal, come from the
  per-item volume; ``--score simplex``: the simplex loss);
- ``pairwise``: the same loss on the whole ``pairwise_volume(..., refine=0)`` matrix, diagonal
  included (the evaluation before the per-item positives);
- ``authors``: the loss on the authors' formulation in JAX float32 ((B, B, k, k) Gram tensor,
  ``jnp.linalg.det``, ``sqrt(abs)``; ``benchmarks/volume_bench.py``'s ``dense_volume``);

against the same loss in float64 (jax x64) on the same float32 inputs.

    python benchmarks/volume_precision.py            # JSON on stdout
    python benchmarks/volume_precision.py --markdown # the tables of docs/precision.md
    python benchmarks/volume_precision.py --loss --markdown
    python benchmarks/volume_precision.py --span     # span_distance's positives, by ridge
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gram_jax.losses import gram_contrastive_loss
from gram_jax.volume import pairwise_volume, span_distance

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from volume_bench import TAU, _loss_from_volume, adjugate_volume, dense_volume  # noqa: E402

DECADES = (-1, -2, -3, -4, -5)


def clustered(rng, b: int, k: int, d: int, sigma: np.ndarray) -> np.ndarray:
    """(b, k, d) float32 unit vectors ``normalise(e + sigma g)`` around a random unit ``e``."""
    e = rng.standard_normal((b, 1, d))
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    x = e + sigma[:, None, None] * rng.standard_normal((b, k, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 volume and gradient ``vol G^-1 A`` of each tuple (b, k, d)."""
    a = x.astype(np.float64)
    g = a @ a.transpose(0, 2, 1)
    sign, logdet = np.linalg.slogdet(g)
    vol = np.where(sign > 0, np.exp(0.5 * logdet), 0.0)
    return vol, vol[:, None, None] * np.linalg.solve(g, a)


def authors(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The authors' float32 formulation of each tuple's volume and its gradient."""
    g = x @ x.transpose(0, 2, 1)  # float32 products
    vol = np.sqrt(np.abs(np.linalg.det(g)))
    grad = np.full(x.shape, np.nan, np.float32)  # NaN where float32 LU finds G singular
    with np.errstate(all="ignore"):
        for i in range(x.shape[0]):
            try:
                grad[i] = vol[i] * (np.linalg.inv(g[i]) @ x[i])
            except np.linalg.LinAlgError:
                pass
    return vol, grad


def _ours(dtype, x: np.ndarray, extra: list[np.ndarray], refine: int = 1):
    """float32 (or float64) volumes of the positives and their gradients, (b,) and (b, k, d)."""
    xs = [x[:, m].astype(dtype) for m in range(x.shape[1])]
    cand = [np.concatenate([c, e.astype(dtype)]) for c, e in zip(xs[1:], extra, strict=True)]
    k = len(xs)

    def positives(anchor, *others):
        return jnp.diagonal(pairwise_volume(anchor, *others, refine=refine))

    vol = jax.jit(positives)(xs[0], *cand)
    grads = jax.jit(jax.grad(lambda *ys: jnp.sum(positives(*ys)), argnums=tuple(range(k))))(
        xs[0], *cand
    )
    g = np.stack([np.asarray(grads[0])] + [np.asarray(gm)[: x.shape[0]] for gm in grads[1:]], 1)
    return np.asarray(vol, np.float64), g.astype(np.float64)


def case(k: int, d: int, per_decade: int, seed: int, x64: bool) -> dict:
    rng = np.random.default_rng(seed)
    target = 10.0 ** rng.uniform(-5.6, -0.4, 5 * per_decade)
    x = clustered(rng, target.size, k, d, target ** (1.0 / (k - 1)))
    extra = clustered(rng, 7, k - 1, d, np.ones(7))  # extra random candidates: B2 != B1
    extra = [extra[:, m] for m in range(k - 1)]
    vol64, g64 = reference(x)
    out = {
        "ours": _ours(np.float32, x, extra),
        "ours_refine0": _ours(np.float32, x, extra, refine=0),
        "authors": authors(x),
    }
    out["adjugate"] = (
        np.diagonal(np.asarray(adjugate_volume(x[:, 0], *[x[:, m] for m in range(1, k)]))),
        None,
    )
    if x64:
        with jax.enable_x64(True):
            out["ours_x64"] = _ours(np.float64, x, extra)
    dec = np.floor(np.log10(np.maximum(vol64, 1e-30)))
    rows = {}
    for lo in DECADES:
        sel = dec == lo
        if not sel.any():
            continue
        row = {"n": int(sel.sum())}
        for name, (v, g) in out.items():
            rel = np.abs(np.asarray(v, np.float64)[sel] - vol64[sel]) / vol64[sel]
            row[f"{name}_value"] = float(np.max(rel))
            if g is not None:
                num = np.linalg.norm((g - g64)[sel].reshape(sel.sum(), -1), axis=1)
                den = np.linalg.norm(g64[sel].reshape(sel.sum(), -1), axis=1)
                rel_g = np.where(np.isfinite(num), num / den, np.inf)
                row[f"{name}_grad"] = float(np.max(rel_g))
        rows[f"1e{lo}"] = row
    return {"k": k, "D": d, "decades": rows}


def span_case(k: int, d: int, n: int, seed: int) -> dict:
    """``span_distance`` of ``n`` aligned positives against itself in float64 (same ridge):
    max relative error with and without the per-item rescoring, per ridge."""
    rng = np.random.default_rng(seed)
    x = clustered(rng, n, k, d, (10.0 ** rng.uniform(-4, -0.5, n)) ** (1.0 / (k - 1)))
    a, others = x[:, 0], [x[:, m] for m in range(1, k)]
    out = {"k": k, "D": d}
    for ridge in (0.0, 1e-6):
        with jax.enable_x64(True):
            ref = span_distance(jnp.float64(a), *[jnp.float64(o) for o in others], ridge=ridge)
            ref = np.diagonal(np.asarray(ref))
        for refine in (1, 0):
            v = np.diagonal(np.asarray(span_distance(a, *others, ridge=ridge, refine=refine)))
            out[f"ridge={ridge:g}/refine={refine}"] = float(np.max(np.abs(v - ref) / ref))
    return out


def _loss_fns(score: str):
    def ours(a, *o):
        return gram_contrastive_loss(a, list(o), TAU, score=score)[0]

    fns = {"ours": ours}
    if score == "volume":
        fns["pairwise"] = lambda a, *o: _loss_from_volume(pairwise_volume(a, *o, refine=0))
        fns["authors"] = lambda a, *o: _loss_from_volume(dense_volume(a, *o))
    return fns


def loss_case(k: int, d: int, batch: int, seed: int, score: str) -> dict:
    """Loss value and gradient errors per decade of the positives' volume (module docstring)."""
    rng = np.random.default_rng(seed)
    fns = _loss_fns(score)
    argnums = tuple(range(k))
    rows = {}
    for lo in DECADES:
        x = clustered(rng, batch, k, d, (10.0 ** rng.uniform(lo, lo + 1, batch)) ** (1 / (k - 1)))
        xs = [x[:, m] for m in range(k)]
        with jax.enable_x64(True):
            v64, g64 = jax.jit(jax.value_and_grad(fns["ours"], argnums=argnums))(
                *[jnp.asarray(a, jnp.float64) for a in xs]
            )
            g64 = np.stack([np.asarray(g) for g in g64])
            v64 = float(v64)
        row = {"n": batch}
        for name, fn in fns.items():
            v, g = jax.jit(jax.value_and_grad(fn, argnums=argnums))(*xs)
            g = np.stack([np.asarray(gm, np.float64) for gm in g])
            row[f"{name}_value"] = abs(float(v) - v64) / abs(v64)
            row[f"{name}_grad"] = float(np.linalg.norm(g - g64) / np.linalg.norm(g64))
        rows[f"1e{lo}"] = row
    return {"k": k, "D": d, "decades": rows}


LABELS = {
    "ours": "ours (refine=1, default)",
    "ours_refine0": "dot-product form (refine=0)",
    "authors": "authors' LU",
    "adjugate": "previous (adjugate)",
    "ours_x64": "ours, float64 inputs",
}


def markdown(results: list[dict], names: list[str]) -> str:
    lines = []
    for d in sorted({r["D"] for r in results}):
        lines.append(f"\n**D = {d}** (max relative error per decade of the true volume)\n")
        head = "| k | quantity | " + " | ".join(f"[1e{lo}, 1e{lo + 1})" for lo in DECADES) + " |"
        lines += [head, "|---|---|" + "---|" * len(DECADES)]
        for r in (r for r in results if r["D"] == d):
            for q in ("value", "grad"):
                for name in names:
                    key = f"{name}_{q}"
                    cells = [r["decades"].get(f"1e{lo}", {}).get(key) for lo in DECADES]
                    if all(c is None for c in cells):
                        continue
                    txt = ["" if c is None else f"{c:.1e}" for c in cells]
                    label = LABELS.get(name, name) if "adjugate" in names else name
                    lines.append(f"| {r['k']} | {label} {q} | " + " | ".join(txt) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-decade", type=int, default=60, help="tuples per decade (about)")
    parser.add_argument("--x64", action="store_true", help="also float64 inputs (jax x64)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--loss", action="store_true", help="the loss's value and gradient")
    parser.add_argument("--score", default="volume", choices=["volume", "simplex"])
    parser.add_argument("--span", action="store_true", help="span_distance's positives")
    args = parser.parse_args(argv)
    grid = [(k, d) for d in (16, 512) for k in (2, 3, 4, 5)]
    if args.span:
        results = [span_case(k, 512, 40, seed=k + 512) for k in (2, 3, 4)]
        print(json.dumps({"benchmark": "float32 span_distance precision", "results": results}))
        return
    if args.loss:
        results = [loss_case(k, d, 32, seed=100 * k + d, score=args.score) for k, d in grid]
        names = list(_loss_fns(args.score))
        what = f"float32 {args.score} loss precision"
    else:
        results = [case(k, d, args.per_decade, seed=100 * k + d, x64=args.x64) for k, d in grid]
        names = ["ours", "ours_refine0", "authors", "adjugate"] + (["ours_x64"] if args.x64 else [])
        what = "float32 volume precision"
    if args.markdown:
        print(markdown(results, names))
    else:
        print(json.dumps({"benchmark": what, "results": results}, indent=1))


if __name__ == "__main__":
    main()
