"""e3nn networks: the periodic equivariant backbone, its input features and heads."""
from .backbone import (
    EDGE_GEOMETRIES,
    EquivariantRMSNorm,
    InteractionBlock,
    PeriodicEquivariantNetwork,
    fully_connected_edges,
    image_edge_geometry,
)
from .embeddings import (
    GaussianRadialBasis,
    SinusoidalTimeEmbedding,
    fourier_features,
    joint_fourier_features,
    lattice_invariants,
    periodic_envelope,
    reciprocal_vectors,
)
from .heads import LatticeHead, ScalarMLP, cartesian_to_fractional_gradient, segment_mean

__all__ = [
    "EDGE_GEOMETRIES",
    "EquivariantRMSNorm",
    "GaussianRadialBasis",
    "InteractionBlock",
    "LatticeHead",
    "PeriodicEquivariantNetwork",
    "ScalarMLP",
    "SinusoidalTimeEmbedding",
    "cartesian_to_fractional_gradient",
    "fourier_features",
    "fully_connected_edges",
    "image_edge_geometry",
    "joint_fourier_features",
    "lattice_invariants",
    "periodic_envelope",
    "reciprocal_vectors",
    "segment_mean",
]
