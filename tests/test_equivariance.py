"""Shipped symmetry checks: the backbone passes them, deliberately broken models fail them."""
import numpy as np
import pytest
import torch
from ase.build import bulk

from crystalfit.exceptions import CrystalfitError
from crystalfit.io import structures_to_batch
from crystalfit.nn import PeriodicEquivariantNetwork, fourier_features, lattice_invariants
from crystalfit.testing import (
    check_all,
    check_batch_independence,
    check_integer_shift_invariance,
    check_permutation_equivariance,
    check_rotation_equivariance,
    check_translation_invariance,
    random_orthogonal,
)

TINY = dict(hidden_scalars=16, hidden_vectors=4, n_layers=2, n_freqs=4, n_radial=4, time_dim=8)


def _strained(atoms, seed):
    """Rattle and shear a structure so that no symmetry hides a broken equivariance."""
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    atoms.rattle(0.15, seed=seed)
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.08 * rng.normal(size=(3, 3))), scale_atoms=True)
    return atoms


@pytest.fixture(scope="module")
def batch():
    return structures_to_batch([
        _strained(bulk("NaCl", "rocksalt", a=5.6), 1),
        bulk("Cu"),  # one atom: self-loop only
        _strained(bulk("Si", "diamond", a=5.43, cubic=True), 2),
        _strained(bulk("MgO", "rocksalt", a=4.2, cubic=True), 3),
    ])


