r"""Training-free X-ray diffraction guidance (paper Eqs. 39-46, SPEC section 9).

At every predictor step the sampler hands over the current coordinates
:math:`x_t` and the unconditional score :math:`s(x_t)`.  The guidance

1. solves the periodic Tweedie equations per coordinate for the wrapped-normal
   posterior :math:`\mathrm{WN}(m, c)` of :math:`x_0` given :math:`x_t`
   (:func:`~crystalfit.guidance.tweedie.periodic_tweedie_moments`, ``m = x_t - delta``);
2. predicts the intensities of that posterior: by default the expectation
   :math:`E|F(h)|^2 = |\sum_v f_v e^{2\pi i m_v\cdot h - 2\pi^2 c_v\cdot h^2}|^2
   + \sum_v f_v^2 (1 - e^{-4\pi^2 c_v\cdot h^2})` for independent Gaussian atoms;
   ``expected_intensity=False`` gives the paper's Eq. (40) (first term only);
3. takes :math:`g = -\partial_{x_t} \sum_h (k I_{calc}(h) - I_{obs}(h))^2` by
   autograd through ``I_calc -> m -> (x_t, s(x_t))`` (Eq. 44 up to the factor
   :math:`1/2\sigma_y^2`), which covers Eqs. (A8)-(A12) including the network
   Jacobian, in one backward pass.  By default ``c`` blurs the atoms but is held
   constant in the gradient (``variance_grad=False``; see :class:`XRDGuidance`
   for why); ``variance_grad=True`` keeps the paper's ``dI/dc dc/dx_t`` term;
4. rescales per crystal so that ``max|g| = r * max|ref|`` over that crystal's
   coordinates -- the paper's "score ratio 1:r", equivalent to choosing
   :math:`\sigma_y` per step and crystal.  ``ref`` is the score
   (``ratio_reference="score"``, default) or the network's normalised output
   ``score / sqrt(lambda_t)`` (``"prediction"``: the paper's :math:`\hat\epsilon_X`
   read as DiffCSP's ``pred_x``), which makes the guidance ``1/sqrt(lambda_t)``
   times stronger: about ``16x`` at sigma = 0.5 and ``sigma`` times as strong once
   sigma < 0.2.

Intensity scale (``scale``): measured intensities carry an unknown overall factor.
``"fit"`` (default) uses the least-squares factor
:math:`k^* = \langle I_{calc}, I_{obs}\rangle / \langle I_{calc}, I_{calc}\rangle` per
crystal and step (detached, i.e. treated as a constant -- at the optimum
:math:`\partial L/\partial k = 0`, so this equals the gradient of the
scale-minimised loss); ``"none"`` uses :math:`k = 1` for targets on the absolute
:math:`|F|^2` scale of :func:`crystalfit.xrd.structure_factor_intensities`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from crystalfit.diffusion.torus import wrapped_normal_sigma_norm
from crystalfit.exceptions import CrystalfitError, NonFiniteError, ShapeError
from crystalfit.xrd.form_factors import check_numbers
from crystalfit.xrd.intensities import structure_factor_intensities

from .tweedie import periodic_tweedie_moments

#: Values of ``ratio_reference``: what ``max|g| = r max|.|`` is measured against.
RATIO_REFERENCES = ("score", "prediction")

__all__ = ["XRDGuidance", "rescale_to_score_ratio"]


def _segment_max(values: Tensor, batch: Tensor, num_segments: int) -> Tensor:
    """Per-segment maximum of ``values`` (N, ...) reduced over all but the first axis."""
    per_row = values.reshape(values.shape[0], -1).amax(-1)
    out = torch.zeros(num_segments, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, batch, per_row, reduce="amax", include_self=True)


def rescale_to_score_ratio(g: Tensor, score: Tensor, batch: Tensor, num_crystals: int, ratio: float) -> Tensor:
    """Scale ``g`` per crystal so that ``max|g| = ratio * max|score|`` over its coordinates.

    Parameters
    ----------
    g, score : Tensor, shape (N, 3)
    batch : Tensor, shape (N,), long
    num_crystals : int
    ratio : float
        The paper's score ratio ``r`` (1:r).

    Returns
    -------
    Tensor, shape (N, 3)
        Crystals whose guidance is zero or has a non-finite entry, or whose score is
        zero or has a non-finite entry, get 0.
    """
    finite_g = _segment_max((~torch.isfinite(g)).to(g.dtype), batch, num_crystals) == 0
    finite_s = _segment_max((~torch.isfinite(score)).to(g.dtype), batch, num_crystals) == 0
    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    g_max = _segment_max(g.abs(), batch, num_crystals)
    s_max = _segment_max(torch.nan_to_num(score.detach().abs(), nan=0.0, posinf=0.0), batch, num_crystals)
    ok = (g_max > 0) & finite_g & finite_s
    factor = torch.where(ok, ratio * s_max / torch.where(ok, g_max, torch.ones_like(g_max)), torch.zeros_like(g_max))
    return g * factor[batch].unsqueeze(-1)


def _inverse_sqrt_sigma_norm(sigma, like: Tensor) -> Tensor:
    """``1 / sqrt(lambda(sigma))`` shaped to broadcast over ``like`` (N, 3); lambda is computed once
    per distinct sigma (one or a few per sampler step), so the cost does not grow with the atoms."""
    sig = torch.as_tensor(sigma, device=like.device).detach().to(torch.float64)
    if sig.dim() == 0:
        sig = sig.expand(like.shape[0], 1)
    if sig.dim() == 1:
        sig = sig.unsqueeze(-1)
    values, inverse = torch.unique(sig, return_inverse=True)
    lam = wrapped_normal_sigma_norm(values)
    return lam.rsqrt()[inverse].to(like.dtype).expand_as(like)


class XRDGuidance:
    r"""Conditional-score guidance toward target single-crystal intensities.

    Implements the sampler's guidance protocol
    (:class:`crystalfit.sampling.predictor_corrector.Guidance`): called once per
    predictor step as ``g = guidance(frac=..., score=..., sigma=..., t=..., lattice=...)``
    and added to the unconditional score.

    Parameters
    ----------
    intensities : Tensor or array, shape (B, M)
        Target intensities ``I_obs`` per crystal, columns ordered as ``hkl``
        (absolute ``|F|^2`` scale for ``scale="none"``; any overall factor for ``"fit"``).
    numbers : Tensor, shape (N,), long
        Atomic numbers of all atoms of the batch.
    batch : Tensor, shape (N,), long
        Crystal index of each atom in ``0..B-1``.
    hkl : Tensor or array, shape (M, 3), integer
        Miller indices (e.g. :func:`crystalfit.xrd.miller_indices` ``(2)``).
    score_ratio : float
        ``r`` in the paper's "1:r": per crystal ``max|g| = r max|score|`` (3 or 4 in the paper).
    scale : {"fit", "none"}
        Overall intensity factor: least-squares fit per crystal and step, or 1.
    through_network : bool
        True: differentiate through the score network (``d score / d x_t`` terms,
        needs ``score`` attached to ``frac``).  False: treat the score as a constant,
        so only the direct ``m = x_t - delta`` dependence remains (cheaper: no backward
        pass through the network).
    use_variance : bool
        Smear atoms by the posterior variance ``c`` (Eq. 39).  False uses point atoms at ``m``.
    n_quad : int
        Gauss-Hermite nodes of the Tweedie solve.
    variance_grad : bool
        Also differentiate through ``c(x_t)`` (the paper's Eq. A12 keeps the
        ``dI/dc dc`` term).  Default False: ``c`` blurs the atoms but is held
        constant in the gradient.  Reason: with the paper's ``ds = 0``, ``c``
        depends on the score only through the periodic corrections (in the
        Gaussian regime ``c = sigma^2`` exactly), and that spurious dependence
        rewards a larger ``|score|`` (smaller ``c``, less damping).  In an
        exact-score toy (two perovskites, ``x_t = X + sigma eps``) it turns the
        guidance away from the source structure at ``sigma = 0.1`` (40/40 draws),
        while with ``c`` held constant 33/40 point toward it.
    ratio_reference : {"score", "prediction"}
        What the score ratio is measured against.  ``"score"`` (default): the
        unconditional score in true units, ``max|g| = r max|score|``.  ``"prediction"``:
        the network's normalised output ``score / sqrt(lambda_t)`` (DiffCSP's ``pred_x``,
        ``lambda_t`` = :func:`~crystalfit.diffusion.torus.wrapped_normal_sigma_norm` of
        the atom's ``sigma``), i.e. the paper's ``max|eps_hat_X| : max|g| = 1 : r`` with
        ``eps_hat_X`` the network output.  Relative to the score the guidance is then
        ``r / sqrt(lambda_t)``: ``16 r`` at sigma = 0.5, about ``r sigma`` below 0.2 --
        strong while the arrangement is chosen, weak while atoms settle on their
        sites.  Paired with a larger ``r`` (20-60) and a stronger corrector, it gave the
        best 1-sample Crystal-1/2 rates (docs/xrd_guided_diffusion.md).
    expected_intensity : bool
        Compare ``E|F|^2 = |E F|^2 + sum_v f_v^2 (1 - D_v^2)`` of the posterior with
        ``I_obs`` (default).  False uses the paper's Eq. (40), ``|E F|^2``, whose
        ``v = xi`` terms are damped as well: it underestimates every ``h != 0``
        intensity of blurred atoms, so the gradient mostly tries to sharpen high orders
        instead of placing atoms.  Measured on Crystal-1/2 (fixed lattice, 100 samples,
        ratio 1:4): guided match rate 59%/69% with Eq. 40, 70%/82% with ``E|F|^2``
        (benchmarks/results/xrd_ablation_fixed_lattice.md).

    Attributes
    ----------
    last_info : dict
        After a call: ``loss`` (B,), ``scale`` (B,), ``converged`` (fraction of
        coordinates whose Tweedie equations were solved), all detached.

    Examples
    --------
    >>> import torch
    >>> from crystalfit.xrd import miller_indices, structure_factor_intensities
    >>> hkl = miller_indices(1)
    >>> numbers, batch = torch.tensor([8, 29]), torch.zeros(2, dtype=torch.long)
    >>> lattice = 4.0 * torch.eye(3, dtype=torch.float64)[None]
    >>> target = structure_factor_intensities(torch.tensor([[0.0, 0, 0], [0.5, 0.5, 0.5]], dtype=torch.float64),
    ...                                       numbers, lattice, batch, hkl)
    >>> guide = XRDGuidance(target, numbers, batch, hkl, score_ratio=3.0, through_network=False)
    >>> frac = torch.tensor([[0.02, 0.0, 0.0], [0.4, 0.5, 0.5]], dtype=torch.float64)
    >>> sigma = torch.full((2, 1), 0.05, dtype=torch.float64)
    >>> score = -frac / sigma**2 * 0.1
    >>> g = guide(frac=frac, score=score, sigma=sigma, t=torch.tensor([10]), lattice=lattice)
    >>> g.shape, bool(torch.isclose(g.abs().max(), 3.0 * score.abs().max()))
    (torch.Size([2, 3]), True)
    """

    def __init__(
        self,
        intensities: Any,
        numbers: Tensor,
        batch: Tensor,
        hkl: Any,
        score_ratio: float = 3.0,
        scale: str = "fit",
        through_network: bool = True,
        use_variance: bool = True,
        n_quad: int = 32,
        variance_grad: bool = False,
        expected_intensity: bool = True,
        ratio_reference: str = "score",
    ):
        numbers = torch.as_tensor(numbers)
        batch = torch.as_tensor(batch)
        hkl_t = torch.as_tensor(np.asarray(hkl) if not isinstance(hkl, Tensor) else hkl)
        target = torch.as_tensor(np.asarray(intensities) if not isinstance(intensities, Tensor) else intensities)
        if hkl_t.dim() != 2 or hkl_t.shape[1] != 3:
            raise ShapeError(f"hkl has shape {tuple(hkl_t.shape)}, expected (M, 3) Miller indices")
        m = hkl_t.shape[0]
        if target.dim() == 1:
            target = target.unsqueeze(0)
        if target.dim() != 2 or target.shape[1] != m:
            raise ShapeError(
                f"intensities has shape {tuple(target.shape)}, expected (B, {m}) = (crystals, len(hkl)); "
                f"pass one intensity per Miller index and crystal"
            )
        if not bool(torch.isfinite(target).all()):
            raise NonFiniteError("intensities contain NaN or inf; pass finite target intensities")
        if numbers.dim() != 1 or batch.shape != numbers.shape:
            raise ShapeError(
                f"numbers has shape {tuple(numbers.shape)} and batch {tuple(batch.shape)}, expected two (N,) vectors"
            )
        check_numbers(numbers)
        n_crystals = target.shape[0]
        if batch.numel() and (int(batch.min()) < 0 or int(batch.max()) >= n_crystals):
            raise ShapeError(
                f"batch has values in [{int(batch.min())}, {int(batch.max())}], expected crystal indices in "
                f"[0, {n_crystals - 1}] (one row of intensities per crystal)"
            )
        if scale not in ("fit", "none"):
            raise CrystalfitError(f"scale = {scale!r} is not supported; use 'fit' (least-squares factor) or 'none'")
        if ratio_reference not in RATIO_REFERENCES:
            raise CrystalfitError(
                f"ratio_reference = {ratio_reference!r} is not supported; use 'score' (max|g| = r max|score|) or "
                "'prediction' (max|g| = r max|score / sqrt(lambda_t)|, the network's normalised output)"
            )
        if not (float(score_ratio) > 0):
            raise CrystalfitError(f"score_ratio = {score_ratio!r} must be > 0 (the paper uses 3 or 4)")
        self.intensities = target
        self.numbers = numbers.long()
        self.batch = batch.long()
        self.hkl = hkl_t.long()
        self.score_ratio = float(score_ratio)
        self.scale = scale
        self.through_network = bool(through_network)
        self.use_variance = bool(use_variance)
        self.n_quad = int(n_quad)
        self.variance_grad = bool(variance_grad)
        self.expected_intensity = bool(expected_intensity)
        self.ratio_reference = ratio_reference
        self.num_crystals = n_crystals
        self.last_info: dict = {}

    @property
    def needs_score_graph(self) -> bool:
        """Whether the sampler must hand over the score with its graph to ``frac`` (``through_network``)."""
        return self.through_network

    def loss(self, frac: Tensor, score: Tensor, sigma: Tensor, lattice: Tensor) -> tuple[Tensor, Tensor]:
        """Per-crystal loss ``sum_h (k I_calc - I_obs)^2`` of the Tweedie posterior (differentiable).

        Parameters
        ----------
        frac : Tensor, shape (N, 3)
            ``x_t`` (fractional).
        score : Tensor, shape (N, 3)
            Unconditional score ``d log p_t / d x_t`` (true units).
        sigma : Tensor, shape (N, 1), (N, 3) or scalar
            Noise level ``sigma_t`` per atom.
        lattice : Tensor, shape (B, 3, 3)
            Lattice used for the form factors (treated as constant).

        Returns
        -------
        loss : Tensor, shape (B,)
        scale : Tensor, shape (B,), the factor ``k`` used (detached)
        """
        dev, dt = frac.device, frac.dtype
        sigma = torch.as_tensor(sigma, device=dev, dtype=dt).detach()
        if sigma.dim() == 2 and sigma.shape[1] == 1:
            sigma = sigma.expand_as(frac)
        delta, c, info = periodic_tweedie_moments(score, sigma, n_quad=self.n_quad, return_info=True)
        self.last_info = {"converged": info["converged"].float().mean().detach()}
        mean = frac - delta
        numbers, batch = self.numbers.to(dev), self.batch.to(dev)
        i_calc = structure_factor_intensities(
            mean, numbers, lattice.detach().to(dt), batch, self.hkl.to(dev),
            variance=(c if self.variance_grad else c.detach()) if self.use_variance else None, validate=False,
            expected=self.expected_intensity,
        )
        i_obs = self.intensities.to(device=dev, dtype=dt)
        if self.scale == "fit":
            num = (i_calc * i_obs).sum(-1)
            den = (i_calc * i_calc).sum(-1)
            k = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))
            k = k.detach()
        else:
            k = torch.ones(i_calc.shape[0], dtype=dt, device=dev)
        loss = ((k.unsqueeze(-1) * i_calc - i_obs) ** 2).sum(-1)
        return loss, k

    def __call__(self, *, frac: Tensor, score: Tensor, sigma: Tensor, t: Tensor | None = None,
                 lattice: Tensor) -> Tensor:
        """Guidance term to add to the unconditional score.

        Parameters
        ----------
        frac : Tensor, shape (N, 3)
            Current coordinates ``x_t``; a leaf with ``requires_grad=True`` when
            ``through_network`` (the graph of ``score`` hangs from it).
        score : Tensor, shape (N, 3)
            Unconditional score ``d log p_t / d x_t`` in true units (1/fractional
            length), attached to ``frac`` through the network if ``through_network``.
        sigma : Tensor, shape (N, 1)
            Per-atom noise level ``sigma_t``.
        t : Tensor, shape (B,), long, optional
            Diffusion times (unused; part of the protocol).
        lattice : Tensor, shape (B, 3, 3)
            Lattice estimate for the form factors (detached).

        Returns
        -------
        Tensor, shape (N, 3), detached, dtype of ``frac``
            ``g`` with ``max|g| = r max|score|`` per crystal (zero for a crystal whose
            gradient vanishes or is not finite).
        """
        if frac.shape != score.shape or frac.dim() != 2 or frac.shape[1] != 3:
            raise ShapeError(f"frac {tuple(frac.shape)} and score {tuple(score.shape)} must both have shape (N, 3)")
        if frac.shape[0] != self.numbers.shape[0]:
            raise ShapeError(
                f"frac has {frac.shape[0]} rows, expected {self.numbers.shape[0]} = len(numbers) given to XRDGuidance"
            )
        if lattice.shape != (self.num_crystals, 3, 3):
            raise ShapeError(f"lattice has shape {tuple(lattice.shape)}, expected ({self.num_crystals}, 3, 3)")
        through = self.through_network and frac.requires_grad and score.requires_grad
        with torch.enable_grad():
            if through:
                x, s = frac, score
            else:
                x, s = frac.detach().requires_grad_(True), score.detach()
            loss, k = self.loss(x, s, sigma, lattice)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        ref = score.detach()
        if self.ratio_reference == "prediction":
            ref = ref * _inverse_sqrt_sigma_norm(sigma, ref)
        g = rescale_to_score_ratio(-grad.detach(), ref, self.batch.to(frac.device), self.num_crystals,
                                   self.score_ratio)
        self.last_info.update(loss=loss.detach(), scale=k)
        return g.to(frac.dtype)
