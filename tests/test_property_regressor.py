"""PropertyRegressor: conformance, learning a structure-dependent target, symmetry,
standardisation, mini-batched prediction, input errors and GridSearchCV (tiny settings)."""
import numpy as np
import pytest
from ase import Atoms
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV

from crystalfit import PropertyRegressor
from crystalfit.estimators import property_regressor as pr_module
from crystalfit.exceptions import CrystalfitError, NonFiniteError, ShapeError
from crystalfit.testing.estimator_checks import check_estimator

TINY = dict(hidden_scalars=16, hidden_vectors=4, n_layers=1, n_freqs=4, n_radial=8)
# simple cubic, bcc and fcc conventional cells: 1, 2 and 4 atoms
BASES = [
    np.zeros((1, 3)),
    np.array([[0, 0, 0], [0.5, 0.5, 0.5]]),
    np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]),
]


def make_strained_cubic(n, seed):
    """Randomly strained sc/bcc/fcc cells of Na/Cl; target = volume per atom (A^3), computed by ase."""
    rng = np.random.default_rng(seed)
    X, y = [], []
    for _ in range(n):
        base = BASES[rng.integers(3)]
        eps = rng.uniform(-0.05, 0.05, (3, 3))
        cell = rng.uniform(3.0, 4.5) * (np.eye(3) + (eps + eps.T) / 2)
        frac = (base + rng.normal(0, 0.02, base.shape)) % 1.0
        atoms = Atoms(numbers=rng.choice([11, 17], len(base)), cell=cell, scaled_positions=frac, pbc=True)
        X.append(atoms)
        y.append(atoms.get_volume() / len(atoms))
    return X, np.array(y)


def _model(**kw):
    params = dict(network=dict(TINY), embedding_dim=16, max_epochs=2, batch_size=16, learning_rate=3e-3,
                  random_state=0, device="cpu")
    params.update(kw)
    return PropertyRegressor(**params)


@pytest.fixture(scope="module")
def data():
    return make_strained_cubic(48, seed=0)


@pytest.fixture(scope="module")
def fitted(data):
    return _model(max_epochs=3).fit(*data)


def test_conformance(data):
    check_estimator(_model(), *data, nested_param=("network__hidden_scalars", 8))


def test_defaults_have_no_time_input():
    model = PropertyRegressor()
    assert model.network_settings()["time_dim"] == 0
    assert model.get_params()["network__time_dim"] == 0
    assert model.loss == "l1" and model.standardize_y is True and model.embedding_dim == 32


def test_learns_volume_per_atom():
    """V/n of strained sc/bcc/fcc cells: the network must read the metric and infer n; held-out R^2 > 0.8."""
    X, y = make_strained_cubic(160, seed=0)
    Xt, yt = make_strained_cubic(64, seed=1)
    model = _model(max_epochs=40).fit(X, y)
    r2 = model.score(Xt, yt)
    mean_baseline = 1 - np.sum((yt - y.mean()) ** 2) / np.sum((yt - yt.mean()) ** 2)
    assert r2 > 0.8, r2
    assert mean_baseline < 0.05
    assert model.history_[-1] < 0.5 * model.history_[0]
    mae = np.mean(np.abs(model.predict(Xt) - yt))
    assert mae < 0.5 * np.mean(np.abs(yt - y.mean()))


def _rotation(seed, proper=True):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q if proper else -q


def test_invariances(fitted, data):
    """Rotations/reflections of the cell, atom permutations, translations and integer shifts leave
    predict and transform unchanged (each transformed copy is built independently with ase)."""
    X = data[0][:12]
    p0, e0 = fitted.predict(X), fitted.transform(X)
    assert np.std(p0) > 1e-3  # predictions vary, so the comparisons are not trivial
    rng = np.random.default_rng(3)
    variants = {}
    for name, proper in (("rotation", True), ("reflection", False)):
        R = _rotation(7, proper)
        rotated = []
        for a in X:
            b = a.copy()
            b.set_cell(a.cell[:] @ R, scale_atoms=True)
            assert np.allclose(b.get_all_distances(mic=True), a.get_all_distances(mic=True), atol=1e-8)
            rotated.append(b)
        variants[name] = rotated
    variants["permutation"] = [a[rng.permutation(len(a))] for a in X]
    shifted = []
    for a in X:
        b = a.copy()
        frac = b.get_scaled_positions() + rng.uniform(0, 1, 3) + rng.integers(-2, 3, (len(b), 3))
        b.set_scaled_positions(frac)
        shifted.append(b)
    variants["translation"] = shifted
    for name, Xv in variants.items():
        np.testing.assert_allclose(fitted.predict(Xv), p0, rtol=1e-4, atol=1e-4 * np.abs(p0).max(), err_msg=name)
        np.testing.assert_allclose(fitted.transform(Xv), e0, atol=1e-4 * np.abs(e0).max(), err_msg=name)
    # sanity: a change of the structure does change the prediction
    strained = []
    for a in X:
        b = a.copy()
        b.set_cell(a.cell[:] * 1.2, scale_atoms=True)
        strained.append(b)
    assert np.abs(fitted.predict(strained) - p0).max() > 1e-3


