"""Pure-torch crystal geometry (no crystal objects, no I/O).

Conventions: lattice matrices are ``(..., 3, 3)`` with the lattice vectors
a, b, c as **rows** (Angstrom); Cartesian positions are ``frac @ lattice``.
"""
from .lattice import (
    cart_to_frac,
    frac_to_cart,
    lattice_matrix_to_params,
    lattice_params_to_matrix,
    metric_tensor,
    min_pair_distance,
    minimum_image_frac,
    polar_factor,
    reciprocal_lattice,
    reduce_lattice,
    relabel_basis,
    signed_permutations,
    wrap_frac,
)

__all__ = [
    "cart_to_frac",
    "frac_to_cart",
    "lattice_matrix_to_params",
    "lattice_params_to_matrix",
    "metric_tensor",
    "min_pair_distance",
    "minimum_image_frac",
    "polar_factor",
    "reciprocal_lattice",
    "reduce_lattice",
    "relabel_basis",
    "signed_permutations",
    "wrap_frac",
]
