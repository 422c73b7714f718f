"""Distribution distances between generated and reference sets.

* Wasserstein-1 distances (``scipy.stats.wasserstein_distance``, the papers'
  "EMD") of the density (g/cm^3), the number of distinct elements and a
  property (given values, or the predictions of a model with ``.predict``),
  as in CDVAE/DiffCSP ``compute_metrics.py::GenEval``.
* The Frechet distance between two embedding distributions (GemsDiff's FAD,
  "Frechet ALIGNN Distance"):
  ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.
  GemsDiff embeds crystals with a pretrained ALIGNN whose last layer is
  removed.  ALIGNN is not available here: :func:`frechet_model_distance`
  takes any fitted model with ``.transform(structures) -> (n, d)`` (a
  crystalfit ``PropertyRegressor`` provides one), so FAD values depend on
  that model and are not comparable with the paper's numbers.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from ..exceptions import CrystalfitError, ShapeError
from ._utils import as_float_array, as_structures

__all__ = [
    "densities",
    "n_elements",
    "wasserstein_density",
    "wasserstein_n_elements",
    "wasserstein_property",
    "predict_property",
    "frechet_distance",
    "frechet_distance_gaussian",
    "frechet_model_distance",
]


def densities(structures: Sequence[Any]) -> np.ndarray:
    """Mass density of each structure, g/cm^3 (pymatgen ``Structure.density``).

    Returns
    -------
    numpy.ndarray, shape (n,)
        NaN for ``None`` entries.
    """
    structs = as_structures(structures, "structures")
    return np.asarray([np.nan if s is None else float(s.density) for s in structs], dtype=float)


def n_elements(structures: Sequence[Any]) -> np.ndarray:
    """Number of distinct elements of each structure, shape (n,) float (NaN for None)."""
    structs = as_structures(structures, "structures")
    return np.asarray([np.nan if s is None else len(set(s.atomic_numbers)) for s in structs], dtype=float)


def _wasserstein(a: np.ndarray, b: np.ndarray, what: str) -> float:
    from scipy.stats import wasserstein_distance

    a = a[np.isfinite(a)]
    b = b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        raise CrystalfitError(
            f"cannot compute the Wasserstein distance of {what}: the generated set has {len(a)} and the "
            f"reference set {len(b)} finite values; both need at least one valid structure"
        )
    return float(wasserstein_distance(a, b))


def wasserstein_density(generated: Sequence[Any], reference: Sequence[Any]) -> float:
    """Wasserstein-1 distance between the densities (g/cm^3) of two sets.

    ``None`` entries are skipped.  Returns a float in g/cm^3 (the papers' d_rho).
    """
    return _wasserstein(densities(generated), densities(reference), "density")


def wasserstein_n_elements(generated: Sequence[Any], reference: Sequence[Any]) -> float:
    """Wasserstein-1 distance between the numbers of distinct elements (the papers' d_elem)."""
    return _wasserstein(n_elements(generated), n_elements(reference), "the number of elements")


def predict_property(model: Any, structures: Sequence[Any]) -> np.ndarray:
    """``model.predict`` on the non-None structures (as ase.Atoms); NaN for None.

    Parameters
    ----------
    model : object with ``predict(list_of_atoms) -> array (n,)``
    structures : sequence of ase.Atoms / pymatgen Structure / None

    Returns
    -------
    numpy.ndarray, shape (n,)
    """
    if not hasattr(model, "predict"):
        raise CrystalfitError(
            f"property model of type {type(model).__name__} has no .predict method; pass a fitted regressor "
            "(e.g. crystalfit PropertyRegressor) or the property values themselves"
        )
    from ..io import to_atoms

    structs = as_structures(structures, "structures")
    keep = [i for i, s in enumerate(structs) if s is not None]
    out = np.full(len(structs), np.nan)
    if keep:
        atoms = [to_atoms(structs[i], i) for i in keep]
        pred = np.asarray(model.predict(atoms), dtype=float).reshape(-1)
        if pred.shape != (len(keep),):
            raise ShapeError(
                f"model.predict returned shape {pred.shape}, expected ({len(keep)},) = one value per structure; "
                "use a single-target regressor"
            )
        out[keep] = pred
    return out


def wasserstein_property(generated, reference, model: Any = None) -> float:
    """Wasserstein-1 distance of a property between two sets (the papers' d_E / d_prop).

    Parameters
    ----------
    generated, reference : sequence
        Property values (floats, NaN/None skipped) when ``model`` is None;
        otherwise structures, whose values are ``model.predict``.
    model : object with ``.predict``, optional

    Returns
    -------
    float
        In the property's unit.
    """
    if model is None:
        a, b = as_float_array(generated, "generated"), as_float_array(reference, "reference")
    else:
        a, b = predict_property(model, generated), predict_property(model, reference)
    return _wasserstein(a, b, "the property")


def _moments(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 2:
        raise ShapeError(
            f"{name} has shape {x.shape}, expected (n, d) with n >= 2 samples; pass one embedding row per structure"
        )
    if not np.all(np.isfinite(x)):
        raise CrystalfitError(f"{name} contains NaN or inf; drop those rows (failed structures) first")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance_gaussian(mu_a, sigma_a, mu_b, sigma_b, eps: float = 1e-6) -> float:
    """Frechet (2-Wasserstein squared) distance of two Gaussians.

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))`` with
    ``scipy.linalg.sqrtm``; the real part is kept (round-off makes tiny
    imaginary parts), ``eps * I`` is added to both covariances when the
    product is singular enough to give a non-finite square root, and a tiny
    negative total (round-off) is clamped to 0.

    Parameters
    ----------
    mu_a, mu_b : array, shape (d,)
    sigma_a, sigma_b : array, shape (d, d)

    Returns
    -------
    float
        In squared embedding units.
    """
    from scipy.linalg import sqrtm

    mu_a, mu_b = np.atleast_1d(mu_a).astype(float), np.atleast_1d(mu_b).astype(float)
    sa, sb = np.atleast_2d(sigma_a).astype(float), np.atleast_2d(sigma_b).astype(float)
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or sa.shape != (d, d) or sb.shape != (d, d):
        raise ShapeError(
            f"moment shapes do not agree: mu_a {mu_a.shape}, mu_b {mu_b.shape}, sigma_a {sa.shape}, "
            f"sigma_b {sb.shape}; expected (d,), (d,), (d, d), (d, d)"
        )
    diff = mu_a - mu_b
    with warnings.catch_warnings():  # singular products are handled below
        warnings.simplefilter("ignore")
        covmean = sqrtm(sa @ sb)
        if not np.all(np.isfinite(covmean)):
            offset = eps * np.eye(d)
            covmean = sqrtm((sa + offset) @ (sb + offset))
    covmean = np.real(covmean)
    value = float(diff @ diff + np.trace(sa) + np.trace(sb) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def frechet_distance(embeddings_a, embeddings_b) -> float:
    """Frechet distance between two sets of embeddings (FID / FAD).

    Parameters
    ----------
    embeddings_a : array, shape (n_a, d)
    embeddings_b : array, shape (n_b, d)
        One row per structure; n_a, n_b >= 2.  The covariances are the
        unbiased sample covariances (``numpy.cov``), as in FID code.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(200, 3))
    >>> round(frechet_distance(x, x), 8)
    0.0
    """
    mu_a, s_a = _moments(embeddings_a, "embeddings_a")
    mu_b, s_b = _moments(embeddings_b, "embeddings_b")
    if mu_a.shape != mu_b.shape:
        raise ShapeError(
            f"embeddings_a has dimension {mu_a.shape[0]} but embeddings_b has {mu_b.shape[0]}; embed both sets "
            "with the same model"
        )
    return frechet_distance_gaussian(mu_a, s_a, mu_b, s_b)


def frechet_model_distance(generated: Sequence[Any], reference: Sequence[Any], model: Any) -> float:
    """FAD-like Frechet distance of ``model.transform`` embeddings of two structure sets.

    ``None`` entries are skipped.  ``model.transform(list_of_atoms)`` must
    return an array of shape (n, d).  See the module docstring for the
    ALIGNN substitution.
    """
    if not hasattr(model, "transform"):
        raise CrystalfitError(
            f"embedding model of type {type(model).__name__} has no .transform method; pass a fitted model whose "
            "transform(structures) returns (n, d) embeddings, e.g. crystalfit PropertyRegressor"
        )
    from ..io import to_atoms

    embs = []
    for name, items in (("generated", generated), ("reference", reference)):
        atoms = [to_atoms(s, i) for i, s in enumerate(as_structures(items, name)) if s is not None]
        embs.append(np.asarray(model.transform(atoms), dtype=float))
    return frechet_distance(embs[0], embs[1])