def test_predict_and_transform_shapes(fitted, data):
    X = data[0]
    p, e = fitted.predict(X), fitted.transform(X)
    assert p.shape == (len(X),) and p.dtype == np.float64
    assert e.shape == (len(X), 16) and e.dtype == np.float64
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(e))


def test_minibatched_prediction_matches_one_by_one(fitted, data, monkeypatch):
    X = data[0][:10]
    one_by_one = np.array([fitted.predict([a])[0] for a in X])
    emb_one = np.concatenate([fitted.transform([a]) for a in X])
    monkeypatch.setattr(pr_module, "PREDICT_MAX_EDGES", 5)  # several crystals per chunk only when tiny
    assert len(pr_module._edge_chunks(np.array([len(a) for a in X]), 5)) > 2
    np.testing.assert_allclose(fitted.predict(X), one_by_one, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitted.transform(X), emb_one, rtol=1e-5, atol=1e-6)


def test_edge_chunks():
    chunks = pr_module._edge_chunks(np.array([2, 2, 3, 5, 1, 1]), 10)
    # costs 4, 4, 9, 25, 1, 1 -> [4, 4] | [9] | [25] (alone, above budget) | [1, 1]
    assert chunks == [(0, 2), (2, 3), (3, 4), (4, 6)]


def test_standardisation_is_affine_equivariant(data):
    """Training on a*y + b (a > 0) sees the same standardised targets, so predictions are a*p + b."""
    X, y = data
    a, b = 250.0, -40.0
    m1 = _model().fit(X, y)
    m2 = _model().fit(X, a * y + b)
    assert m1.y_mean_ == pytest.approx(np.mean(y)) and m1.y_std_ == pytest.approx(np.std(y))
    np.testing.assert_allclose(m2.predict(X), a * m1.predict(X) + b, rtol=1e-5, atol=1e-4 * a)
    raw = _model(standardize_y=False).fit(X, y)
    assert raw.y_mean_ == 0.0 and raw.y_std_ == 1.0
    const = _model().fit(X, np.full(len(X), 3.0))
    assert const.y_std_ == 1.0 and np.allclose(const.predict(X[:3]), 3.0, atol=1.0)


def test_mse_loss_matches_history(data):
    """history_ is the epoch-mean loss; with max_epochs=1 and lr -> tiny it equals the loss of the initial model."""
    X, y = data
    for loss, fn in (("l1", np.abs), ("mse", np.square)):
        model = _model(loss=loss, max_epochs=1, batch_size=len(X), learning_rate=1e-12).fit(X, y)
        z = (model.predict(X) - y) / model.y_std_
        assert model.history_[0] == pytest.approx(np.mean(fn(z)), rel=1e-4)


def test_errors(data):
    X, y = data
    with pytest.raises(ShapeError, match=r"y has length 47 but 48 structures were given"):
        _model().fit(X, y[:-1])
    bad = y.copy()
    bad[5] = np.nan
    with pytest.raises(NonFiniteError, match=r"y\[5\] is nan .*targets must be finite"):
        _model().fit(X, bad)
    bad[5] = np.inf
    with pytest.raises(NonFiniteError, match=r"y\[5\] is inf"):
        _model().fit(X, bad)
    with pytest.raises(ShapeError, match=r"y has shape \(48, 2\), expected \(48,\)"):
        _model().fit(X, np.stack([y, y], 1))
    with pytest.raises(CrystalfitError, match="y cannot be converted to floats"):
        _model().fit(X, ["a"] * len(X))
    with pytest.raises(CrystalfitError, match="loss must be one of \\['l1', 'mse'\\], got 'huber'"):
        _model(loss="huber").fit(X, y)
    with pytest.raises(CrystalfitError, match="embedding_dim must be a positive integer, got 0"):
        _model(embedding_dim=0).fit(X, y)
    with pytest.raises(CrystalfitError, match=r"unknown network setting\(s\) \['hidden'\]"):
        _model(network=dict(hidden=3)).fit(X, y)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        _model().predict(X)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        _model().transform(X)


def test_score_needs_y_and_unseen_element_warns(fitted, data):
    X, y = data
    with pytest.raises(CrystalfitError, match="y is None"):
        fitted.score(X)
    other = X[0].copy()
    other.numbers[:] = 26
    with pytest.warns(UserWarning, match=r"Fe \(Z=26\) never seen during fit \(first in structure 1\)"):
        fitted.predict([X[1], other])


def test_grid_search_over_network_setting(data):
    X, y = data
    search = GridSearchCV(_model(), {"network__hidden_scalars": [8, 16]}, cv=2)
    search.fit(X, y)
    assert search.best_params_["network__hidden_scalars"] in (8, 16)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    best = search.best_estimator_
    assert best.network_settings()["hidden_scalars"] == search.best_params_["network__hidden_scalars"]
    assert best.module_.net.hidden_scalars == search.best_params_["network__hidden_scalars"]
    assert clone(best).get_params()["network__hidden_scalars"] == search.best_params_["network__hidden_scalars"]
