"""DiffCSP's predictor-corrector reverse sampler, with pluggable guidance.

The sampler only orchestrates: the per-step math lives in
:class:`crystalfit.diffusion.LatticeDDPM` (lattice DDPM step, Tweedie estimate)
and :class:`crystalfit.diffusion.WrappedNormalTorus` (Langevin corrector and
reverse-VE predictor on the torus).  It knows nothing about atoms beyond the
``batch`` index that maps each coordinate row to its crystal.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor

from crystalfit.diffusion import LatticeDDPM, WrappedNormalTorus, wrap01
from crystalfit.exceptions import CrystalfitError, ShapeError

__all__ = ["Guidance", "ModelFn", "PCSampleResult", "make_time_grid", "predictor_corrector_sample"]

#: ``model_fn(lattice (B,3,3), frac (N,3), t (B,) long) -> (eps_lattice_hat (B,3,3), pred_x (N,3))``;
#: ``pred_x`` is the normalised coordinate output (target ``d_log_p(sigma eps, sigma)/sqrt(sigma_norm)``).
ModelFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


@runtime_checkable
class Guidance(Protocol):
    """Protocol of a guidance term added to the predictor's score (Eqs. 45-46 of the paper).

    The sampler calls the object once per predictor step (never in the corrector),
    with keyword arguments only, under ``torch.enable_grad()``::

        g = guidance(frac=frac, score=score, sigma=sigma, t=t, lattice=lattice)
        score_used = (score + g).detach()

    The object knows its own crystals (species, batch index, targets, score ratio);
    the sampler does not pass them.  An object with ``needs_score_graph = False`` gets a
    ``score`` without graph (the network then runs under ``torch.no_grad()``, no
    activations are kept); without the attribute the graph is built.
    """

    def __call__(self, *, frac: Tensor, score: Tensor, sigma: Tensor, t: Tensor, lattice: Tensor) -> Tensor:
        """Guidance for the current predictor step.

        Parameters
        ----------
        frac : Tensor, shape (N, 3)
            Current coordinates :math:`x_{t-1/2}` (after the corrector), in [0, 1), a
            leaf tensor with ``requires_grad=True``.
        score : Tensor, shape (N, 3)
            Unconditional score ``d/dx log p_t`` from the network, still attached to the
            graph through ``frac`` (so ``d score / d frac`` terms are available by
            autograd; it has no graph if the model ignores ``frac``).
        sigma : Tensor, shape (N, 1)
            Per-atom noise level ``sigma_t`` (fractional units).
        t : Tensor, shape (B,), long
            Diffusion time of each crystal.
        lattice : Tensor, shape (B, 3, 3), detached
            The fixed lattice when the sampler has one, otherwise the Tweedie estimate
            ``L0_hat`` from the same network call (very noisy at large ``t``).

        Returns
        -------
        Tensor, shape (N, 3)
            Guidance (e.g. ``d/dx_t log p(y | x_t)``) in score units, added to ``score``.
        """
        ...


@dataclass(frozen=True)
class PCSampleResult:
    """Result of :func:`predictor_corrector_sample`.

    Iterating yields ``(lattice, frac)``, so ``L, F = predictor_corrector_sample(...)`` works.

    Attributes
    ----------
    lattice : Tensor, shape (B, 3, 3)
    frac : Tensor, shape (N, 3), in [0, 1)
    n_model_calls : int
        Number of ``model_fn`` evaluations (each over the whole batch).
    time_grid : Tensor, shape (S,), long
        The descending times visited (``t_prev`` of the last is 0).
    """

    lattice: Tensor
    frac: Tensor
    n_model_calls: int
    time_grid: Tensor

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.lattice, self.frac))


def make_time_grid(T: int, n_steps: int | None = None) -> Tensor:
    """Descending integer time grid of the reverse sampler.

    ``n_steps=None`` (or ``T``) gives ``T, T-1, ..., 1``.  ``n_steps < T`` gives
    ``round(linspace(T, 1, n_steps))`` in float64: ``n_steps`` distinct integers,
    evenly spaced, always containing ``T`` and ``1`` (for ``n_steps >= 2``;
    ``n_steps = 1`` gives ``[T]``).  The step from the last grid time goes to ``t_prev = 0``.

    Parameters
    ----------
    T : int
    n_steps : int, optional, ``1 <= n_steps <= T``

    Returns
    -------
    Tensor, shape (n_steps,), long, strictly decreasing.
    """
    if n_steps is None:
        n_steps = T
    if int(n_steps) != n_steps or not 1 <= n_steps <= T:
        raise CrystalfitError(
            f"n_steps={n_steps!r} is outside [1, {T}]; pass None for all T={T} steps or a smaller positive integer"
        )
    if n_steps == T:
        return torch.arange(T, 0, -1, dtype=torch.long)
    if n_steps == 1:
        return torch.tensor([T], dtype=torch.long)
    return torch.round(torch.linspace(float(T), 1.0, int(n_steps), dtype=torch.float64)).long()


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randn_like(x)
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return z.to(x.device)


def _guided_score(model_fn, guidance, torus_process, lattice_process, lattice, frac, t_b, t_a, fixed_lattice,
                  lattice_clip) -> tuple[Tensor, Tensor]:
    """One network call with ``frac`` requiring grad; returns ``(eps_l, score + guidance)``, both detached."""
    with torch.enable_grad():
        frac_req = frac.detach().requires_grad_(True)
        if getattr(guidance, "needs_score_graph", True):
            eps_l, pred_x = model_fn(lattice, frac_req, t_b)
        else:  # the guidance treats the score as a constant: no graph through the network
            with torch.no_grad():
                eps_l, pred_x = model_fn(lattice, frac_req.detach(), t_b)
        score = torus_process.score_from_prediction(pred_x, t_a)
        if lattice_clip is not None and fixed_lattice is None:
            eps_l = lattice_process.clip_eps(lattice, eps_l.detach(), t_b, lattice_clip)
        if fixed_lattice is not None:
            lat_est = lattice
        else:
            lat_est = lattice_process._tweedie_x0(lattice, eps_l.detach(), t_b)
        g = guidance(frac=frac_req, score=score, sigma=torus_process.sigma_at(t_a, frac),
                     t=t_b, lattice=lat_est.detach())
        if not isinstance(g, Tensor) or g.shape != frac.shape:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise ShapeError(
                f"guidance returned {got}, expected a tensor of shape {tuple(frac.shape)} = frac.shape; "
                "return one guidance vector per coordinate row"
            )
        return eps_l.detach(), (score + g).detach()


def predictor_corrector_sample(
    model_fn: ModelFn,
    lattice_T: Tensor | None,
    frac_T: Tensor,
    batch: Tensor,
    *,
    lattice_process: LatticeDDPM,
    torus_process: WrappedNormalTorus,
    n_steps: int | None = None,
    step_lr: float = 1e-5,
    zero_variance: bool = False,
    fixed_lattice: Tensor | None = None,
    guidance: Guidance | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    lattice_clip: float | None = None,
    guide_corrector: bool = False,
) -> PCSampleResult:
    r"""Reverse-diffuse lattices and fractional coordinates with DiffCSP's predictor-corrector.

    For each time ``t`` of the descending grid (:func:`make_time_grid`), with
    ``t'`` the next grid time (0 after the last):

    1. **Corrector** (Langevin on F only), network call on ``(L_t, F_t)``:
       ``gamma = step_lr (sigma_t/sigma_1)^2``, ``F <- (F + gamma s + sqrt(2 gamma) z) mod 1``.
       The corrector uses the **unconditional** score (guidance is not applied here), as
       DiffCSP's guided sampler and the paper's Eqs. (45)-(46) have it, unless
       ``guide_corrector=True``.  It is skipped, and the call saved, when ``step_lr == 0``.
    2. **Predictor**, network call on ``(L_t, F_{t-1/2})``:
       ``F <- (F + (sigma_t^2 - sigma_t'^2)(s + g) + sqrt(sigma_t'^2 (sigma_t^2 - sigma_t'^2)/sigma_t^2) z) mod 1``
       with ``g`` the guidance (0 without guidance), and the lattice DDPM step
       ``L_t -> L_t'`` (:meth:`LatticeDDPM.reverse_step`) from the same call's ``eps``.

    The score is ``s = -pred_x * sqrt(sigma_norm_t)``.  No noise is added in the last
    step (``t' = 0``); ``zero_variance=True`` drops every ``z`` (the paper's reproducible
    mode) and takes deterministic DDIM steps for the lattice (:meth:`LatticeDDPM.ddim_step`;
    the DDPM mean with ``z = 0`` collapses lattices of an equivariant model to zero).  Model calls: 2 per step, i.e. ``2 T`` (2000) for the full grid and
    ``2 n_steps`` for a strided grid (``n_steps`` when ``step_lr == 0``).

    Parameters
    ----------
    model_fn : callable
        ``model_fn(lattice (B,3,3), frac (N,3), t (B,) long) -> (eps_lattice_hat (B,3,3), pred_x (N,3))``.
    lattice_T : Tensor, shape (B, 3, 3), or None
        Initial lattices (usually ``N(0, I)``); ignored, and may be None, when
        ``fixed_lattice`` is given.
    frac_T : Tensor, shape (N, 3)
        Initial fractional coordinates (usually ``U[0,1)``); wrapped into [0, 1).
    batch : Tensor, shape (N,), long
        Crystal index of each row of ``frac_T``, values in ``0..B-1``.
    lattice_process : LatticeDDPM
    torus_process : WrappedNormalTorus
        Must have the same ``T`` as ``lattice_process``.
    n_steps : int, optional
        Number of reverse steps (None: all ``T``).
    step_lr : float
        Corrector step size (DiffCSP default 1e-5; see SPEC 1.5 for per-dataset values).
    zero_variance : bool
        Drop all noise (deterministic given the initial state).
    fixed_lattice : Tensor, shape (B, 3, 3), optional
        Keep the lattice fixed (the model sees it at every step; the lattice DDPM step is
        skipped and this tensor is returned as the lattice).
    guidance : Guidance, optional
        Object added to the predictor's score; see :class:`Guidance`.  With guidance,
        the predictor call runs under ``torch.enable_grad()`` with ``frac`` requiring
        grad; the guidance receives ``lattice = fixed_lattice`` or the Tweedie
        estimate ``L0_hat``.  Everything is detached after the step.
    generator : torch.Generator, optional
        Source of all noise (any device; noise is moved to the data's device).
    progress : bool
        Show a tqdm progress bar.
    lattice_clip : float, optional
        Clip the lattice Tweedie estimate to this Frobenius norm (Angstrom) before each
        lattice step (:meth:`LatticeDDPM.clip_eps`); None: no clipping (exact SPEC 1.5).
    guide_corrector : bool
        Also add the guidance to the corrector's score (the guidance is then called twice
        per grid time, each time with the graph of that call's score).  With DiffCSP's
        1000 steps and ``step_lr`` 1e-5 the corrector moves the coordinates about 40 times
        more per step than the predictor does, so guidance in the predictor alone is
        outweighed by an unconditional Langevin pull (docs/xrd_guided_diffusion.md, "The
        exact prior").  Not in the paper, which does not say what its corrector does.

    Returns
    -------
    PCSampleResult
        ``lattice`` (B, 3, 3), ``frac`` (N, 3) in [0, 1), ``n_model_calls``, ``time_grid``;
        unpacks as ``(lattice, frac)``.

    Examples
    --------
    >>> from crystalfit.diffusion import LatticeDDPM, WrappedNormalTorus
    >>> lat, tor = LatticeDDPM(), WrappedNormalTorus()
    >>> batch = torch.tensor([0, 0, 1])
    >>> def model_fn(L, F, t):  # a trivial "network"
    ...     return torch.zeros_like(L), torch.zeros_like(F)
    >>> res = predictor_corrector_sample(model_fn, torch.randn(2, 3, 3), torch.rand(3, 3), batch,
    ...                                  lattice_process=lat, torus_process=tor, n_steps=10)
    >>> res.lattice.shape, res.frac.shape, res.n_model_calls
    (torch.Size([2, 3, 3]), torch.Size([3, 3]), 20)
    """
    T = torus_process.T
    if lattice_process.T != T:
        raise CrystalfitError(
            f"lattice_process has T={lattice_process.T} but torus_process has T={T}; "
            "build both processes with the same number of diffusion steps"
        )
    if frac_T.dim() != 2 or frac_T.shape[1] != 3:
        raise ShapeError(f"frac_T has shape {tuple(frac_T.shape)}, expected (N, 3) fractional coordinates")
    N = frac_T.shape[0]
    if batch.shape != (N,) or batch.dtype != torch.long:
        raise ShapeError(
            f"batch has shape {tuple(batch.shape)} and dtype {batch.dtype}, expected ({N},) long = one crystal "
            "index per row of frac_T"
        )
    lattice = fixed_lattice if fixed_lattice is not None else lattice_T
    if lattice is None:
        raise CrystalfitError("lattice_T is None and no fixed_lattice was given; pass initial lattices (B, 3, 3)")
    if lattice.dim() != 3 or lattice.shape[1:] != (3, 3):
        which = "fixed_lattice" if fixed_lattice is not None else "lattice_T"
        raise ShapeError(f"{which} has shape {tuple(lattice.shape)}, expected (B, 3, 3) lattice matrices")
    B = lattice.shape[0]
    if N > 0 and (int(batch.min()) < 0 or int(batch.max()) >= B):
        raise CrystalfitError(
            f"batch has values in [{int(batch.min())}, {int(batch.max())}], expected crystal indices in [0, {B - 1}] "
            f"for B={B} lattices"
        )
    if step_lr < 0:
        raise CrystalfitError(f"step_lr={step_lr} is negative; the Langevin step size must be >= 0 (DiffCSP: 1e-5)")

    device = frac_T.device
    grid = make_time_grid(T, n_steps)
    grid_prev = torch.cat([grid[1:], grid.new_zeros(1)])
    frac = wrap01(frac_T.detach())
    lattice = lattice.detach()
    n_calls = 0

    iterator = zip(grid.tolist(), grid_prev.tolist())
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(grid), desc="sampling")

    grad_ctx = torch.no_grad if guidance is None else contextlib.nullcontext
    with grad_ctx():
        for t_int, tp_int in iterator:
            t_b = torch.full((B,), t_int, dtype=torch.long, device=device)
            t_a = torch.full((N,), t_int, dtype=torch.long, device=device)
            tp_b = torch.full((B,), tp_int, dtype=torch.long, device=device)
            tp_a = torch.full((N,), tp_int, dtype=torch.long, device=device)
            noisy = not zero_variance and tp_int > 0

            # ---- corrector: Langevin on F with the unconditional score (or the guided one)
            if step_lr > 0:
                if guidance is not None and guide_corrector:
                    _, score = _guided_score(model_fn, guidance, torus_process, lattice_process, lattice, frac,
                                             t_b, t_a, fixed_lattice, lattice_clip)
                else:
                    with torch.no_grad():
                        _, pred_x = model_fn(lattice, frac, t_b)
                        score = torus_process.score_from_prediction(pred_x, t_a)
                n_calls += 1
                with torch.no_grad():
                    z = _randn_like(frac, generator) if noisy else None
                    frac = torus_process.corrector_step(frac, score, t_a, step_lr, z)

            # ---- predictor: reverse-VE step on F, DDPM step on L
            if guidance is None:
                eps_l, pred_x = model_fn(lattice, frac, t_b)
                n_calls += 1
                score = torus_process.score_from_prediction(pred_x, t_a)
                if lattice_clip is not None and fixed_lattice is None:
                    eps_l = lattice_process.clip_eps(lattice, eps_l, t_b, lattice_clip)
            else:
                eps_l, score = _guided_score(model_fn, guidance, torus_process, lattice_process, lattice, frac,
                                             t_b, t_a, fixed_lattice, lattice_clip)
                n_calls += 1
            z = _randn_like(frac, generator) if noisy else None
            frac = torus_process.reverse_step(frac, score, t_a, tp_a, z).detach()
            if fixed_lattice is None:
                if zero_variance:
                    lattice = lattice_process.ddim_step(lattice, eps_l, t_b, tp_b).detach()
                else:
                    zl = _randn_like(lattice, generator) if noisy else None
                    lattice = lattice_process._reverse_step(lattice, eps_l, t_b, tp_b, zl).detach()

    if fixed_lattice is not None:
        lattice = fixed_lattice
    return PCSampleResult(lattice=lattice, frac=frac, n_model_calls=n_calls, time_grid=grid)
