"""Estimator conformance suite, run over every crystalfit estimator.

:func:`check_estimator` fits a (small) estimator a few times and checks the
scikit-learn contract of ARCHITECTURE.md.  Each failed rule raises an
``AssertionError`` naming the rule.
"""
from __future__ import annotations

import inspect
import io
import tempfile
from pathlib import Path

import numpy as np


def _fail(rule: str, detail: str) -> None:
    raise AssertionError(f"estimator conformance: {rule}: {detail}")


def _same_structures(a, b, atol=1e-6) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.get_chemical_symbols() != y.get_chemical_symbols():
            return False
        if not np.allclose(x.cell[:], y.cell[:], atol=atol) or not np.allclose(
            x.get_scaled_positions(), y.get_scaled_positions(), atol=atol
        ):
            return False
    return True


def check_estimator(estimator, X, y=None, *, sample_args=None, sample_kwargs=None, nested_param=None) -> None:
    """Check the crystalfit estimator contract on ``estimator`` (unfitted) and data ``X``.

    Parameters
    ----------
    estimator : a crystalfit estimator, unfitted, configured small (few epochs).
    X, y : training data passed to ``fit``.
    sample_args, sample_kwargs : arguments of ``sample`` for generative estimators
        (``None`` skips the sampling checks).
    nested_param : (name, value), optional
        A nested network setting such as ``("network__hidden_scalars", 8)``.

    Rules checked: __init__ stores parameters verbatim; clone; NotFittedError before fit;
    fit returns self and sets ``*_`` attributes with ``history_`` of one loss per epoch;
    ``random_state`` makes fit, score and sample reproducible; nested ``set_params``;
    ``score`` is a finite float; joblib pickling and ``save``/``load`` round trips
    preserve score and samples; sampled structures are periodic, finite, wrapped and
    carry provenance.
    """
    import joblib
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError

    params = estimator.get_params(deep=False)
    sig = inspect.signature(type(estimator).__init__)
    for name in params:
        if name not in sig.parameters:
            _fail("__init__ stores parameters", f"get_params has {name!r} not in __init__ signature")
        if getattr(estimator, name) is not params[name]:
            _fail("__init__ stores parameters", f"{name} was modified in __init__")
    if any(k.endswith("_") and not k.startswith("_") for k in vars(estimator)):
        _fail("no fitted state before fit", f"attributes {[k for k in vars(estimator) if k.endswith('_')]}")

    c = clone(estimator)
    if c.get_params(deep=False).keys() != params.keys():
        _fail("clone", "parameters differ after clone")

    for method, args in (("score", (X,)), ("save", (tempfile.mkdtemp(),))) + (
        (("sample", tuple(sample_args or ())),) if sample_args is not None else ()
    ):
        try:
            getattr(c, method)(*args)
        except NotFittedError:
            pass
        else:
            _fail("NotFittedError before fit", f"{method}() did not raise")

    fitted = clone(estimator)
    ret = fitted.fit(X, y) if y is not None else fitted.fit(X)
    if ret is not fitted:
        _fail("fit returns self", f"got {type(ret).__name__}")
    for attr in ("module_", "history_", "n_epochs_"):
        if not hasattr(fitted, attr):
            _fail("fitted attributes", f"{attr} missing after fit")
    max_epochs = params.get("max_epochs")
    if max_epochs is not None and (len(fitted.history_) != max_epochs or fitted.n_epochs_ != max_epochs):
        _fail("history_", f"{len(fitted.history_)} losses / n_epochs_={fitted.n_epochs_} for max_epochs={max_epochs}")
    if not all(np.isfinite(fitted.history_)):
        _fail("history_", "non-finite training loss")

    s1 = fitted.score(X, y) if y is not None else fitted.score(X)
    if not isinstance(s1, float) or not np.isfinite(s1):
        _fail("score", f"expected a finite float, got {s1!r}")
    s1b = fitted.score(X, y) if y is not None else fitted.score(X)
    if s1b != s1:
        _fail("score is deterministic", f"{s1} then {s1b}")

    if params.get("random_state", None) is not None:
        again = clone(estimator)
        again.fit(X, y) if y is not None else again.fit(X)
        if not np.allclose(again.history_, fitted.history_, rtol=1e-5, atol=1e-7):
            _fail("random_state makes fit reproducible", f"histories differ: {fitted.history_} vs {again.history_}")

    if nested_param is not None:
        name, value = nested_param
        tuned = clone(estimator).set_params(**{name: value})
        if tuned.get_params()[name] != value:
            _fail("nested set_params", f"{name} -> {tuned.get_params()[name]!r}, expected {value!r}")
        try:
            clone(estimator).set_params(**{name.split("__")[0] + "__no_such_setting": 1})
        except ValueError:
            pass
        else:
            _fail("nested set_params", "an unknown nested setting was accepted")

    samples = None
    if sample_args is not None:
        kw = dict(sample_kwargs or {})
        kw.setdefault("random_state", 123)
        samples = fitted.sample(*sample_args, **kw)
        if not isinstance(samples, list) or not samples:
            _fail("sample returns a list of Atoms", f"got {type(samples).__name__}")
        for i, atoms in enumerate(samples):
            if not np.all(atoms.pbc):
                _fail("sampled structures are periodic", f"sample {i} pbc={atoms.pbc}")
            frac = atoms.get_scaled_positions(wrap=False)
            if not np.all(np.isfinite(frac)) or frac.min() < 0 or frac.max() >= 1:
                _fail("sampled coordinates are finite and wrapped into [0, 1)", f"sample {i}")
            if "source" not in atoms.info and "source_id" not in atoms.info:
                _fail("provenance in atoms.info", f"sample {i} info={atoms.info}")
        again = fitted.sample(*sample_args, **kw)
        if not _same_structures(samples, again):
            _fail("random_state makes sample reproducible", "two calls with the same random_state differ")

    buf = io.BytesIO()
    joblib.dump(fitted, buf)
    buf.seek(0)
    loaded = joblib.load(buf)
    s2 = loaded.score(X, y) if y is not None else loaded.score(X)
    if not np.isclose(s2, s1, rtol=1e-5, atol=1e-7):
        _fail("pickle round trip", f"score {s1} became {s2}")
    if samples is not None and not _same_structures(samples, loaded.sample(*sample_args, **kw), atol=1e-5):
        _fail("pickle round trip", "samples differ after unpickling")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        fitted.save(path)
        import torch

        torch.load(path / "weights.pt", weights_only=True)  # must be a plain state dict
        back = type(fitted).load(path)
        s3 = back.score(X, y) if y is not None else back.score(X)
        if not np.isclose(s3, s1, rtol=1e-5, atol=1e-7):
            _fail("save/load round trip", f"score {s1} became {s3}")
        if back.get_params(deep=False).keys() != params.keys():
            _fail("save/load round trip", "parameters differ")
