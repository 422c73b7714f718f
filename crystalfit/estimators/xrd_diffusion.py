"""XRDGuidedDiffusion: DiffCSP-style crystal structure prediction with
training-free X-ray diffraction guidance.

Paper: *Crystal Structure Generation Using a Diffusion Model Conditioned on
X-Ray Diffraction Intensities Without Label Learning* (shared/papers/
xrd-guided-diffusion.md).  Without intensities the sampler is the DiffCSP
baseline (joint lattice DDPM + wrapped-normal score matching on the torus,
predictor-corrector sampling).  With intensities, the periodic-Tweedie guidance
of :mod:`crystalfit.guidance` is added to the coordinate score in every
predictor step (Eqs. 45-46), rescaled to ``score_ratio`` times the score.

Differences from the paper, all documented in docs/xrd_guided_diffusion.md:

* the denoiser is crystalfit's light e3nn equivariant network instead of the
  512x6 CSPNet (CPU-sized; ``network=`` makes it bigger);
* sampling uses a strided time grid (``n_steps`` < T = 1000) by default;
* intensities are compared up to a least-squares overall scale (measured
  intensities have no absolute scale).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import CrystalBatch
from ..diffusion import (
    TIMESTEP_DENSITIES,
    CosineBetaSchedule,
    LatticeDDPM,
    WrappedNormalTorus,
    perturbed_noise_scale,
    sample_timesteps,
)
from ..exceptions import (
    CrystalfitError,
    NonFiniteError,
    ShapeError,
    TooManyAtomsError,
    UnknownElementError,
)
from ..geometry import min_pair_distance, relabel_basis, signed_permutations
from ..io import batch_to_atoms, parse_composition, structures_to_batch
from ..metrics.validity import STRUCT_MIN_DISTANCE
from ..nn import PeriodicEquivariantNetwork, lattice_invariants
from ..nn.embeddings import N_LATTICE_INVARIANTS
from ..sampling import predictor_corrector_sample
from .base import CrystalEstimator, make_generator, seed_from_random_state


#: Tweedie lattice estimates are clipped to this multiple of the largest training ||L||_F
#: during sampling (see LatticeDDPM.clip_eps).
LATTICE_CLIP_FACTOR = 1.5


class CSPDenoiser(nn.Module):
    """Denoiser for joint lattice / coordinate diffusion.

    ``forward(lattice (B,3,3), frac (N,3), numbers (N,), num_atoms (B,), batch (N,), t (B,),
    lattice_hint=None)`` returns ``(eps_lattice (B,3,3), pred_x (N,3))``: the lattice
    noise (an O(3)-equivariant ``M @ L_t`` output) and the normalised fractional score
    (rotation invariant: the l=1 head mapped through the lattice plus three invariant
    scalars per atom).

    With ``self_condition=True`` the atoms' geometry (Cartesian edge vectors) is built
    from ``lattice_hint``, an estimate of the clean lattice ``L_0`` (the Tweedie
    estimate of an earlier call), instead of the noisy ``L_t``, which is mostly noise
    at the times where the atomic arrangement is decided.  The network also receives
    the invariants of ``L_t``, the cross Gram matrix ``L_hint L_t^T`` and a flag
    telling whether a hint was given (it is trained with and without, so the first
    reverse step needs none).  This is the paper's score-network input
    ``[L_0, X_t, A]`` (Appendix B) made usable when ``L_0`` is not known.

    ``polar_lattice=True`` adds ``M2 @ U(L_t)`` to the lattice output, ``U`` the polar
    factor of ``L_t`` (:class:`crystalfit.nn.heads.LatticeHead`).
    """

    def __init__(self, self_condition: bool = False, polar_lattice: bool = False, **network_kwargs: Any) -> None:
        super().__init__()
        self.self_condition = bool(self_condition)
        cond_dim = N_LATTICE_INVARIANTS + 10 if self.self_condition else 0
        self.net = PeriodicEquivariantNetwork(n_atom_scalars=3, lattice_head=True, cond_dim=cond_dim,
                                              polar_lattice_head=polar_lattice, **network_kwargs)

    def forward(self, lattice, frac, numbers, num_atoms, batch, t, lattice_hint=None):
        geometry, cond = lattice, None
        if self.self_condition:
            geometry = lattice if lattice_hint is None else lattice_hint
            r2 = self.net.r_max**2
            cross = (geometry @ lattice.transpose(-1, -2)).reshape(-1, 9) / r2
            flag = lattice.new_full((lattice.shape[0], 1), float(lattice_hint is not None))
            cond = torch.cat([lattice_invariants(lattice, self.net.r_max), cross, flag], dim=-1)
        elif lattice_hint is not None:
            raise CrystalfitError("lattice_hint needs a denoiser built with self_condition=True")
        out = self.net(
            CrystalBatch(lattice=geometry, frac=frac, numbers=numbers, num_atoms=num_atoms, batch=batch), t,
            cond=cond, lattice_basis=lattice,
        )
        return out["lattice"], out["frac_vectors"] + out["atom_scalars"]


def _is_finite_real(v) -> bool:
    """True for a finite int or float (numpy scalars too), False for bools, strings, None, NaN and infinities."""
    return (not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer, np.floating))
            and bool(np.isfinite(v)))


class XRDGuidedDiffusion(CrystalEstimator):
    """Crystal structure prediction by diffusion, optionally guided by XRD intensities.

    Parameters
    ----------
    network : dict, optional
        Settings of :class:`crystalfit.nn.PeriodicEquivariantNetwork` (also settable
        as ``network__hidden_scalars=...``).  Defaults: see ``_network_defaults``.
    n_steps : int
        Reverse steps used by :meth:`sample` (strided over the T = 1000 training steps;
        2 network calls per step).  ``1000`` is the paper's full grid.
    max_epochs, batch_size, learning_rate : training settings (Adam, ReduceLROnPlateau
        factor 0.6 / patience 30, gradient clipping by value 0.5, as DiffCSP).
    warm_start : bool
        False (default): :meth:`fit` builds a new network.  True: a fitted model continues
        training its network for ``max_epochs`` more epochs on the structures given (any
        structures, e.g. the same set again); ``history_`` and ``n_epochs_`` go on counting.
        The optimiser starts afresh (Adam moments reset, learning rate back to
        ``learning_rate``, so a continuation usually wants a lower one), the training noise is
        drawn from ``random_state`` offset by the epochs already done, and the network
        settings (``network``, ``learn_lattice``, ``self_condition``, ``polar_lattice``) must
        be those the model was fitted with.  Use it to train in chunks on a CPU or to resume.
    ema_decay : float in [0, 1)
        0 (default) keeps the last optimiser iterate, as DiffCSP.  Otherwise the fitted
        weights are the exponential moving average of the iterates (decay per optimiser
        step, with the usual warm-up ``min(decay, (1 + n) / (10 + n))``).
    timestep_density : {"uniform", "linear"}
        Distribution of the diffusion time drawn per training structure
        (:func:`crystalfit.diffusion.sample_timesteps`).  "uniform" (default) is DiffCSP's;
        "linear" draws t with probability growing as t, so the noise levels at which a sample's
        arrangement is decided get more of the optimiser's steps (see docs/xrd_guided_diffusion.md,
        "Training-time density").
    augment_basis : bool
        False (default, as DiffCSP): every training crystal is seen in the basis it came in.
        True: at every training step each crystal is described in a basis drawn at random
        from its 48 relabellings by signed permutations (a, b, c -> +-b, +-c, +-a, ..., with
        the Cartesian frame turned along; :func:`crystalfit.geometry.relabel_basis`), the same
        crystal to every metric.  The network sees fractional coordinates and the lattice rows,
        so without it a prior ties arrangements to the axes they were seen along; with it an
        arrangement seen along one axis is proposed along the others too.  Trained on
        Crystal-1/3 and guided towards the unseen Crystal-2 (the paper's Table 2), it lifts the
        1-sample match rate at stol 0.5 from 4-5% to 40-48% (benchmarks/results/
        xrd_table2_augment_basis*.md); when the data themselves are told apart by their
        orientation in the cell (Crystal-1 and Crystal-2 share a heavy frame turned by 90
        degrees), it takes that cue away (docs/xrd_guided_diffusion.md, "Table 2").
    input_perturbation : float
        gamma >= 0, 0 by default (DiffCSP).  With gamma > 0 the coordinate noise of each
        training crystal is scaled by ``sqrt(1 + (gamma u)^2)``, u uniform on [0, 1), while
        the network is told t and regressed on the wrapped-normal score at ``sigma_t`` of the
        displacement applied (:func:`crystalfit.diffusion.perturbed_noise_scale`): the prior
        is then fitted out to ``sqrt(1 + gamma^2) sigma_t`` from the data, where guidance
        pushes atoms and plain denoising rarely trains it.  Training only; :meth:`score` and
        :meth:`denoising_loss` use the plain loss.  Measured (docs/xrd_guided_diffusion.md,
        "Input perturbation"): with gamma 1 one Table 1 training gained about one standard
        error and a second lost 25-42 points; gamma 2 lowered the rates; no help on Table D1.
    score_ratio : float
        Guidance strength r: per crystal, max|guidance| = r * max|score| (the paper's 1:r).
    hkl_range : int
        Miller indices h, k, l in ``-hkl_range..hkl_range`` ((2r+1)^3 reflections).
    step_lr : float
        Corrector step size (DiffCSP; 0 disables the corrector and halves the cost).
        The step is ``step_lr (sigma_t / sigma_1)^2`` per grid point whatever the
        stride, so a strided grid (``n_steps < timesteps``) relaxes towards the prior
        less than DiffCSP's 1000 steps.  With a well-trained prior, 3e-5 at 100 steps
        paired with ``score_ratio`` 15 gave 89% / 83% on Crystal-1/2
        (benchmarks/results/xrd_table1_corrector3e-5.md), and 4e-5 with
        ``ratio_reference="prediction"`` and ratio 60 gave 95.2% / 94.3% (one training seed; two
        others gave 97 / 74% and 85 / 10%, xrd_table1_replicate_seed*.md); with an undertrained one
        it pins the prior's mistakes, hence the default 1e-5
        (docs/xrd_guided_diffusion.md).
    zero_variance : bool
        Deterministic reverse process given the initial state (the paper's setting,
        Appendix B; default).  False adds the reverse-SDE noise (DiffCSP's sampler).
        On Crystal-1/2 (fixed lattice, 1:4) the guided match rate drops from 70%/82% to
        67%/63% with noise (benchmarks/results/xrd_ablation_fixed_lattice.md).
    ratio_reference : {"score", "prediction"}
        What ``score_ratio`` is measured against (:class:`crystalfit.guidance.XRDGuidance`):
        the score in true units (default), or the network's normalised output
        ``score / sqrt(lambda_t)`` (the paper's ``max|eps_hat_X|`` read as DiffCSP's
        ``pred_x``), with which the guidance is strong at high noise and fades as
        ``sigma``.  "prediction" with ``score_ratio`` 60 and ``step_lr`` 4e-5 gave the best
        1-sample Table 1 rates, 95.2% / 94.3% over 600 samples on a well-trained prior
        (benchmarks/results/xrd_table1_prediction_ratio*.md; one training seed, two others
        gave 97 / 74% and 85 / 10%); on Carbon-24 it did worse than the default.
    guide_corrector : bool
        Add the guidance to the corrector's score too (default False: the predictor only, the
        paper's Eqs. 45-46 and DiffCSP's guided sampler).  See
        :func:`crystalfit.sampling.predictor_corrector_sample`; it matters when ``step_lr`` is
        large against the predictor's steps, e.g. the paper's 1000 steps with 1e-5.
    guidance_jacobian : bool
        Differentiate the guidance through the score network (default True: the paper's full
        gradient, whose Eq. A12 carries the network's Jacobian ``d score / d x_t`` through the
        Tweedie mean).  False treats the score as a constant in the gradient, so the guidance is
        ``d loss / d m`` carried back only through ``m = x_t - delta`` (no backward pass through the
        network: about half the guided cost).  With ``guide_corrector=True`` and 1000 steps on
        the seed-0 ``preset("table1")`` prior it gave 96 / 87% (Crystal-1 / Crystal-2) at 1:1.5,
        where the full gradient collapses atoms onto shared sites (23 / 38% at 1:4)
        (benchmarks/results/xrd_table1_no_jacobian*.md, docs/xrd_guided_diffusion.md); the
        seed-40 prior gave 85 / 72%, and on Cu3Au (Table D1) it did worse than the full gradient.
        ``preset("toy")`` (the demo) samples this way: 95 / 99% with the lattice given, 300 steps,
        1:1.5 (benchmarks/results/demo_toy.json).
    expected_intensity : bool
        Guidance compares the posterior expectation ``E|F|^2`` with the measured
        intensities (default).  False uses the paper's Eq. (40), ``|E F|^2``, which
        also damps the ``v = xi`` terms and so underestimates the high-order
        intensities of blurred atoms (see :func:`crystalfit.xrd.structure_factor_intensities`).
    learn_lattice : bool
        Learn the lattice too.  With False only coordinates are learned and
        :meth:`sample` needs ``lattice=`` (paper Appendix D).
    self_condition : bool
        Off by default.  With ``learn_lattice=True``: the network builds the atoms' geometry from the
        Tweedie estimate of the clean lattice made by the previous network call instead
        of the noisy lattice ``L_t`` (see :class:`CSPDenoiser`).  Training takes a second,
        gradient-free forward pass on half the batches (about 1.2x the time); sampling
        costs nothing extra.  False is DiffCSP's network input ``(L_t, X_t, A)``.
    polar_lattice : bool
        The lattice noise is predicted as ``M L_t + M2 U(L_t)`` with ``U`` the orthogonal
        polar factor of ``L_t`` (see :class:`crystalfit.nn.heads.LatticeHead`); False is
        DiffCSP's ``M L_t``, with which the generated Crystal-1/2 cells scatter by
        +-0.2 A and +-1.5 degrees around the single training cell.
    timesteps, sigma_begin, sigma_end : diffusion settings (DiffCSP: 1000, 0.005, 0.5).
    device : "auto", "cpu", "cuda", ...
    random_state : int or None
    verbose : bool
        tqdm progress bars for fit and sample.

    Attributes
    ----------
    module_ : CSPDenoiser
    elements_ : list of int, atomic numbers seen during fit
    max_atoms_ : int, largest training structure
    history_ : list of float, mean training loss per epoch
    n_epochs_ : int
    last_sample_stats_ : dict, timing of the last :meth:`sample` call (``seconds``,
        ``seconds_per_structure``, ``n_model_calls``, ``n_structures``, ``n_returned``, ``guided``) and
        ``n_overlapping``: returned structures with two atoms closer than 0.5 A (structurally invalid by
        the field's criterion, SPEC.md 2.2; strong guidance makes them, docs/xrd_guided_diffusion.md,
        "Valid structures only"); every returned structure has ``info["min_distance"]`` (Angstrom)

    Examples
    --------
    >>> from crystalfit.datasets import make_perovskite_arrangements
    >>> X = make_perovskite_arrangements(["crystal-1", "crystal-2"], 64, random_state=0)
    >>> model = XRDGuidedDiffusion(max_epochs=1, n_steps=5, random_state=0).fit(X)
    >>> len(model.sample("CoN2OTl", n_samples=2))
    2
    """

    _fitted_json_attrs = ("elements_", "max_atoms_", "learned_lattice_", "lattice_norm_max_", "self_conditioned_",
                          "polar_lattice_")
    _fitted_json_defaults = {"self_conditioned_": False, "polar_lattice_": False}
    _network_defaults = dict(
        hidden_scalars=64,
        hidden_vectors=16,
        n_layers=3,
        n_freqs=16,
        n_radial=16,
        r_max=8.0,
        lmax=2,
        time_dim=64,
        edge_geometry="envelope",
        joint_freqs=0,
    )

    def __init__(
        self,
        network: dict | None = None,
        n_steps: int = 100,
        max_epochs: int = 100,
        batch_size: int = 256,
        learning_rate: float = 1e-3,
        warm_start: bool = False,
        ema_decay: float = 0.0,
        timestep_density: str = "uniform",
        augment_basis: bool = False,
        input_perturbation: float = 0.0,
        score_ratio: float = 4.0,
        hkl_range: int = 2,
        step_lr: float = 1e-5,
        zero_variance: bool = True,
        expected_intensity: bool = True,
        ratio_reference: str = "score",
        guide_corrector: bool = False,
        guidance_jacobian: bool = True,
        learn_lattice: bool = True,
        self_condition: bool = False,
        polar_lattice: bool = True,
        timesteps: int = 1000,
        sigma_begin: float = 0.005,
        sigma_end: float = 0.5,
        device: str = "auto",
        random_state: int | None = None,
        verbose: bool = False,
    ) -> None:
        self.network = network
        self.n_steps = n_steps
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.warm_start = warm_start
        self.ema_decay = ema_decay
        self.timestep_density = timestep_density
        self.augment_basis = augment_basis
        self.input_perturbation = input_perturbation
        self.score_ratio = score_ratio
        self.hkl_range = hkl_range
        self.step_lr = step_lr
        self.zero_variance = zero_variance
        self.expected_intensity = expected_intensity
        self.ratio_reference = ratio_reference
        self.guide_corrector = guide_corrector
        self.guidance_jacobian = guidance_jacobian
        self.learn_lattice = learn_lattice
        self.self_condition = self_condition
        self.polar_lattice = polar_lattice
        self.timesteps = timesteps
        self.sigma_begin = sigma_begin
        self.sigma_end = sigma_end
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ----------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "XRDGuidedDiffusion":
        """Settings used in the benchmarks: "toy" (``crystalfit demo``: Crystal-1/2 with a short
        training, about 4 min on 2 cores; fixed lattice, so :meth:`sample` needs ``lattice=``; guided
        corrector without the network Jacobian, 300 steps, 1:1.5, 95 / 99% guided in
        benchmarks/results/demo_toy.json), "table1"
        (Crystal-1/2 with the lattice generated: the 600-epoch training with the linear timestep
        density and the sampling settings of benchmarks/results/xrd_table1_linear_seed*.md, 85.5 /
        83.7%, 84.0 / 78.5% and 87.5 / 92.5% for training seeds 0, 40 and 50; with
        ``sample(exchange_sites=True)`` 100 / 100% for seed 0 (xrd_table1_linear_seed0_exchange.md);
        uniform times, DiffCSP's, gave 95.2 / 94.3%, 97 / 74% and 85 / 10% for the same seeds;
        about 60 min of training on 2 CPU cores), "perov_5" and "carbon_24" (the settings of
        benchmarks/results/xrd_csp_perov_5_niggli_val_envelope.md and
        xrd_csp_carbon_24_niggli_val_600ep_seed0.md, both score ratios chosen on validation splits,
        Perov-5's by DiffCSP's gated rate (valid pairs only): Perov-5 59.5 / 74% unguided / guided,
        57.5 / 65% gated; Carbon-24 23 / 51% (gated 50%), and 63% and 57% guided on two other splits;
        its fits took 5,500-5,600 s with three sharing two CPU cores, a 300-epoch fit 1,771 s on a free
        core; both trained on Niggli-reduced cells, ``load_dataset(..., reduce="niggli")``), "paper"
        (the paper's 512x6 network and full 1000-step grid)."""
        presets = {
            # crystalfit demo's: lmax 1 (1.5x less time per step than lmax 2) and a 3x higher learning rate
            # sampling: the guidance in the corrector too and held off the network's Jacobian, at 1:1.5 and
            # 300 steps (docs/xrd_guided_diffusion.md, "Guidance without the prior's Jacobian")
            "toy": dict(max_epochs=120, batch_size=64, learning_rate=3e-3, network=dict(lmax=1), n_steps=300,
                        timestep_density="linear", score_ratio=1.5, guide_corrector=True, guidance_jacobian=False,
                        learn_lattice=False),
            "table1": dict(max_epochs=600, batch_size=64, n_steps=100, score_ratio=60.0, step_lr=4e-5,
                           ratio_reference="prediction", timestep_density="linear"),
            # 1:1 chosen on validation by the gated rate (session 24); 1:3 (sessions 2-23) made 33% of the
            # guided samples overlap atoms (< 0.5 A) and so lost 10 points under DiffCSP's gate
            "perov_5": dict(max_epochs=200, batch_size=64, n_steps=100, score_ratio=1.0, step_lr=5e-7),
            # 600 epochs (session 26): 51 / 63 / 57% guided on three splits, against 40 / 45 / 35% after 300
            # (docs/xrd_guided_diffusion.md, "Carbon-24 at 600 epochs"); 1:6 has the best validation rate
            # pooled over the three splits (56% against 45 / 54 / 51% at 1:3 / 1:10 / 1:15)
            "carbon_24": dict(max_epochs=600, batch_size=64, n_steps=100, score_ratio=6.0, step_lr=5e-6),
            "paper": dict(
                network=dict(hidden_scalars=512, hidden_vectors=64, n_layers=6),
                n_steps=1000, max_epochs=3000, batch_size=1024,
            ),
        }
        if name not in presets:
            raise CrystalfitError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        params = dict(presets[name])
        params.update(overrides)
        return cls(**params)

    # ---------------------------------------------------------------- internals
    def _processes(self, device):
        T = int(self.timesteps)
        lattice = LatticeDDPM(CosineBetaSchedule(T=T)).to(device)
        torus = WrappedNormalTorus(sigma_begin=self.sigma_begin, sigma_end=self.sigma_end, T=T).to(device)
        return lattice, torus

    def _build_module(self) -> nn.Module:
        return CSPDenoiser(self_condition=getattr(self, "self_conditioned_", False),
                           polar_lattice=getattr(self, "polar_lattice_", False), **self.network_settings())

    def _check_warm_start(self) -> None:
        """``warm_start=True`` continues the fitted network: its settings must not have changed."""
        changed = [name for name, fitted, now in (
            ("learn_lattice", self.learned_lattice_, bool(self.learn_lattice)),
            ("self_condition", self.self_conditioned_, bool(self.learn_lattice and self.self_condition)),
            ("polar_lattice", self.polar_lattice_, bool(self.learn_lattice and self.polar_lattice)),
        ) if fitted != now]
        fresh = {k: tuple(v.shape) for k, v in self._build_module().state_dict().items()}
        fitted = {k: tuple(v.shape) for k, v in self.module_.state_dict().items()}
        if fresh != fitted:
            changed.append("network")
        if changed:
            raise CrystalfitError(
                f"warm_start=True continues the fitted network, but {', '.join(changed)} changed since it was fitted; "
                "restore the settings it was fitted with, or set warm_start=False to train a new network"
            )

    def _validate_params(self) -> None:
        self._validate_common_params()
        for name in ("n_steps", "timesteps"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise CrystalfitError(f"{name} must be a positive integer, got {v!r}")
        if self.n_steps > self.timesteps:
            raise CrystalfitError(
                f"n_steps={self.n_steps} exceeds timesteps={self.timesteps}; use n_steps <= timesteps"
            )
        for name, hint in (("score_ratio", "the paper uses 3 or 4"),
                           ("step_lr", "it is the corrector's Langevin step size: DiffCSP uses 1e-5, 0 switches it off"),
                           ("input_perturbation", "e.g. 1.0, or 0 to switch it off")):
            v = getattr(self, name)
            if not (_is_finite_real(v) and v >= 0):
                raise CrystalfitError(f"{name} must be a finite float >= 0, got {v!r}; {hint}")
        if self.timestep_density not in TIMESTEP_DENSITIES:
            raise CrystalfitError(
                f"timestep_density must be one of {TIMESTEP_DENSITIES}, got {self.timestep_density!r}; "
                "'uniform' is DiffCSP's, 'linear' draws the training time with probability growing as t"
            )
        e = self.ema_decay
        if not (_is_finite_real(e) and 0 <= e < 1):
            raise CrystalfitError(f"ema_decay must be a float in [0, 1), got {e!r}; e.g. 0.999, or 0 to switch it off")
        if not isinstance(self.hkl_range, (int, np.integer)) or self.hkl_range < 1:
            raise CrystalfitError(f"hkl_range must be a positive integer, got {self.hkl_range!r}; the paper uses 2")
        for name in ("zero_variance", "expected_intensity", "learn_lattice", "self_condition", "polar_lattice",
                     "augment_basis", "guide_corrector", "guidance_jacobian", "warm_start", "verbose"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise CrystalfitError(f"{name} must be True or False, got {getattr(self, name)!r}")
        from ..guidance.xrd_guidance import RATIO_REFERENCES

        if self.ratio_reference not in RATIO_REFERENCES:
            raise CrystalfitError(
                f"ratio_reference must be one of {list(RATIO_REFERENCES)}, got {self.ratio_reference!r}; "
                "'score' measures score_ratio against the score, 'prediction' against the network's normalised output"
            )
        if not 0 < self.sigma_begin < self.sigma_end:
            raise CrystalfitError(
                f"need 0 < sigma_begin < sigma_end, got sigma_begin={self.sigma_begin}, sigma_end={self.sigma_end}"
            )

    def _lattice_estimate(self, lattice_p, lat_t, eps_hat, t):
        """Tweedie estimate of the clean lattice, clipped as in sampling (no grad)."""
        eps_hat = lattice_p.clip_eps(lat_t, eps_hat.detach(), t, LATTICE_CLIP_FACTOR * self.lattice_norm_max_)
        return lattice_p._tweedie_x0(lat_t, eps_hat, t).detach()

    def _loss(self, batch: CrystalBatch, t: torch.Tensor, gen: torch.Generator, lattice_p, torus_p,
              hinted: bool | None = None, perturbation: float = 0.0) -> torch.Tensor:
        """DiffCSP loss (SPEC 1.2-1.3): MSE on lattice eps + MSE on the normalised coordinate score.

        With self-conditioning, ``hinted`` says whether the network gets the lattice estimate
        of a first, gradient-free call (None: a fair coin drawn from ``gen``).  ``perturbation``
        is ``input_perturbation`` (training only): the coordinate noise of each crystal is
        scaled by :func:`perturbed_noise_scale` and the target is the score at ``sigma_t`` of
        the displacement actually applied."""
        dev = batch.device
        eps_l = torch.randn(batch.lattice.shape, generator=gen, device=dev, dtype=batch.dtype)
        eps_f = torch.randn(batch.frac.shape, generator=gen, device=dev, dtype=batch.dtype)
        if perturbation > 0:
            eps_f = eps_f * perturbed_noise_scale(batch.num_crystals, perturbation, gen, dev, batch.dtype)[batch.batch, None]
        t_atom = t[batch.batch]
        sigma = torus_p.sigma_at(t_atom, batch.frac)
        frac_t = torus_p.q_sample(batch.frac, sigma, eps_f)
        target_x = torus_p.training_target(eps_f, t_atom)
        if self.learned_lattice_:
            lat_t = lattice_p.q_sample(batch.lattice, t, eps_l)
        else:
            lat_t = batch.lattice
        hint = None
        if self.self_conditioned_:  # implies a learned lattice
            if hinted is None:
                hinted = bool(torch.rand((), generator=gen, device=dev) < 0.5)
            if hinted:
                with torch.no_grad():
                    eps0, _ = self.module_(lat_t, frac_t, batch.numbers, batch.num_atoms, batch.batch, t)
                hint = self._lattice_estimate(lattice_p, lat_t, eps0, t)
        eps_hat, pred_x = self.module_(lat_t, frac_t, batch.numbers, batch.num_atoms, batch.batch, t, hint)
        loss = torch.mean((pred_x - target_x) ** 2)
        if self.learned_lattice_:
            loss = loss + torch.mean((eps_hat - eps_l) ** 2)
        return loss

    # --------------------------------------------------------------------- fit
    def fit(self, X, y=None):
        """Fit the denoiser on structures ``X`` (ase.Atoms, pymatgen Structures, CIF text or paths).

        ``y`` is ignored (present for scikit-learn compatibility).
        """
        self._validate_params()
        batch = structures_to_batch(X)
        device = self._device()
        warm = bool(self.warm_start) and getattr(self, "module_", None) is not None
        seed = seed_from_random_state(self.random_state) + (int(self.n_epochs_) if warm else 0)
        torch.manual_seed(seed)
        gen = make_generator(seed, device)
        elements = set(int(z) for z in batch.numbers.tolist())
        norm_max = float(torch.linalg.matrix_norm(batch.lattice).max())
        if warm:
            self._check_warm_start()
            self.elements_ = sorted(elements | set(self.elements_))
            self.max_atoms_ = max(int(batch.num_atoms.max()), int(self.max_atoms_))
            self.lattice_norm_max_ = max(norm_max, float(self.lattice_norm_max_))
            self.module_ = self.module_.to(device)
        else:
            self.elements_ = sorted(elements)
            self.max_atoms_ = int(batch.num_atoms.max())
            self.learned_lattice_ = bool(self.learn_lattice)
            self.self_conditioned_ = bool(self.learn_lattice and self.self_condition)
            self.polar_lattice_ = bool(self.learn_lattice and self.polar_lattice)
            self.lattice_norm_max_ = norm_max
            self.history_ = []
            self.module_ = self._build_module().to(device)
        data = batch.to(device=device, dtype=torch.float32)
        lattice_p, torus_p = self._processes(device)
        T = int(self.timesteps)

        ops = signed_permutations(torch.float32, device) if self.augment_basis else None

        def loss_fn(idx, g):
            sub = data.select(idx.tolist())
            t = sample_timesteps(sub.num_crystals, T, g, self.timestep_density, device=device)
            if ops is not None:
                pick = torch.randint(len(ops), (sub.num_crystals,), generator=g, device=device)
                lat, frac = relabel_basis(sub.lattice, sub.frac, ops[pick], sub.batch)
                sub = dataclasses.replace(sub, lattice=lat, frac=frac)
            return self._loss(sub, t, g, lattice_p, torus_p, perturbation=float(self.input_perturbation))

        self._train(batch.num_crystals, loss_fn, generator=gen, ema_decay=float(self.ema_decay))
        return self

    # ------------------------------------------------------------------- score
    def score(self, X, y=None) -> float:
        """Negative mean denoising loss over fixed noise draws (higher is better).

        ``-denoising_loss(X)``: deterministic for a fixed ``random_state`` (times are a
        stratified grid over 1..T, the noise comes from a generator seeded by
        ``random_state``, 0 if None).  ``y`` is ignored.
        """
        return -self.denoising_loss(X)

    def denoising_loss(self, X, t_range=None, n_draws: int = 4, random_state=None) -> float:
        """Mean denoising loss (the training objective) of structures ``X`` at training times in ``t_range``.

        Parameters
        ----------
        X : structures (ase.Atoms, pymatgen Structures, CIF text or paths)
        t_range : (lo, hi) or None
            Inclusive range of training times, ``1 <= lo <= hi <= timesteps``; None: all of
            1..T (what :meth:`score` uses).  A narrow range asks how well the model denoises
            ``X`` at one noise level, e.g. whether it tells an arrangement from its variants.
        n_draws : int
            Noise draws per structure; each draw gives every structure one time on a stratified
            grid over the range (structure i at quantile ``(i + (r + 1/2)/n_draws) / len(X)``).
        random_state : int or None
            Seed of the noise (None: the model's ``random_state``, 0 if that is not an int).

        Two calls with the same number of structures, range, ``n_draws`` and seed use the same
        times and noise, so the losses of two sets of structures are compared on paired draws.
        """
        T = int(self.timesteps)
        lo, hi = (1, T) if t_range is None else self._check_t_range(t_range, T)
        if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 1:
            raise CrystalfitError(f"n_draws must be a positive integer, got {n_draws!r}; e.g. 4")
        batch, data, lattice_p, torus_p = self._fitted_inputs(X)
        device = data.device
        seed = self.random_state if random_state is None else random_state
        seed = int(seed) if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) else 0
        gen = make_generator(seed + 7919, device)
        B = data.num_crystals
        width = hi - lo + 1
        losses = []
        self.module_.eval()
        with torch.no_grad():
            for r in range(int(n_draws)):
                u = (torch.arange(B, device=device, dtype=torch.float64) + (r + 0.5) / n_draws) / B
                t = torch.clamp((u * width).ceil().long() + (lo - 1), lo, hi)
                for start in range(0, B, 512):
                    idx = list(range(start, min(B, start + 512)))
                    sub = data.select(idx)
                    loss = self._loss(sub, t[idx], gen, lattice_p, torus_p, hinted=True)
                    losses.append(float(loss) * len(idx))
        return float(np.sum(losses) / (B * n_draws))

    @staticmethod
    def _check_t_range(t_range, T: int) -> tuple[int, int]:
        try:
            lo, hi = t_range
        except (TypeError, ValueError):
            raise CrystalfitError(f"t_range must be a pair (lo, hi) of training times, got {t_range!r}") from None
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (lo, hi))
        if not ok or not 1 <= lo <= hi <= T:
            raise CrystalfitError(
                f"t_range must be integers with 1 <= lo <= hi <= timesteps = {T}, got {t_range!r}; e.g. (501, 650)")
        return int(lo), int(hi)

    # ---------------------------------------------------------------- checking
    def _fitted_inputs(self, X):
        """Checked batch of ``X`` for a fitted model: ``(batch, float32 batch on the model's device,
        lattice process, torus process)``."""
        self._check_fitted()
        batch = structures_to_batch(X)
        self._check_structures(batch)
        device = next(self.module_.parameters()).device
        lattice_p, torus_p = self._processes(device)
        return batch, batch.to(device=device, dtype=torch.float32), lattice_p, torus_p

    def _check_structures(self, batch: CrystalBatch) -> None:
        seen = set(self.elements_)
        numbers = batch.numbers.tolist()
        unseen = sorted(set(numbers) - seen)
        if unseen:
            crystal = int(batch.batch[numbers.index(unseen[0])])
            raise self._unseen_error(f"structure {crystal}", unseen, "refit on data that contains it")

    def _unseen_error(self, where: str, unseen: list[int], fix: str) -> UnknownElementError:
        from ase.data import chemical_symbols

        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unseen)
        return UnknownElementError(
            f"{where} contains {names}, never seen during fit (seen: {[chemical_symbols[z] for z in self.elements_]}); "
            f"{fix}"
        )

    def _composition_numbers(self, composition) -> list[list[int]]:
        # a list/tuple is a list of entries (formulas, Compositions, Atoms); anything else is one entry
        entries = list(composition) if isinstance(composition, (list, tuple)) else [composition]
        if not entries:
            raise CrystalfitError("composition is an empty list; pass a formula such as 'CoN2OTl' or a list of them")
        out = []
        for i, entry in enumerate(entries):
            numbers = parse_composition(entry, i if len(entries) > 1 else None)
            unseen = sorted(set(numbers) - set(self.elements_))
            if unseen:
                raise self._unseen_error(f"composition {i} ({entry!r})", unseen,
                                         "refit on data that contains it, or change the composition")
            if len(numbers) > self.max_atoms_:
                raise TooManyAtomsError(
                    f"composition {i} ({entry!r}) has {len(numbers)} atoms, more than the {self.max_atoms_} "
                    "of the largest training structure; sample at most that many atoms or refit on larger cells"
                )
            out.append(numbers)
        return out

    def _check_intensities(self, intensities, n_entries: int, n_hkl: int) -> np.ndarray:
        arr = np.asarray(intensities, dtype=float)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape != (n_entries, n_hkl):
            raise ShapeError(
                f"intensities has shape {np.shape(intensities)}, expected ({n_hkl},) or ({n_entries}, {n_hkl}) = "
                f"(number of compositions, len(miller_indices(hkl_range={self.hkl_range}))); pass one intensity per "
                "Miller index, one row per composition, ordered as crystalfit.xrd.miller_indices"
            )
        bad = np.argwhere(~np.isfinite(arr))
        if len(bad):
            r, c = bad[0]
            raise NonFiniteError(
                f"intensities[{r}, {c}] is {arr[r, c]}; intensities must be finite; remove or fill missing reflections"
            )
        neg = np.argwhere(arr < 0)
        if len(neg):
            r, c = neg[0]
            raise CrystalfitError(
                f"intensities[{r}, {c}] is {arr[r, c]:.4g} < 0; intensities |F|^2 must be >= 0; "
                "clip background-subtracted negatives to 0"
            )
        zero = np.flatnonzero(~(arr > 0).any(axis=1))
        if len(zero):
            raise CrystalfitError(
                f"intensities row {zero[0]} is all zeros; every crystal scatters (I(000) = (sum of form factors)^2 "
                "> 0), so pass the measured intensities for that composition"
            )
        return arr

    def _check_lattice(self, lattice, n_entries: int) -> np.ndarray:
        arr = np.asarray(lattice.cell[:] if hasattr(lattice, "cell") else lattice, dtype=float)
        if arr.shape == (3, 3):
            arr = np.repeat(arr[None], n_entries, axis=0)
        if arr.shape != (n_entries, 3, 3):
            raise ShapeError(
                f"lattice has shape {arr.shape}, expected (3, 3) or ({n_entries}, 3, 3); rows are lattice vectors in Angstrom"
            )
        if not np.all(np.isfinite(arr)) or np.any(np.abs(np.linalg.det(arr)) < 1e-3):
            raise CrystalfitError("lattice must be finite and non-singular; rows are the a, b, c vectors in Angstrom")
        return arr

    # ------------------------------------------------------------------ sample
    def sample(
        self,
        composition,
        n_samples: int = 1,
        *,
        intensities=None,
        lattice=None,
        random_state=None,
        n_candidates: int = 1,
        exchange_sites: bool = False,
        guidance=None,
    ) -> list:
        """Generate structures for one or more compositions.

        Parameters
        ----------
        composition : str, pymatgen Composition, ase.Atoms, or a list of these
            Counts as written: ``"CoN2OTl"`` means 5 atoms.
        n_samples : int
            Structures per composition.  Output is entry-major:
            ``[entry0 x n_samples, entry1 x n_samples, ...]``.
        intensities : array, shape (M,) or (n_entries, M), optional
            Single-crystal intensities for ``crystalfit.xrd.miller_indices(hkl_range)``.
            Without them this is the unguided DiffCSP baseline.
        lattice : array (3, 3) or (n_entries, 3, 3) or Atoms, optional
            Fix the lattice (rows in Angstrom) and generate only coordinates.
            Single-crystal intensities are indexed by h, k, l in the basis of the
            cell they were measured in, so pass that cell when it is known (it is,
            once the reflections are indexed): a generated cell in another basis
            makes the per-reflection comparison meaningless (Carbon-24 benchmark in
            docs/xrd_guided_diffusion.md).  When the lattice is generated, train on and
            index the target in one canonical basis, e.g. Niggli-reduced cells
            (``load_dataset(..., reduce="niggli")``; Carbon-24 guided 19% -> 34% at 1:3).
        random_state : int, optional
            Overrides the estimator's ``random_state`` for this call.
        n_candidates : int
            With ``intensities``: draw this many guided candidates for every
            returned structure and keep the one whose single-crystal intensities
            agree best with the target (smallest R-factor
            ``sum (s I_calc - I_obs)^2 / sum I_obs^2`` with the least-squares
            scale ``s``; :func:`crystalfit.metrics.r_factor`) among the
            candidates with no two atoms closer than 0.5 Angstrom (all of them if
            none is; :func:`crystalfit.metrics.best_candidates`).  This is the
            crystallographer's "generate, then rank against the data" step; it costs
            ``n_candidates`` times the sampling time.  The paper's protocol is
            ``n_candidates=1`` (the default).
        exchange_sites : bool
            With ``intensities``: after sampling (and before ranking candidates),
            swap pairs of atoms of different elements while a swap lowers the
            R-factor (:func:`crystalfit.xrd.exchange_sites`, greedy, the same
            R-factor as above).  Guidance moves atoms continuously and cannot
            exchange two settled atoms; where two elements scatter alike (O and N
            in Crystal-2) the prior decides which sits where, and this step lets
            the data decide.  Not part of the paper's method (default False);
            about 1 ms per 5-atom structure.  Where the candidate crystals share
            one set of sites (the paper's Crystal-1/2/3, Cu3Au), the exchange
            alone turns unguided samples into the target, so compare against
            that control before crediting the guidance (docs, "Site exchange").
        guidance : dict or callable, optional
            With ``intensities``: how the guidance object the sampler calls is built.
            A dict gives options of :class:`crystalfit.guidance.XRDGuidance` for this
            call, e.g. ``{"through_network": False}`` (the estimator's
            ``guidance_jacobian=False`` for this call only) or ``{"score_ratio": 15}``.  A
            callable is a factory: it is called with the keyword arguments
            ``intensities, numbers, batch, hkl, score_ratio, expected_intensity,
            ratio_reference, through_network``
            (tensors for the whole sampling batch, on the model's device) and returns
            an object with the sampler's guidance protocol
            (:class:`crystalfit.sampling.predictor_corrector.Guidance`), for example a
            subclass of ``XRDGuidance`` with another likelihood.  Default: the
            estimator's settings.

        Returns
        -------
        list of ase.Atoms
            Periodic, wrapped, with ``info`` keys ``source``, ``composition``,
            ``entry``, ``sample``, ``guided``; guided structures also carry
            ``r_factor`` (agreement with their target intensities, as above),
            ``min_distance`` (shortest distance between two atoms, Angstrom) and
            ``n_candidates``; with ``exchange_sites`` also ``n_exchanges`` and
            ``r_factor_before_exchange``.
        """
        self._check_fitted()
        # sampling settings changed after fit (set_params(n_steps=..., step_lr=...)) get fit's checks and messages
        self._validate_params()
        if not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
            raise CrystalfitError(f"n_samples must be a positive integer, got {n_samples!r}")
        if not isinstance(n_candidates, (int, np.integer)) or isinstance(n_candidates, bool) or n_candidates < 1:
            raise CrystalfitError(f"n_candidates must be a positive integer, got {n_candidates!r}")
        if n_candidates > 1 and intensities is None:
            raise CrystalfitError(
                f"n_candidates={n_candidates} ranks candidates by their agreement with target intensities; "
                "pass intensities= or use n_candidates=1"
            )
        if not isinstance(exchange_sites, (bool, np.bool_)):
            raise CrystalfitError(f"exchange_sites must be True or False, got {exchange_sites!r}")
        if exchange_sites and intensities is None:
            raise CrystalfitError(
                "exchange_sites=True swaps atoms to fit target intensities; pass intensities= or exchange_sites=False"
            )
        if guidance is not None:
            if intensities is None:
                raise CrystalfitError("guidance= sets up the guidance by intensities; pass intensities= as well")
            self._check_guidance_option(guidance)
        entries = self._composition_numbers(composition)
        n_entries = len(entries)
        from ..xrd import miller_indices

        hkl = miller_indices(self.hkl_range)
        target = None if intensities is None else self._check_intensities(intensities, n_entries, len(hkl))
        fixed = None if lattice is None else self._check_lattice(lattice, n_entries)
        if fixed is None and not self.learned_lattice_:
            raise CrystalfitError(
                "this model was fitted with learn_lattice=False, so sample() needs lattice= "
                "(a (3, 3) matrix with rows a, b, c in Angstrom)"
            )
        device = next(self.module_.parameters()).device
        seed = seed_from_random_state(self.random_state if random_state is None else random_state, offset=1)
        gen = make_generator(seed, device)
        per_entry = n_samples * n_candidates  # candidates of one returned structure are consecutive
        numbers_list = [nums for nums in entries for _ in range(per_entry)]
        entry_of = np.repeat(np.arange(n_entries), per_entry)
        B = len(numbers_list)
        counts = torch.tensor([len(n) for n in numbers_list], device=device)
        batch_idx = CrystalBatch.batch_index(counts)
        numbers = torch.tensor([z for n in numbers_list for z in n], device=device)
        N = int(numbers.shape[0])
        dtype = torch.float32
        lattice_p, torus_p = self._processes(device)
        L_T = torch.randn((B, 3, 3), generator=gen, device=device, dtype=dtype)
        F_T = torch.rand((N, 3), generator=gen, device=device, dtype=dtype)
        fixed_t = None if fixed is None else torch.as_tensor(fixed[entry_of], device=device, dtype=dtype)

        module = self.module_
        module.eval()

        # self-conditioning: each call gets the clean-lattice estimate of the previous call
        # (or the given lattice); the first call of a joint run gets none
        hint = {"lattice": fixed_t}

        def model_fn(lat, frac, t):
            if not self.self_conditioned_:
                return module(lat, frac, numbers, counts, batch_idx, t)
            eps, pred_x = module(lat, frac, numbers, counts, batch_idx, t, hint["lattice"])
            if fixed_t is None:
                hint["lattice"] = self._lattice_estimate(lattice_p, lat, eps, t)
            return eps, pred_x

        option, guidance = guidance, None
        if target is not None:
            from ..guidance import XRDGuidance

            guide_kw = dict(
                intensities=torch.as_tensor(target[entry_of], device=device, dtype=dtype),
                numbers=numbers,
                batch=batch_idx,
                hkl=torch.as_tensor(hkl, device=device),
                score_ratio=float(self.score_ratio),
                expected_intensity=bool(self.expected_intensity),
                ratio_reference=str(self.ratio_reference),
                through_network=bool(self.guidance_jacobian),
            )
            if callable(option):
                guidance = option(**guide_kw)
                if not callable(guidance):
                    raise CrystalfitError(
                        f"the guidance factory returned {type(guidance).__name__}, not a callable guidance object; "
                        "return e.g. XRDGuidance(**kwargs)"
                    )
            else:
                guidance = XRDGuidance(**{**guide_kw, **(option or {})})
        start = time.perf_counter()
        result = predictor_corrector_sample(
            model_fn,
            None if fixed_t is not None else L_T,
            F_T,
            batch_idx,
            lattice_process=lattice_p,
            torus_process=torus_p,
            n_steps=int(self.n_steps),
            step_lr=float(self.step_lr),
            zero_variance=bool(self.zero_variance),
            fixed_lattice=fixed_t,
            guidance=guidance,
            generator=gen,
            progress=bool(self.verbose),
            lattice_clip=LATTICE_CLIP_FACTOR * self.lattice_norm_max_,
            guide_corrector=bool(self.guide_corrector),
        )
        lat = result.lattice.detach().double()
        frac = result.frac.detach().double()
        if not torch.all(torch.isfinite(lat)) or not torch.all(torch.isfinite(frac)):
            raise CrystalfitError("sampling produced non-finite values; lower step_lr or score_ratio")
        keep = np.arange(B)
        r_factors = None
        if target is not None:
            from ..metrics import best_candidates, r_factor
            from ..xrd import exchange_site_positions, structure_factor_intensities

            if exchange_sites:
                frac, r_before, _, n_swaps = exchange_site_positions(
                    frac, numbers, lat, batch_idx, hkl, torch.as_tensor(target[entry_of], device=device))
                r_before, n_swaps = r_before.cpu().numpy(), n_swaps.cpu().numpy()
            i_calc = structure_factor_intensities(frac, numbers, lat, batch_idx, torch.as_tensor(hkl, device=device),
                                                  validate=False)
            r_factors = np.atleast_1d(r_factor(i_calc.cpu().numpy(), target[entry_of], fit_scale=True))
        # shortest interatomic distance of every structure (after any site exchange): the candidates' ranking
        # excludes overlapping atoms, and users see how many returned structures have them
        min_dist = min_pair_distance(frac, lat, batch_idx, B).cpu().numpy()
        if target is not None:
            keep = best_candidates(r_factors, min_dist, n_candidates)
        elapsed = time.perf_counter() - start
        self.last_sample_stats_ = dict(
            seconds=elapsed,
            seconds_per_structure=elapsed / len(keep),
            n_model_calls=int(result.n_model_calls),
            n_structures=B,
            n_returned=len(keep),
            n_overlapping=int(np.sum(min_dist[keep] < STRUCT_MIN_DISTANCE)),
            guided=guidance is not None,
        )
        out_batch = CrystalBatch(
            lattice=lat, frac=frac, numbers=numbers, num_atoms=counts, batch=batch_idx,
            ids=[f"xrdgd-{entry_of[i]}-{(i // n_candidates) % n_samples}" for i in range(B)],
            info=[{} for _ in range(B)],
        )
        from ase.data import chemical_symbols

        extra = []
        for i in keep:
            info = dict(
                source="XRDGuidedDiffusion",
                composition="".join(chemical_symbols[z] for z in numbers_list[i]),
                entry=int(entry_of[i]),
                sample=int((i // n_candidates) % n_samples),
                guided=guidance is not None,
                min_distance=float(min_dist[i]),
            )
            if r_factors is not None:
                info.update(r_factor=float(r_factors[i]), n_candidates=int(n_candidates))
                if exchange_sites:
                    info.update(n_exchanges=int(n_swaps[i]), r_factor_before_exchange=float(r_before[i]))
            extra.append(info)
        return batch_to_atoms(out_batch.select(keep), extra)

    _GUIDANCE_SET_BY_SAMPLE = ("intensities", "numbers", "batch", "hkl")

    @classmethod
    def _check_guidance_option(cls, guidance) -> None:
        """``sample(guidance=...)``: a dict of XRDGuidance options or a factory."""
        if callable(guidance):
            return
        if not isinstance(guidance, dict):
            raise CrystalfitError(
                f"guidance must be a dict of XRDGuidance options or a callable factory, got {type(guidance).__name__}"
            )
        import inspect

        from ..guidance import XRDGuidance

        allowed = [k for k in inspect.signature(XRDGuidance).parameters if k not in cls._GUIDANCE_SET_BY_SAMPLE]
        bad = sorted(set(guidance) - set(allowed))
        if bad:
            fixed = [k for k in bad if k in cls._GUIDANCE_SET_BY_SAMPLE]
            unknown = [k for k in bad if k not in fixed]
            why = ([f"{fixed} are set by sample() itself (pass intensities= to sample)"] if fixed else []) \
                + ([f"{unknown} are not XRDGuidance options"] if unknown else [])
            raise CrystalfitError(f"guidance = {guidance!r}: {'; '.join(why)}; allowed keys: {allowed}")

    # --------------------------------------------------------- learned score
    def predict_score(self, structures, noise_level: float = 0.01) -> list:
        """Learned score ``d/dx log p_sigma`` w.r.t. fractional coordinates.

        Parameters
        ----------
        structures : sequence of structure-like objects
        noise_level : float
            Fractional noise sigma; the nearest training time step is used.

        Returns
        -------
        list of np.ndarray, shape (n_atoms, 3) each, in 1/(fractional unit).
        """
        batch, data, lattice_p, torus_p = self._fitted_inputs(structures)
        device = data.device
        sig = torus_p.sigmas[1:].double().cpu().numpy()
        t_int = int(np.argmin(np.abs(np.log(sig) - np.log(max(noise_level, 1e-12))))) + 1
        t = torch.full((data.num_crystals,), t_int, device=device, dtype=torch.long)
        with torch.no_grad():
            hint = data.lattice if self.self_conditioned_ else None
            _, pred_x = self.module_(data.lattice, data.frac, data.numbers, data.num_atoms, data.batch, t, hint)
            score = torus_p.score_from_prediction(pred_x, t[data.batch])
        score = score.double().cpu().numpy()
        ptr = batch.ptr.tolist()
        return [score[ptr[i]:ptr[i + 1]] for i in range(batch.num_crystals)]
