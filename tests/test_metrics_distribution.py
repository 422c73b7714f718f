"""Wasserstein distances and the Frechet (FAD) distance."""
import numpy as np
import pytest
from ase.build import bulk
from scipy.linalg import eigh

from crystalfit.exceptions import CrystalfitError, ShapeError
from crystalfit.metrics import (
    densities,
    frechet_distance,
    frechet_distance_gaussian,
    frechet_model_distance,
    n_elements,
    wasserstein_density,
    wasserstein_n_elements,
    wasserstein_property,
)

AMU_TO_G = 1.66053906660e-24  # g
A3_TO_CM3 = 1e-24


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_gaussian_closed_forms():
    rng = np.random.default_rng(1)
    # commuting (diagonal) covariances: ||dmu||^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = rng.uniform(0.2, 3, 4), rng.uniform(0.2, 3, 4)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_gaussian(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # general case: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2) (a symmetric PSD matrix, eigh)
    s1, s2 = random_spd(rng, 5), random_spd(rng, 5)
    w, v = eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr = np.sum(np.sqrt(np.clip(eigh(r1 @ s2 @ r1)[0], 0, None)))
    expected = np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance_gaussian(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_of_two_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    d, n = 3, 40000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.25])
    s1, s2 = np.diag([1.0, 2.0, 0.5]), np.diag([0.5, 1.0, 1.5])
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(np.diag(s1)) - np.sqrt(np.diag(s2))) ** 2)
    assert frechet_distance(x, y) == pytest.approx(exact, abs=0.05)
    # the sample version equals the closed form of the sample moments
    got = frechet_distance_gaussian(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
    assert frechet_distance(x, y) == pytest.approx(got, rel=1e-12)


def test_frechet_handles_singular_covariances_and_1d():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 10))  # n < d: singular covariance
    assert np.isfinite(frechet_distance(x, x + 1.0))
    assert frechet_distance(x, x + 1.0) == pytest.approx(10.0, rel=1e-4)
    a, b = rng.normal(0, 1, 500), rng.normal(2, 3, 500)
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ShapeError, match=r"embeddings_a has dimension 10 but embeddings_b has 3"):
        frechet_distance(x, rng.normal(size=(5, 3)))
    with pytest.raises(ShapeError, match=r"expected \(n, d\) with n >= 2"):
        frechet_distance(x[:1], x)


def test_density_and_n_elements_by_hand():
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    nacl = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    by_hand = [a.get_masses().sum() * AMU_TO_G / (a.get_volume() * A3_TO_CM3) for a in (cu, nacl)]
    np.testing.assert_allclose(densities([cu, nacl, None])[:2], by_hand, rtol=1e-4)
    assert np.isnan(densities([None])[0])
    np.testing.assert_array_equal(n_elements([cu, nacl]), [1, 2])


def test_wasserstein_distances_by_hand():
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    nacl = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    rho = densities([cu, nacl])
    # equal-size 1-D samples: W1 = mean |sorted(a) - sorted(b)|
    assert wasserstein_density([cu, cu], [cu, nacl]) == pytest.approx(abs(rho[0] - rho[1]) / 2)
    assert wasserstein_n_elements([cu, cu, None], [nacl, cu]) == pytest.approx(0.5)
    assert wasserstein_property([1.0, 2.0, None], [2.0, 3.0]) == pytest.approx(1.0)
    with pytest.raises(CrystalfitError, match="the generated set has 0"):
        wasserstein_density([None], [cu])


class NAtomsModel:
    """Toy property/embedding model: property = number of atoms."""

    def predict(self, atoms):
        return np.array([len(a) for a in atoms], dtype=float)

    def transform(self, atoms):
        return np.array([[len(a), a.get_volume() / len(a)] for a in atoms])


def test_property_and_embedding_models():
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)  # 4 atoms
    nacl = bulk("NaCl", "rocksalt", a=5.64, cubic=True)  # 8 atoms
    assert wasserstein_property([cu, cu, None], [nacl, cu], model=NAtomsModel()) == pytest.approx(2.0)
    gen, ref = [cu, nacl, cu], [cu, nacl, cu, None]
    emb = NAtomsModel().transform([cu, nacl, cu])
    assert frechet_model_distance(gen, ref, NAtomsModel()) == pytest.approx(frechet_distance(emb, emb), abs=1e-9)
    with pytest.raises(CrystalfitError, match="has no .transform method"):
        frechet_model_distance(gen, ref, object())
