"""Topology-independent data order (gram_jax/data/order.py), checked in one process by
overriding process_index / process_count: the processes' parts of each global step are the
single-process global batch, augmentations included, across epoch boundaries; iterator
states are the global step for every layout and restore on another process count."""

import json

import grain
import jax
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from gram_jax import data
from gram_jax.data import order

N = 20  # not a multiple of the batch: batches span epoch boundaries


class _Source(list):
    modalities = {"features": "features", "tokens": "text"}


@pytest.fixture(scope="module")
def source():
    rng = np.random.default_rng(0)
    return _Source(
        {
            "features": rng.normal(size=6).astype(np.float32),
            "tokens": rng.integers(1, 9, size=5).astype(np.int32),
            "label/c": i % 3,
            "index": 100 + i,
        }
        for i in range(N)
    )


def _it(source, p, count, **kw):
    kw = {"batch_size": 8, "seed": 3, "num_epochs": None, "augment": "default", **kw}
    return data.make_iterator(source, process_index=p, process_count=count, **kw)


def _take(it, n):
    return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


def _cat(parts):
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def _equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("kw", [{}, {"two_views": True}, {"shuffle": False}])
def test_process_parts_make_the_global_batch(source, kw):
    steps = 7  # 56 positions: 2.8 epochs
    ref = _take(_it(source, 0, 1, **kw), steps)
    idx = np.concatenate([b["index"] for b in ref]) - 100
    for e in range(2):  # every full epoch is a permutation, a new one each epoch
        assert sorted(idx[e * N : (e + 1) * N]) == list(range(N))
    if kw.get("shuffle", True):
        assert list(idx[:N]) != list(idx[N : 2 * N])
    for count in (2, 4, 8):
        parts = [_take(_it(source, p, count, **kw), steps) for p in range(count)]
        for s in range(steps):
            assert all(len(parts[p][s]["index"]) == 8 // count for p in range(count))
            _equal(_cat([parts[p][s] for p in range(count)]), ref[s])


def test_finite_epochs_and_partial_last_batch(source):
    # 2 epochs = 40 positions = 5 global batches of 8 (drop) or 5 + 0 (no remainder);
    # with batch 12: 3 full batches and a final 4 rows read by process 0 only.
    for count in (1, 2, 4):
        assert sum(1 for _ in _it(source, 0, count, num_epochs=2)) == 5
    ref = list(_it(source, 0, 1, num_epochs=2, batch_size=12, drop_remainder=False))
    assert [len(b["index"]) for b in ref] == [12, 12, 12, 4]
    parts = [list(_it(source, p, 2, num_epochs=2, batch_size=12, drop_remainder=False))
             for p in range(2)]  # fmt: skip
    assert [len(b["index"]) for b in parts[0]] == [6, 6, 6, 4]
    assert [len(b["index"]) for b in parts[1]] == [6, 6, 6]
    got = np.concatenate([b["index"] for s in range(4) for p in range(2) if s < len(parts[p])
                          for b in [parts[p][s]]])  # fmt: skip
    np.testing.assert_array_equal(got, np.concatenate([b["index"] for b in ref]))


def test_state_is_the_global_step_and_restores_on_another_count(source):
    """A position saved by 2 processes continues the same order on 1 or 4."""
    its = [_it(source, p, 2) for p in range(2)]
    for it in its:
        _take(it, 5)
    states = [it.get_state() for it in its]
    assert states[0] == states[1]
    ref = _take(_it(source, 0, 1), 9)[5:]
    for count in (1, 4):
        parts = []
        for p in range(count):
            it = _it(source, p, count)
            it.set_state(states[0])
            parts.append(_take(it, 4))
        for s in range(4):
            _equal(_cat([parts[p][s] for p in range(count)]), ref[s])


def test_rows_follow_the_mesh_sharding():
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    np.testing.assert_array_equal(order.process_rows(16, 0, 1, sharding), np.arange(16))
    np.testing.assert_array_equal(order.process_rows(16, 1, 4), np.arange(4, 8))
    with pytest.raises(ValueError, match="expected 8"):
        order.process_rows(16, 0, 2, sharding)  # one process holds all 16 rows
    with pytest.raises(ValueError, match="process count 3"):
        order.process_rows(16, 0, 3)
    assert data.steps_per_epoch(list(range(20)), 8, process_count=2) == 2


def test_elastic_handler_restores_any_process_count(source, tmp_path):
    it = _it(source, 0, 1)
    _take(it, 3)
    state = it.get_state()
    d = epath.Path(tmp_path)
    for p in range(2):  # as written by 2 processes
        (d / f"process_{p}-of-2.json").write_text(json.dumps(state))
    fresh = _it(source, 0, 1)
    order.ElasticDataHandler().restore(d, args=order.ElasticDataRestore(fresh))
    _equal(_take(fresh, 2), _take(it, 2))
    (d / "process_1-of-2.json").write_text(json.dumps({"next_index": 7}))
    with pytest.raises(ValueError, match="differ between processes"):
        order.ElasticDataHandler().restore(d, args=order.ElasticDataRestore(_it(source, 0, 1)))
    empty = epath.Path(tmp_path / "empty")
    empty.mkdir()
    with pytest.raises(ValueError, match="no data iterator state"):
        order.ElasticDataHandler().restore(empty, args=order.ElasticDataRestore(fresh))
    assert isinstance(fresh, grain.DatasetIterator)


def test_collect_reads_parts_and_pads_to_whole_batches(source):
    """evaluate.collect over a split that is not a multiple of the batch: outputs and labels
    in split order, padding cut, on an 8-device mesh."""
    from gram_jax.training.evaluate import collect

    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    fn = jax.jit(
        lambda b: {"s": b["features"].sum(-1)}, out_shardings=NamedSharding(mesh, PartitionSpec())
    )
    mods = dict(source.modalities)
    for max_examples, n in ((0, N), (13, 13)):
        out, labels = collect(
            fn, source, batch_size=8, sharding=sharding, modalities=mods,
            max_examples=max_examples, label_keys=("c",),
        )  # fmt: skip
        want = np.array([source[i]["features"].sum() for i in range(n)])
        np.testing.assert_allclose(out["s"], want, rtol=1e-6)
        np.testing.assert_array_equal(labels["c"], np.arange(n) % 3)
    with pytest.raises(ValueError, match="n must be"):
        order.PaddedSource(source, 0, 8)