def _net(**kw):
    torch.manual_seed(0)
    return PeriodicEquivariantNetwork(**{**TINY, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backbone_passes_every_check(batch, dtype):
    net = _net(cond_dim=2, n_atom_scalars=3, n_crystal_scalars=2)
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(t=torch.tensor([1.0, 250.0, 600.0, 999.0]), cond=torch.randn(4, 2, generator=gen))
    atom_kwargs = dict(type_probs=torch.softmax(torch.randn(batch.num_nodes, 101, generator=gen), -1).to(dtype))
    check_all(net, batch, dtype=dtype, crystal_kwargs=kwargs)
    check_all(net, batch, dtype=dtype, crystal_kwargs=kwargs, atom_kwargs=atom_kwargs)
    out = net.to(dtype)(batch.to(dtype=dtype), **kwargs)
    # non-trivial outputs, so the checks above compare something
    assert out["atom_vectors"].abs().min(dim=0).values.max() > 1e-4
    assert out["lattice"].abs().max() > 1e-3 and out["crystal_scalars"].abs().max() > 1e-4


@pytest.mark.parametrize("lmax", [1, 3])
def test_backbone_other_lmax(batch, lmax):
    check_all(_net(lmax=lmax, n_layers=2), batch, dtype=torch.float64, crystal_kwargs=dict(t=torch.arange(4)))


def test_checks_leave_the_model_untouched(batch):
    net = _net()
    check_rotation_equivariance(net, batch, dtype=torch.float64)
    assert next(net.parameters()).dtype == torch.float32 and net.training


def test_random_orthogonal():
    q = random_orthogonal(6, torch.Generator().manual_seed(3))
    torch.testing.assert_close(q @ q.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(6, 3, 3))
    det = torch.linalg.det(q)
    assert det[0] == pytest.approx(-1.0) and torch.allclose(det.abs(), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(torch.linalg.det(random_orthogonal(6, torch.Generator(), reflection=False)),
                          torch.ones(6, dtype=torch.float64))


# ------------------------------------------------------- negative controls
class _Toy(torch.nn.Module):
    """Base of the broken models: an invariant, periodic per-atom feature plus one defect."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(9 + 24, 4)

    def invariant(self, batch):
        src = batch.frac[:, None, :] - batch.frac[None, :, :]
        same = (batch.batch[:, None] == batch.batch[None, :]).to(batch.frac.dtype)
        fourier = fourier_features(src.reshape(-1, 3), 4).reshape(len(batch.frac), len(batch.frac), -1)
        per_atom = (fourier * same[..., None]).sum(1) / same.sum(1, keepdim=True)
        return self.mix(torch.cat([lattice_invariants(batch.lattice, 5.0)[batch.batch], per_atom], -1))


class CartesianToy(_Toy):
    """Uses raw Cartesian positions: not rotation, translation or integer-shift invariant."""

    def forward(self, batch):
        return {"atom_scalars": self.invariant(batch) + batch.cart.sum(-1, keepdim=True)}


class NonPeriodicToy(_Toy):
    """Uses raw fractional coordinates: rotation invariant but not periodic."""

    def forward(self, batch):
        return {"atom_scalars": self.invariant(batch) + torch.sin(batch.frac).sum(-1, keepdim=True)}


class AtomIndexToy(_Toy):
    """Depends on the storage order of the atoms within each crystal."""

    def forward(self, batch):
        index = torch.arange(len(batch.frac), device=batch.frac.device) - batch.ptr[batch.batch]
        return {"atom_scalars": self.invariant(batch) + 0.1 * index[:, None].to(batch.frac.dtype)}


class BatchMixToy(_Toy):
    """Adds a mean over the whole batch, so crystals influence each other."""

    def forward(self, batch):
        s = self.invariant(batch)
        return {"atom_scalars": s + s.mean(0, keepdim=True)}


class PseudoVectorToy(_Toy):
    """Cross product a x b: a rotation-equivariant pseudo-vector that flips under reflections."""

    def forward(self, batch):
        a, b = batch.lattice[:, 0], batch.lattice[:, 1]
        return {"atom_vectors": torch.linalg.cross(a, b)[batch.batch] * self.invariant(batch)[:, :1]}


class LeftLatticeToy(_Toy):
    """``L @ M`` instead of ``M @ L``: not equivariant as a lattice output."""

    def forward(self, batch):
        m = torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0, -0.2], [0.5, 0.0, 1.0]], dtype=batch.frac.dtype)
        return {"lattice": batch.lattice @ m}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_toy_base_is_invariant(batch, dtype):
    """The negative controls below fail only because of their defect."""
    class Plain(_Toy):
        def forward(self, batch):
            return self.invariant(batch)

    torch.manual_seed(0)
    check_all(Plain(), batch, dtype=dtype)


@pytest.mark.parametrize(
    "toy, failing",
    [
        (CartesianToy, {"rotation", "translation", "integer_shift"}),
        (NonPeriodicToy, {"translation", "integer_shift"}),
        (AtomIndexToy, {"permutation"}),
        (BatchMixToy, {"batch_independence"}),
        (PseudoVectorToy, {"rotation"}),
        (LeftLatticeToy, {"rotation"}),
    ],
)
def test_broken_models_are_caught(batch, toy, failing):
    torch.manual_seed(0)
    model = toy()
    checks = {
        "rotation": check_rotation_equivariance,
        "permutation": check_permutation_equivariance,
        "translation": check_translation_invariance,
        "integer_shift": check_integer_shift_invariance,
        "batch_independence": check_batch_independence,
    }
    key = "atom_vectors" if toy is PseudoVectorToy else "lattice" if toy is LeftLatticeToy else "atom_scalars"
    for dtype in (torch.float32, torch.float64):
        for name, check in checks.items():
            if name in failing:
                with pytest.raises(AssertionError, match=rf"output '{key}' deviates by max"):
                    check(model, batch, dtype=dtype)
            else:
                check(model, batch, dtype=dtype)
    with pytest.raises(AssertionError) as info:
        check_all(model, batch)
    assert str(info.value).count("deviates") == len(failing)


def test_pseudo_vector_passes_without_reflections(batch):
    torch.manual_seed(0)
    check_rotation_equivariance(PseudoVectorToy(), batch, reflection=False)


def test_tensor_outputs_and_custom_transforms(batch):
    """A plain tensor output named 'output' can be declared a vector."""
    net = _net()

    def vectors_only(b):
        return net(b)["atom_vectors"]

    batch32 = batch.to(dtype=torch.float32)
    check_rotation_equivariance(vectors_only, batch32, dtype=None, transforms={"output": "vector"})
    with pytest.raises(AssertionError, match="rotation equivariance: output 'output' deviates"):
        check_rotation_equivariance(vectors_only, batch32, dtype=None)


def test_misuse_is_reported(batch):
    with pytest.raises(CrystalfitError, match=r"output 'output' has shape \(7,\)"):
        check_translation_invariance(lambda b: torch.zeros(7), batch)
    with pytest.raises(CrystalfitError, match="transforms\\['output'\\] is 'spinor'"):
        check_rotation_equivariance(lambda b: b.frac, batch, transforms={"output": "spinor"})
    with pytest.raises(CrystalfitError, match="checks contains \\['mirror'\\]"):
        check_all(lambda b: b.frac, batch, checks=("mirror",))
    with pytest.raises(CrystalfitError, match="model returned str"):
        check_translation_invariance(lambda b: "x", batch)
