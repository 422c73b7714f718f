"""Shipped checks: symmetry (equivariance) checks for crystal models and the
estimator conformance suite."""
from .equivariance import (
    DEFAULT_TOLERANCES,
    DEFAULT_TRANSFORMS,
    check_all,
    check_batch_independence,
    check_integer_shift_invariance,
    check_permutation_equivariance,
    check_rotation_equivariance,
    check_translation_invariance,
    random_orthogonal,
)
from .estimator_checks import check_estimator

__all__ = [
    "DEFAULT_TOLERANCES",
    "DEFAULT_TRANSFORMS",
    "check_all",
    "check_batch_independence",
    "check_estimator",
    "check_integer_shift_invariance",
    "check_permutation_equivariance",
    "check_rotation_equivariance",
    "check_translation_invariance",
    "random_orthogonal",
]
