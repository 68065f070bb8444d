"""Start weights: loading Keras and mpinewton files, perturbation (thesis section 15.3)."""

import h5py
import numpy as np
import pytest

from mpinewton.models import load_initial_weights, perturb_weights, resnet_mini
from mpinewton.params import ParamLayout, get_flat

SHAPE = (8, 8, 3)


def _model(seed, hidden=(2, 2)):
    return resnet_mini(dtype="float32", seed=seed, input_shape=SHAPE, hidden=hidden,
                       num_classes=3)


def _all_values(model):
    return [np.asarray(v.numpy()) for v in model.variables]


def _moving_mean(model):
    return model.get_layer("stem_bn").moving_mean


def test_keras_weights_file_round_trip(tmp_path):
    source = _model(1)
    _moving_mean(source).assign(np.full(2, 0.25))  # batch-norm statistics travel too
    path = tmp_path / "start.weights.h5"
    source.save_weights(path)
    target = _model(2)
    assert not np.array_equal(get_flat(target), get_flat(source))
    assert load_initial_weights(target, path) == "keras"
    for a, b in zip(_all_values(source), _all_values(target), strict=True):
        np.testing.assert_array_equal(a, b)


def test_keras_weights_mismatch_names_variable_and_shapes(tmp_path):
    path = tmp_path / "wide.weights.h5"
    _model(1, hidden=(3, 2)).save_weights(path)
    target = _model(2)
    before = _all_values(target)
    with pytest.raises(ValueError, match=r"stem_conv/kernel.*\(3, 3, 3, 3\).*\(3, 3, 3, 2\)"):
        load_initial_weights(target, path)
    for a, b in zip(before, _all_values(target), strict=True):  # nothing was assigned
        np.testing.assert_array_equal(a, b)


def _mpinewton_file(path, model, *, flat=True, variables=True, extra=None):
    layout = ParamLayout.of(model)
    w = get_flat(model)
    with h5py.File(path, "w") as f:
        if flat:
            f.create_dataset("w", data=w.astype(np.float64))
        if variables:
            for name, value in zip(layout.names, layout.split(w), strict=True):
                f.create_dataset(f"variables/{name}", data=value)
        for name, value in (extra or {}).items():
            f.create_dataset(name, data=value)


@pytest.mark.parametrize("flat,variables", [(True, True), (True, False), (False, True)])
def test_mpinewton_weights_file(tmp_path, flat, variables):
    path = tmp_path / "weights.h5"
    source = _model(1)
    _mpinewton_file(path, source, flat=flat, variables=variables)
    target = _model(2)
    assert load_initial_weights(target, path) == "mpinewton"
    np.testing.assert_array_equal(get_flat(target), get_flat(source))


def test_mpinewton_weights_restore_stored_batch_norm_statistics(tmp_path):
    path = tmp_path / "weights.h5"
    source = _model(1)
    stats = np.array([0.5, -1.0], dtype=np.float32)
    _mpinewton_file(path, source, extra={f"variables/{_moving_mean(source).path}": stats})
    target = _model(2)
    load_initial_weights(target, path)
    np.testing.assert_array_equal(_moving_mean(target).numpy(), stats)


def test_mpinewton_weights_mismatch_is_named(tmp_path):
    path = tmp_path / "weights.h5"
    _mpinewton_file(path, _model(1, hidden=(3, 2)))
    target = _model(2)
    before = get_flat(target)
    with pytest.raises(ValueError, match=r"'stem_conv/kernel' has shape "
                                         r"\(3, 3, 3, 3\) in the file, \(3, 3, 3, 2\)"):
        load_initial_weights(target, path)
    np.testing.assert_array_equal(get_flat(target), before)
    flat_only = tmp_path / "flat.h5"
    _mpinewton_file(flat_only, _model(1, hidden=(3, 2)), variables=False)
    with pytest.raises(ValueError, match=r"flat vector 'w' has shape \(\d+,\), model "):
        load_initial_weights(target, flat_only)


def test_unusable_weights_files_are_errors(tmp_path):
    target = _model(0)
    with pytest.raises(ValueError, match="do not exist"):
        load_initial_weights(target, tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        load_initial_weights(target, junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("something", data=np.zeros(3))
    with pytest.raises(ValueError, match="neither a Keras .weights.h5 file"):
        load_initial_weights(target, other)


def test_perturb_weights_is_multiplicative_normal_noise():
    w = np.linspace(-2.0, 2.0, 200_001)
    a = perturb_weights(w, 0.01, seed=7)
    np.testing.assert_array_equal(a, perturb_weights(w, 0.01, seed=7))  # deterministic
    assert not np.array_equal(a, perturb_weights(w, 0.01, seed=8))
    nonzero = w != 0
    p = a[nonzero] / w[nonzero]
    assert abs(p.mean() - 1.0) < 1e-3 and abs(p.std() - 0.01) < 1e-3
    assert a[~nonzero].tolist() == [0.0]  # w * p keeps zeros
    np.testing.assert_array_equal(perturb_weights(w, 0.0, seed=1), w)
    assert perturb_weights(w.astype(np.float32), 0.1, seed=1).dtype == np.float32
    with pytest.raises(ValueError, match="std must be >= 0"):
        perturb_weights(w, -0.1, seed=0)
