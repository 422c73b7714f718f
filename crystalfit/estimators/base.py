"""Shared scikit-learn estimator base for every crystalfit method.

Contract (see ARCHITECTURE.md):

* ``__init__`` stores its keyword arguments verbatim, nothing else;
* validation happens at the start of :meth:`fit`;
* fitted state ends in ``_`` (``module_``, ``history_``, ``n_epochs_`` ...);
* ``random_state`` makes ``fit`` and ``sample`` reproducible;
* ``device="auto"`` uses CUDA when available;
* nested network settings are parameters too: ``network__hidden_scalars=32``
  routes into the ``network`` dict (skorch style), so ``GridSearchCV`` can
  tune them;
* pickles hold CPU weights, so a model fitted on a GPU loads on a CPU;
* :meth:`save` / :meth:`load` write parameters as JSON and weights as a state
  dict read back with ``torch.load(weights_only=True)``.

Subclasses implement ``_build_module()`` (from ``self`` parameters and the
JSON-able fitted attributes listed in ``_fitted_json_attrs``) and their own
``fit`` / ``sample`` / ``score`` using :meth:`_train`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from ..exceptions import CrystalfitError

WEIGHTS_FILE = "weights.pt"
PARAMS_FILE = "params.json"
FITTED_FILE = "fitted.json"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; anything else -> ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CrystalfitError(
            f"device={device!r} was requested but CUDA is not available on this machine; "
            "use device='auto' or device='cpu'"
        )
    return dev


def seed_from_random_state(random_state, offset: int = 0) -> int:
    """An integer seed from an int / None / numpy RandomState / Generator.

    ``None`` draws a fresh seed (not reproducible, as in scikit-learn).
    """
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1)[0]) + offset
    if isinstance(random_state, (int, np.integer)):
        return int(random_state) + offset
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1)) + offset
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**31 - 1)) + offset
    raise CrystalfitError(
        f"random_state must be None, an int, a numpy RandomState or Generator, got {type(random_state).__name__}; "
        "pass an int such as random_state=0 for reproducible results"
    )


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A torch Generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) % (2**63 - 1))
    return gen


class ParameterEMA:
    """Exponential moving average of a module's parameters.

    After the ``n``-th update the average is ``s <- d_n s + (1 - d_n) p`` with
    ``d_n = min(decay, (1 + n) / (10 + n))``: the usual warm-up (as TensorFlow's
    ``ExponentialMovingAverage`` with ``num_updates``), so the first iterates, far from
    the optimum, are forgotten quickly.  Buffers are not averaged.

    Parameters
    ----------
    module : torch.nn.Module
        Its parameters at construction are the first average.
    decay : float in [0, 1)
        Per :meth:`update` (one optimiser step).
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise CrystalfitError(f"ema_decay must be in [0, 1), got {decay!r}; e.g. 0.999, or 0 to switch it off")
        self.decay = float(decay)
        self.n_updates = 0
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.n_updates += 1
        d = min(self.decay, (1.0 + self.n_updates) / (10.0 + self.n_updates))
        for s, p in zip(self.shadow, module.parameters()):
            s.lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, module.parameters()):
            p.copy_(s)


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class CrystalEstimator(BaseEstimator):
    """Base class: parameters, device, seeding, training loop, persistence.

    Subclasses must define ``__init__`` listing their parameters explicitly
    (scikit-learn introspects the signature) and implement
    ``_build_module(self) -> torch.nn.Module``.
    """

    #: names of fitted attributes (JSON-able) needed to rebuild ``module_``
    _fitted_json_attrs: tuple[str, ...] = ()
    #: values for fitted attributes missing from models saved by older versions
    _fitted_json_defaults: dict = {}
    #: name of the dict parameter holding the network settings
    _network_param: str = "network"
    #: defaults of the network settings (merged with the user's dict)
    _network_defaults: dict = {}

    # ------------------------------------------------------------ parameters
    def network_settings(self) -> dict:
        """The network settings in effect: defaults updated by the ``network`` parameter."""
        settings = dict(self._network_defaults)
        user = getattr(self, self._network_param, None) or {}
        unknown = set(user) - set(settings)
        if unknown:
            raise CrystalfitError(
                f"{type(self).__name__}: unknown network setting(s) {sorted(unknown)}; "
                f"valid keys are {sorted(settings)}"
            )
        settings.update(user)
        return settings

    def get_params(self, deep: bool = True) -> dict:
        params = super().get_params(deep=False)
        if deep:
            for key, value in self.network_settings().items():
                params[f"{self._network_param}__{key}"] = value
        return params

    def set_params(self, **params):
        prefix = f"{self._network_param}__"
        nested = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        plain = {k: v for k, v in params.items() if not k.startswith(prefix)}
        if nested:
            unknown = set(nested) - set(self._network_defaults)
            if unknown:
                raise CrystalfitError(
                    f"{type(self).__name__}: unknown network setting(s) {sorted(unknown)}; "
                    f"valid keys are {sorted(self._network_defaults)}"
                )
            merged = dict(getattr(self, self._network_param, None) or {})
            merged.update(nested)
            setattr(self, self._network_param, merged)
        if plain:
            super().set_params(**plain)
        return self

    # --------------------------------------------------------------- helpers
    def _device(self) -> torch.device:
        return resolve_device(getattr(self, "device", "auto"))

    def _check_fitted(self) -> None:
        try:
            check_is_fitted(self, "module_")
        except NotFittedError as exc:
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet; call fit(structures) before "
                "using sample/score/save"
            ) from exc

    def _validate_common_params(self) -> None:
        for name in ("max_epochs", "batch_size"):
            value = getattr(self, name, None)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise CrystalfitError(f"{name} must be a positive integer, got {value!r}; e.g. {name}=100")
        lr = getattr(self, "learning_rate", None)
        if lr is not None and (not np.isfinite(lr) or lr <= 0):
            raise CrystalfitError(f"learning_rate must be a positive finite float, got {lr!r}; e.g. 1e-3")

    # ---------------------------------------------------------- training loop
    def _train(
        self,
        n_items: int,
        loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        *,
        generator: torch.Generator,
        grad_clip_value: float | None = 0.5,
        plateau_factor: float = 0.6,
        plateau_patience: int = 30,
        min_lr: float = 1e-4,
        ema_decay: float = 0.0,
    ) -> None:
        """Shared mini-batch training loop (Adam + ReduceLROnPlateau, DiffCSP defaults).

        Parameters
        ----------
        n_items : number of training items (crystals).
        loss_fn : callable(index (b,) long tensor, generator) -> scalar loss
            for the mini-batch of those items.
        generator : torch.Generator for shuffling (CPU).
        ema_decay : float in [0, 1)
            0 keeps the last optimiser iterate (DiffCSP).  Otherwise the fitted
            weights are the exponential moving average of the iterates over the
            whole training, updated after every optimiser step (see :class:`ParameterEMA`).
        """
        module = self.module_
        module.train()
        opt = torch.optim.Adam(module.parameters(), lr=float(self.learning_rate))
        ema = ParameterEMA(module, ema_decay) if ema_decay > 0 else None
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=plateau_factor, patience=plateau_patience, min_lr=min(min_lr, float(self.learning_rate))
        )
        batch_size = int(min(self.batch_size, n_items))
        n_batches = math.ceil(n_items / batch_size)
        history = list(getattr(self, "history_", []) or [])
        from tqdm.auto import tqdm

        bar = tqdm(range(int(self.max_epochs)), desc=f"fit {type(self).__name__}", disable=not self.verbose)
        shuffle_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        for _ in bar:
            perm = torch.randperm(n_items, generator=shuffle_gen)
            total, count = 0.0, 0
            for b in range(n_batches):
                idx = perm[b * batch_size:(b + 1) * batch_size]
                loss = loss_fn(idx, generator)
                if not torch.isfinite(loss):
                    raise CrystalfitError(
                        f"{type(self).__name__}: training loss became {loss.item()} at epoch {len(history)}; "
                        "lower learning_rate or check the training structures for extreme cells"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip_value is not None:
                    torch.nn.utils.clip_grad_value_(module.parameters(), grad_clip_value)
                opt.step()
                if ema is not None:
                    ema.update(module)
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            epoch_loss = total / max(count, 1)
            history.append(epoch_loss)
            sched.step(epoch_loss)
            bar.set_postfix(loss=f"{epoch_loss:.4g}")
        if ema is not None:
            ema.copy_to(module)
        module.eval()
        self.history_ = history
        self.n_epochs_ = len(history)

    # ------------------------------------------------------------ persistence
    def _build_module(self) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fitted_state(self) -> dict:
        state = {name: _jsonable(getattr(self, name)) for name in self._fitted_json_attrs}
        state["history_"] = list(map(float, getattr(self, "history_", [])))
        state["n_epochs_"] = int(getattr(self, "n_epochs_", 0))
        return state

    def _restore_fitted(self, state: dict, weights: dict, device: torch.device) -> None:
        for name in self._fitted_json_attrs:
            # attributes added after a model was saved take their documented default
            setattr(self, name, state[name] if name in state else self._fitted_json_defaults[name])
        self.history_ = list(state.get("history_", []))
        self.n_epochs_ = int(state.get("n_epochs_", len(self.history_)))
        module = self._build_module()
        module.load_state_dict(weights)
        self.module_ = module.to(device).eval()

    def __getstate__(self):
        state = self.__dict__.copy()
        module = state.pop("module_", None)
        if module is not None:
            state["_module_weights_cpu"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        return state

    def __setstate__(self, state):
        weights = state.pop("_module_weights_cpu", None)
        self.__dict__.update(state)
        if weights is not None:
            device = resolve_device("auto") if getattr(self, "device", "auto") == "auto" else (
                torch.device(self.device) if torch.device(self.device).type != "cuda" or torch.cuda.is_available()
                else torch.device("cpu")
            )
            module = self._build_module()
            module.load_state_dict(weights)
            self.module_ = module.to(device).eval()

    def save(self, path: str | os.PathLike) -> Path:
        """Save to directory ``path``: params.json, fitted.json and weights.pt (a state dict).

        Writes into a temporary directory first and renames it, so an
        interrupted save never leaves a half-written model behind.
        """
        self._check_fitted()
        path = Path(path)
        params = {k: _jsonable(v) for k, v in self.get_params(deep=False).items()}
        for k, v in params.items():
            try:
                json.dumps(v)
            except TypeError as exc:
                raise CrystalfitError(
                    f"parameter {k}={v!r} cannot be saved as JSON; use plain ints/floats/strings/dicts"
                ) from exc
        tmp = path.with_name(path.name + ".tmp-save")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        (tmp / PARAMS_FILE).write_text(json.dumps({"class": type(self).__name__, "params": params}, indent=2))
        (tmp / FITTED_FILE).write_text(json.dumps(self._fitted_state(), indent=2))
        torch.save({k: v.detach().cpu() for k, v in self.module_.state_dict().items()}, tmp / WEIGHTS_FILE)
        if path.exists():
            import shutil

            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None):
        """Load a model written by :meth:`save` (weights read with ``weights_only=True``)."""
        path = Path(path)
        for name in (PARAMS_FILE, FITTED_FILE, WEIGHTS_FILE):
            if not (path / name).exists():
                raise CrystalfitError(
                    f"{str(path)!r} is not a saved crystalfit model: {name} is missing; "
                    "pass the directory written by estimator.save(path)"
                )
        meta = json.loads((path / PARAMS_FILE).read_text())
        if meta.get("class") != cls.__name__:
            raise CrystalfitError(
                f"{str(path)!r} holds a {meta.get('class')} model, not {cls.__name__}; "
                f"load it with {meta.get('class')}.load(path)"
            )
        params = meta["params"]
        if device is not None:
            params["device"] = device
        est = cls(**params)
        state = json.loads((path / FITTED_FILE).read_text())
        dev = est._device() if torch.cuda.is_available() or params.get("device") in ("auto", "cpu", None) else torch.device("cpu")
        weights = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        est._restore_fitted(state, weights, dev)
        return est

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "module_")
