"""evaluate_csp / evaluate_generation and the GridSearchCV scorers."""
import pickle

import numpy as np
import pytest
from ase.build import bulk
from sklearn.base import BaseEstimator
from sklearn.model_selection import GridSearchCV

from crystalfit.exceptions import CrystalfitError
from crystalfit.metrics import (
    evaluate_csp,
    evaluate_generation,
    get_scorer,
    get_scorer_names,
    match_rate,
    validity,
)
from _data import perov_rows





def unique_formula_rows(n):
    rows, seen = [], set()
    for a in perov_rows(4 * n):
        f = a.get_chemical_formula()
        if f not in seen:
            seen.add(f)
            rows.append(a)
        if len(rows) == n:
            return rows
    pytest.skip("not enough distinct compositions")


class OracleSampler(BaseEstimator):
    """Test double for the sampling protocol: returns noisy copies of known crystals."""

    def __init__(self, universe=None, noise=0.0, random_state=0):
        self.universe = universe
        self.noise = noise
        self.random_state = random_state

    def fit(self, X, y=None):
        from pymatgen.io.ase import AseAtomsAdaptor

        key = lambda a: AseAtomsAdaptor.get_structure(a).composition.formula.replace(" ", "")
        self.lookup_ = {key(a): a for a in self.universe}
        return self

    def _noisy(self, a, rng):
        b = a.copy()
        b.positions += rng.normal(scale=self.noise, size=b.positions.shape)
        return b

    def sample(self, composition=None, n_samples=1):
        rng = np.random.default_rng(self.random_state)
        if composition is None:
            pool = list(self.universe)
            return [self._noisy(pool[i % len(pool)], rng) for i in range(n_samples)]
        return [self._noisy(self.lookup_[f], rng) for f in composition for _ in range(n_samples)]


def test_evaluate_csp_one_sample_and_best_of_k():
    rows = perov_rows(4)
    rng = np.random.default_rng(0)
    far = []
    for a in rows:
        b = a.copy()
        b.positions += rng.normal(scale=1.2, size=b.positions.shape)
        far.append(b)
    one = evaluate_csp(rows, rows)
    assert one["match_rate"] == match_rate(rows, rows, gate="both")
    assert set(one) >= {"match_rate", "rmse", "n_reference", "n_candidates", "rms_per_reference"}
    k = evaluate_csp([[f, r] for f, r in zip(far, rows)], rows)
    assert k["n_candidates"] == 2 and k["match_rate"] == one["match_rate"]
    assert k["rmse"] == pytest.approx(0.0, abs=1e-8)


def test_evaluate_generation_against_itself():
    rows = [a for a in perov_rows(10) if validity([a])[0]][:6]
    assert len(rows) == 6

    class Model:
        def predict(self, atoms):
            return np.array([a.get_volume() for a in atoms])

        def transform(self, atoms):
            return np.array([[a.get_volume(), a.get_masses().sum()] for a in atoms])

    with pytest.warns(RuntimeWarning, match="only 6 valid generated crystals, fewer than n_samples=1000"):
        res = evaluate_generation(rows, rows, Model(), dataset="perov_5", n_samples=1000)
    for key in ("valid_struct", "valid_comp", "valid", "cov_r", "cov_p", "d_density", "d_property",
                "d_n_elements", "fad", "n_generated", "n_valid", "n_eval"):
        assert key in res
    assert res["cov_r"] == 1.0 and res["cov_p"] == 1.0
    assert res["valid_struct"] == 1.0 and res["valid_comp"] == 1.0 and res["valid"] == 1.0
    assert res["d_density"] == pytest.approx(0.0, abs=1e-12)
    assert res["d_n_elements"] == pytest.approx(0.0, abs=1e-12)
    assert res["d_property"] == pytest.approx(0.0, abs=1e-9)
    assert res["fad"] == pytest.approx(0.0, abs=1e-6)
    gen = list(rows[:3]) + [None]
    res = evaluate_generation(gen, rows, dataset="perov_5", n_samples=2)
    assert res["valid_struct"] == pytest.approx(0.75) and res["n_generated"] == 4
    assert res["n_eval"] == 2 and np.isnan(res["d_property"]) and np.isnan(res["fad"])
    assert res["cov_p"] <= 0.75


def test_scorer_protocol_and_gridsearch_picks_the_exact_sampler():
    rows = unique_formula_rows(6)
    scorer = get_scorer("match_rate")
    est = OracleSampler(universe=rows).fit(rows)
    assert scorer(est, rows) == 1.0
    assert get_scorer("neg_rmse")(est, rows) == pytest.approx(0.0, abs=1e-8)
    noisy = OracleSampler(universe=rows, noise=1.5).fit(rows)
    assert scorer(noisy, rows) < 0.5
    assert get_scorer("match_rate", n_samples=3)(noisy, rows) >= scorer(noisy, rows)
    assert get_scorer("valid_struct")(est, rows) == 1.0
    assert get_scorer("cov_r", dataset="perov_5")(est, rows) == 1.0
    assert get_scorer("neg_d_density")(est, rows) == pytest.approx(0.0, abs=1e-12)
    search = GridSearchCV(OracleSampler(universe=rows), {"noise": [1.5, 0.0]}, scoring=scorer, cv=2)
    search.fit(rows)
    assert search.best_params_ == {"noise": 0.0}
    assert search.best_score_ == 1.0
    assert pickle.loads(pickle.dumps(scorer))(est, rows[:2]) == 1.0


def test_scorer_errors():
    with pytest.raises(CrystalfitError, match="unknown scorer 'accuracy'"):
        get_scorer("accuracy")
    assert "match_rate" in get_scorer_names()

    class Bad:
        def sample(self, composition=None, n_samples=1):
            return []

    with pytest.raises(CrystalfitError, match="returned list of length 0, expected a list of 1 ase.Atoms"):
        get_scorer("match_rate")(Bad(), [bulk("Cu")])
