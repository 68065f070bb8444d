"""Mini-batches from a small dataset file are served from memory, with the same rows.

``Session.read_rows`` keeps a training set of at most ``cache_bytes()`` in
memory (a batch's rows are spread over the whole file, so reading each from
the compressed file costs more than the step). Training must not notice:
the same job with the cache off gives bit-identical weights.
"""

import numpy as np
from mpijobs import make_dataset

import mpinewton
from mpinewton.comm import Comm


def _train(path, tmp_path, name):
    result = mpinewton.fit(
        None, str(path), comm=Comm(None), run_dir=tmp_path / name,
        overrides=["model.name='mlp'", "model.hidden=[8]", "optimizer.batch_size=20",
                   "optimizer.pretrain_iters=2", "optimizer.iters=3", "objective.jit=false",
                   "data.eval_splits=[]", "optimizer.method='newton'"])
    return result.weights


def test_cached_rows_train_exactly_as_rows_read_from_the_file(tmp_path, monkeypatch):
    import mpinewton.train.session as session

    path = make_dataset(tmp_path / "small.h5")
    reads = []
    real = session.Session.read_rows

    def counting(self, rows):
        reads.append(self._rows is not None)
        return real(self, rows)

    monkeypatch.setattr(session.Session, "read_rows", counting)
    cached = _train(path, tmp_path, "cached")
    assert reads and all(reads[1:])  # from the second batch on, from memory
    monkeypatch.setattr(session, "cache_bytes", lambda: 0)
    reads.clear()
    uncached = _train(path, tmp_path, "uncached")
    assert reads and not any(reads)  # every batch from the file
    np.testing.assert_array_equal(cached, uncached)


def test_cache_budget_is_a_share_of_memory_at_most_1_gib(monkeypatch):
    import os

    from mpinewton.train.session import cache_bytes

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
    assert cache_bytes() == min(2 ** 30, physical // 8)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1000")  # many ranks share the node
    assert cache_bytes() == physical // 8000
