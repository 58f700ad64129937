"""Write a PNG grid of dataset examples so a person can see the data.

    python -m gram_jax.data.show synthetic_trimodal [--out FILE.png] [--n 8] [--split test]
    python -m gram_jax.data.show trifeature [--split train_biased]

synthetic_trimodal: one column per example with the image, its log-mel spectrogram (time
on x, mel bin on y) and the decoded caption. trifeature: one column per pair with image 1,
image 2 and the pair's factors and labels. The dataset is prepared (generated once) under
``--data-dir`` (default ``$GRAM_JAX_DATA_DIR`` or ``~/.cache/gram_jax/datasets``); ``--config
key=value`` sets builder-config fields (e.g. ``--config train_size=256``).
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gram_jax.data import registry, synthetic, trifeature  # noqa: E402


def _parse_config(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--config expects key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def figure_synthetic(source, indices) -> plt.Figure:
    """Image / spectrogram / caption columns for synthetic_trimodal records."""
    n = len(indices)
    fig, axes = plt.subplots(
        2, n, figsize=(2.1 * n, 5.0), squeeze=False, gridspec_kw={"height_ratios": [1, 1]}
    )
    for col, i in enumerate(indices):
        rec = source[int(i)]
        axes[0, col].imshow(rec["image"], interpolation="nearest")
        axes[0, col].set_title(f"#{rec['index']}", fontsize=8)
        axes[1, col].imshow(
            np.asarray(rec["audio"]).T,
            origin="lower",
            aspect="auto",
            cmap="magma",
            interpolation="nearest",
        )
        caption = synthetic.decode_caption(rec["text"])
        axes[1, col].set_xlabel("\n".join(textwrap.wrap(caption, 22)), fontsize=7)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("log-mel (time ->)", fontsize=8)
    fig.suptitle("synthetic_trimodal: image, log-mel spectrogram, caption", fontsize=10)
    fig.tight_layout()
    return fig


def figure_trifeature(source, indices) -> plt.Figure:
    """Image 1 / image 2 / labels columns for Trifeature pairs."""
    n = len(indices)
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n, 4.6), squeeze=False)
    for col, i in enumerate(indices):
        rec = source[int(i)]
        axes[0, col].imshow(rec["image1"], interpolation="nearest")
        axes[1, col].imshow(rec["image2"], interpolation="nearest")
        t1, t2 = (
            trifeature.TEXTURES[rec["label/texture1"]],
            trifeature.TEXTURES[rec["label/texture2"]],
        )
        c1, c2 = trifeature.COLOURS[rec["label/colour1"]], trifeature.COLOURS[rec["label/colour2"]]
        shape = trifeature.SHAPES[rec["label/share"]]
        axes[0, col].set_title(f"pair #{rec['index']}: {shape}\n{t1} / {c1}", fontsize=7)
        axes[1, col].set_xlabel(f"{t2} / {c2}\nsynergy={rec['label/synergy']}", fontsize=7)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image1", fontsize=8)
    axes[1, 0].set_ylabel("image2", fontsize=8)
    fig.suptitle(
        "trifeature pairs: shared shape, texture / colour per image, synergy label", fontsize=10
    )
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> pathlib.Path:
    """Command-line entry point; returns the written PNG path."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=["synthetic_trimodal", "trifeature"])
    p.add_argument("--out", default=None, help="PNG path (default: <dataset>.png)")
    p.add_argument("--n", type=int, default=8, help="number of examples")
    p.add_argument("--split", default=None, help="split (default: train)")
    p.add_argument("--seed", type=int, default=0, help="which examples to pick")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--config", nargs="*", default=[], help="builder config key=value")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    split = args.split or "train"
    source = registry.load_source(args.dataset, split, args.data_dir, **_parse_config(args.config))
    rng = np.random.default_rng(args.seed)
    indices = np.sort(rng.choice(len(source), size=min(args.n, len(source)), replace=False))
    fig = (figure_synthetic if args.dataset == "synthetic_trimodal" else figure_trifeature)(
        source, indices
    )
    out = pathlib.Path(args.out or f"{args.dataset}.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out} ({len(indices)} examples of {args.dataset}/{split})")
    return out


if __name__ == "__main__":
    main()
