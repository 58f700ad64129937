"""The public API is documented, and the README's example runs as written."""

import inspect
import pathlib
import re

import numpy as np

import gram_jax

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_every_public_name_has_a_docstring():
    missing = [
        name for name in gram_jax.__all__ if len(inspect.getdoc(getattr(gram_jax, name)) or "") < 40
    ]
    assert not missing, f"public names without a real docstring: {missing}"


def test_module_help_is_readable():
    text = inspect.getdoc(gram_jax)
    assert "GRAM" in text and "CoMM" in text and "pairwise_volume" in text


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["vol"].shape == (256, 256)
    assert float(namespace["loss"]) > 0 and namespace["grads"].shape == (256, 512)


def test_readme_shard_map_example_equals_the_single_device_loss():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    exec(compile(blocks[1], str(README), "exec"), namespace)
    t, v, a = namespace["text"], namespace["video"], namespace["audio"]
    sharded = float(namespace["global_loss"](t, v, a))
    single = float(gram_jax.gram_contrastive_loss(t, [v, a], 0.07)[0])
    assert abs(sharded - single) <= 1e-5 * abs(single)


def test_readme_own_builder_example_defines_a_registrable_dataset():
    from gram_jax.data import DATASETS

    block = next(
        b
        for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
        if "register_dataset" in b
    )
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    config = namespace["get_config"]()
    assert config.data.name == "my_data" and "my_data" in DATASETS


def test_readme_npz_example_runs_as_pasted_and_fits_the_embeddings_config(tmp_path, monkeypatch):
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "np.savez" in b
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {})
    saved = np.load(tmp_path / "mine.npz")
    # configs/gram_embeddings.py: modalities text / video / audio, 512 features each.
    assert sorted(saved.files) == ["audio", "text", "video"]
    assert {saved[k].shape for k in saved.files} == {(1000, 512)}
    assert {saved[k].dtype for k in saved.files} == {np.dtype(np.float32)}


def test_repository_stands_alone():
    """Defaults name files inside the repository, and no text cites documents outside it."""
    import importlib.util

    from gram_jax.training.config import load_config

    root = README.parent
    npz = load_config(str(root / "configs" / "gram_embeddings.py")).data.builder.npz_path
    assert pathlib.Path(npz).is_file() and root in pathlib.Path(npz).resolve().parents
    spec = importlib.util.spec_from_file_location("hub", root / "experiments" / "hubness_msrvtt.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    assert all((hub.DEFAULT_FIXTURES / f"msrvtt884_gram_step{s}.npz").is_file() for s in hub.STEPS)
    # Spelled in pieces so that this file does not cite them itself.
    outside = re.compile(
        "|".join([r"\.\./" + "shared", "shared/" + "fixtures", "research/" + r"\w+\.md"])
    )
    texts = [README, root / "pyproject.toml", *root.glob("notebooks/*.ipynb")]
    for d in ("gram_jax", "configs", "experiments", "benchmarks", "tests", "docs"):
        texts += [p for p in (root / d).rglob("*") if p.suffix in {".py", ".md"}]
    cited = [str(p.relative_to(root)) for p in texts if outside.search(p.read_text())]
    assert not cited, f"files citing documents outside the repository: {cited}"
