# SPDX-License-Identifier: Apache-2.0
"""
Data-parallel training of our losses with PyTorch Lightning (the ``lightning`` extra).

:class:`ELBOLightningModule` trains a Pyro model and guide with any of our losses
(:class:`~pyro_elbo_lab.BetaELBO`, :class:`~pyro_elbo_lab.BetaMeanFieldELBO` and their
compiled variants) under any Lightning strategy: one process, DDP on CPUs (gloo) or GPUs
(NCCL), several nodes. :class:`DiagnosticsCallback` runs the post-fit diagnostics on rank 0.

The recipe, in four rules:

1. **One optimiser step is one schedule step.** Before every training step the loss's
   step is set to ``trainer.global_step``, so β (and the capacity) follow optimiser steps,
   not batches: with ``accumulate_grad_batches=k`` the k micro-batches of a step share one
   β, and nothing a validation step does moves it. The position is saved in Lightning
   checkpoints, so a resumed Trainer continues β.
2. **Parameters exist before the optimiser.** DDP and ``configure_optimizers`` see only
   the parameters that exist when the strategy is set up. Pyro creates guide parameters
   lazily (an :class:`~pyro.infer.autoguide.AutoNormal` on its first call), so the module
   runs the loss once on the first training batch in ``setup`` (Pyro's
   ``examples/svi_lightning.py`` does this by hand); DDP then broadcasts rank 0's values, so
   every rank starts from the same parameters. The parameter set must be static: a
   parameter first created after this warm-up is never optimised.
3. **Parameters live in modules.** ``pyro.settings.set(module_local_params=True)`` is turned
   on, so :class:`~pyro.nn.PyroModule` parameters (autoguides included) are parameters of
   the module instead of the global param store. The model and guide must be
   :class:`torch.nn.Module` s or methods of one (``vae.model``); ``pyro.module`` inside
   them is fine. A ``pyro.param`` that belongs to no module is an error after the warm-up.
4. **Scale the data plate to the full data.** Under a ``DistributedSampler`` each rank sees
   a local batch of ``b`` of the ``N`` data; the model's plate must say so, and then every
   rank's loss estimates the full-data objective and DDP's gradient average is not
   double-counted::

       with pyro.plate("data", size=N, subsample=torch.arange(len(x_batch))):

References

[1] `PyTorch Distributed: Experiences on Accelerating Data Parallel Training`, Shen Li,
    Yanli Zhao, Rohan Varma, et al. (2020)

[2] `Stochastic Variational Inference`, Matthew D. Hoffman, David M. Blei, Chong Wang,
    John Paisley (2013): minibatch scaling of the local terms by N / b.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import pyro
import torch
from pyro import poutine
from pyro.infer.elbo import ELBOModule
from torch import nn

from .checks import check_int, check_model_kwargs
from .datasets import MissingExtraError
from .terms import ELBOTerms

if TYPE_CHECKING:
    # the types of pytorch_lightning; lightning.pytorch (the unified package) has the same API
    import pytorch_lightning as pl
else:
    try:
        import pytorch_lightning as pl
    except ImportError as e:  # pragma: no cover - depends on the environment
        try:
            import lightning.pytorch as pl
        except ImportError:
            raise MissingExtraError(
                "pyro_elbo_lab.lightning needs PyTorch Lightning, which is not installed or could not be "
                f'imported ({e}). Install it with: pip install "pyro-elbo-lab[lightning]"'
            ) from e

__all__ = ["ELBOLightningModule", "DiagnosticsCallback", "ELBOLoss", "TRAIN_TERMS"]

#: The totals logged on every logging step (prefixed ``train/``), besides ``capacity``
#: for a capacity objective and ``kl/<site>`` with ``log_sites=True``.
TRAIN_TERMS = ("elbo", "reconstruction", "kl", "entropy", "beta")
_CHECKPOINT_KEY = "pyro_elbo_lab"
_LOSS_API = ("state_dict", "load_state_dict", "current_beta", "last_terms", "decompose")


class ELBOLoss(Protocol):
    """
    What :class:`ELBOLightningModule` needs of its loss: any of pyro_elbo_lab's losses
    (:class:`~pyro_elbo_lab.BetaELBO`, :class:`~pyro_elbo_lab.BetaMeanFieldELBO`, ...).
    """

    @property
    def last_terms(self) -> ELBOTerms | None:
        """The terms of the last loss evaluation."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The loss's own state (the schedule position)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...

    def current_beta(self, step: int | None = None) -> float:
        """β at ``step``."""
        ...

    def decompose(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any) -> ELBOTerms:
        """The unweighted terms of one evaluation, without moving the schedule."""
        ...

    def __call__(self, model: nn.Module, guide: nn.Module) -> ELBOModule:
        """Pyro's ``ELBOModule``: ``forward(*args, **kwargs)`` is the differentiable loss."""
        ...


def _trainer_log_every(trainer: pl.Trainer) -> int:
    """The Trainer's ``log_every_n_steps``."""
    # set on the Trainer by Lightning's logger connector at run time, not declared in its class
    return int(trainer.log_every_n_steps)  # type: ignore[attr-defined]


def _owner_module(fn: object) -> nn.Module | None:
    """``fn`` itself if it is a module, the module of a bound method, else ``None``."""
    if isinstance(fn, nn.Module):
        return fn
    if inspect.ismethod(fn) and isinstance(fn.__self__, nn.Module):
        return fn.__self__
    return None


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


class ELBOLightningModule(pl.LightningModule):
    """
    A :class:`~pytorch_lightning.LightningModule` that maximises one of our objectives,
    logs the ELBO's decomposition through the Trainer's loggers, and keeps the β schedule
    in step with the optimiser (see the module docstring for the rules).

    A batch from the data loader is the model's positional data: a tuple or list is
    ``*args``, a single tensor is one argument, a dict is extra keyword data. Keyword data
    common to every batch (e.g. the full data size ``N`` of the subsampled plate) go in
    ``model_kwargs``.

    Logging: every ``log_every_n_steps`` optimiser steps the training step logs
    ``train/elbo``, ``train/reconstruction``, ``train/kl``, ``train/entropy``,
    ``train/beta`` (``train/capacity`` with a capacity, ``train/kl/<site>`` with
    ``log_sites``), in nats, averaged over ranks (``sync_dist=True``); these are the
    unweighted terms of the step's batch, scaled to the full data as the loss is. Reading
    them costs one device synchronisation and an all-reduce per logged value; the other
    steps cost neither.
    With gradient accumulation the logged terms are those of the step's last micro-batch.
    Validation: see :meth:`evaluate`.

    :param model: a Pyro model: a :class:`torch.nn.Module` (e.g. a
        :class:`~pyro.nn.PyroModule`) or a method of one.
    :param guide: its guide, same requirement (an autoguide is a module).
    :param loss: one of our losses, e.g. ``BetaMeanFieldELBO(beta=LinearWarmup(1000))``.
    :param callable optimizer: ``optimizer(parameters)`` returns what Lightning's
        ``configure_optimizers`` may return (an optimiser, or a dict with a scheduler);
        default ``torch.optim.Adam`` with ``lr=1e-3``. A Pyro optimiser
        (``pyro.optim.Adam``) is refused: Lightning steps torch optimisers.
    :param dict model_kwargs: keyword data passed to model and guide on every batch.
    :param dict val_model_kwargs: the same for validation batches (default
        ``model_kwargs``); e.g. the held-out set's size for its plate.
    :param int log_every_n_steps: logging interval in optimiser steps; default the
        Trainer's ``log_every_n_steps``, and must be a multiple of it (Lightning writes
        step metrics only on its own interval).
    :param bool log_sites: also log the KL of each latent site (``train/kl/<site>``).
    :param tuple warmup_batch: the batch of the warm-up call; default the first batch of
        the training data loader.
    :raises ValueError: if ``loss`` is not one of our losses, ``model`` or ``guide`` is not
        a module or a method of one, or ``optimizer`` is a Pyro optimiser.

    .. note:: Constructing the module sets ``pyro.settings.set(module_local_params=True)``
        for the whole process (rule 3), as Pyro's ``examples/svi_lightning.py`` does; code
        that later expects PyroModule parameters in the global param store must set it back.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guide: Callable[..., Any],
        loss: ELBOLoss,
        *,
        optimizer: Callable[[list[nn.Parameter]], pl.utilities.types.OptimizerLRScheduler] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        val_model_kwargs: Mapping[str, Any] | None = None,
        log_every_n_steps: int | None = None,
        log_sites: bool = False,
        warmup_batch: Any = None,
    ) -> None:
        super().__init__()
        missing = [name for name in _LOSS_API if not hasattr(loss, name)]
        if missing:
            raise ValueError(
                f"loss must be one of pyro_elbo_lab's losses (BetaELBO, BetaMeanFieldELBO, ...), got {loss!r} "
                f"without {missing}; for Pyro's ELBO use BetaELBO(beta=1.0), which is Trace_ELBO plus the terms"
            )
        for name, fn in (("model", model), ("guide", guide)):
            if _owner_module(fn) is None:
                raise ValueError(
                    f"{name}={fn!r} is neither a torch.nn.Module nor a method of one, so its parameters cannot be "
                    f"parameters of the LightningModule (DDP and the optimiser would not see them); make it a "
                    f"PyroModule, an autoguide, or a method of an nn.Module that owns its networks"
                )
        if optimizer is not None and (isinstance(optimizer, pyro.optim.PyroOptim) or not callable(optimizer)):
            raise ValueError(
                f"optimizer must be a callable parameters -> torch optimiser, got {optimizer!r}; "
                "e.g. functools.partial(torch.optim.Adam, lr=1e-2) (Lightning steps torch optimisers, not pyro.optim)"
            )
        check_int(
            "log_every_n_steps", log_every_n_steps, 1, allow_none=True, hint="the logging interval in optimiser steps"
        )
        self.model_kwargs = check_model_kwargs(model_kwargs)
        self.val_model_kwargs = (
            self.model_kwargs if val_model_kwargs is None else check_model_kwargs(val_model_kwargs, "val_model_kwargs")
        )
        self.optimizer: Callable[[list[nn.Parameter]], pl.utilities.types.OptimizerLRScheduler] = (
            optimizer if optimizer is not None else functools.partial(torch.optim.Adam, lr=1e-3)
        )
        self.log_every_n_steps = log_every_n_steps
        self.log_sites = bool(log_sites)
        self.warmup_batch = warmup_batch
        self.warmed_up = False
        # rule 3: PyroModule parameters (autoguides too) are parameters of their module
        pyro.settings.set(module_local_params=True)
        self.loss = loss
        # Pyro's ELBOModule: forward = loss.differentiable_loss. Pyro annotates model and guide as
        # nn.Module, but ELBOModule only calls them; a bound method's module is registered below
        self.loss_module = loss(model, guide)  # type: ignore[arg-type]
        owners: list[nn.Module] = []
        for fn in (model, guide):
            owner = _owner_module(fn)
            if owner is not None and owner is not fn and all(owner is not o for o in owners):
                owners.append(owner)  # the module behind a bound method such as vae.model
        self.owners = nn.ModuleList(owners)

    @property
    def model(self) -> Callable[..., Any]:
        """The Pyro model."""
        return self.loss_module.model

    @property
    def guide(self) -> Callable[..., Any]:
        """The guide."""
        return self.loss_module.guide

    # -- data ---------------------------------------------------------------------------------

    def model_inputs(
        self, batch: Any, model_kwargs: Mapping[str, Any] | None = None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """
        ``(args, kwargs)`` for model and guide from a batch: a tuple or list is the
        positional data, a tensor one argument, a dict keyword data added to
        ``model_kwargs`` (default the module's own).
        """
        kwargs = dict(self.model_kwargs if model_kwargs is None else model_kwargs)
        if isinstance(batch, dict):
            kwargs.update(batch)
            return (), kwargs
        if isinstance(batch, (tuple, list)):
            return tuple(batch), kwargs
        return (batch,), kwargs

    # -- rule 2: parameters before the optimiser -----------------------------------------------

    def warm_up(self, batch: Any) -> None:
        """
        Run the loss once on ``batch`` so that every lazily created parameter exists, then
        check that each one is a parameter of this module. Does not move the schedule.
        Called by :meth:`setup`; call it yourself to create the parameters earlier.

        :raises ValueError: naming a ``pyro.param`` site that belongs to no module.
        """
        args, kwargs = self.model_inputs(batch)
        state = self.loss.state_dict()
        try:
            with poutine.trace(param_only=True) as capture:
                self.loss_module(*args, **kwargs)
        finally:
            self.loss.load_state_dict(state)
        own = {id(p) for p in self.parameters()}
        for name, site in capture.trace.nodes.items():
            unconstrained = getattr(site["value"], "unconstrained", None)
            tensor = unconstrained() if unconstrained is not None else site["value"]
            if torch.is_tensor(tensor) and tensor.requires_grad and id(tensor) not in own:
                raise ValueError(
                    f"param site {name!r} is not a parameter of the model's or the guide's nn.Module, so DDP "
                    "would not synchronise it and the optimiser would not train it; create it inside a PyroModule "
                    "(PyroParam or an autoguide, with pyro.settings.set(module_local_params=True) before the first "
                    "call), or as an nn.Parameter of a module the model or guide is a method of (a stale entry of "
                    "Pyro's global param store from an earlier run also lands here: call pyro.clear_param_store())"
                )
        self.warmed_up = True

    def setup(self, stage: str) -> None:
        """Lightning hook: the warm-up call (rule 2) before the strategy wraps the module."""
        if stage != "fit" or self.warmed_up:
            return
        batch = self.warmup_batch
        if batch is None:
            source = getattr(self.trainer.fit_loop, "_data_source", None)
            loader = source.dataloader() if source is not None and source.is_defined() else None
            if loader is None:
                raise ValueError(
                    "found no training data loader for the warm-up call that creates the parameters; pass "
                    "warmup_batch= to ELBOLightningModule or call module.warm_up(batch) before trainer.fit"
                )
            batch = next(iter(loader))
        self.warm_up(batch)
        every = self.log_every_n_steps
        trainer_every = _trainer_log_every(self.trainer)
        if every is not None and trainer_every and every % trainer_every:
            raise ValueError(
                f"log_every_n_steps={every} is not a multiple of the Trainer's log_every_n_steps="
                f"{trainer_every}, so Lightning would drop some of the logged terms; "
                "use a multiple, or leave it None to follow the Trainer"
            )

    def configure_optimizers(self) -> pl.utilities.types.OptimizerLRScheduler:
        """Lightning hook: ``optimizer(parameters)`` over the parameters the warm-up created."""
        if not self.warmed_up:
            raise ValueError(
                "configure_optimizers was called before the warm-up call created the parameters; "
                "call module.warm_up(batch) first (trainer.fit does it in setup)"
            )
        return self.optimizer([p for p in self.parameters() if p.requires_grad])

    # -- rule 1: one optimiser step is one schedule step ---------------------------------------

    def _sync_step(self) -> None:
        self.loss.load_state_dict({"step": int(self.trainer.global_step)})

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """
        The loss (``-objective``, nats) of one batch at β = β(``trainer.global_step``); logs
        the terms on logging steps.
        """
        self._sync_step()
        args, kwargs = self.model_inputs(batch)
        loss = self.loss_module(*args, **kwargs)
        every = self.log_every_n_steps or _trainer_log_every(self.trainer)
        if every and (self.trainer.global_step + 1) % every == 0:
            last = self.loss.last_terms
            if last is None:
                raise RuntimeError(f"the loss {self.loss!r} recorded no terms in its training step")
            terms = last.as_dict(per_site=self.log_sites)  # the one device sync
            self.log_dict(self._select(terms, "train"), on_step=True, on_epoch=False, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs: pl.utilities.types.STEP_OUTPUT, batch: Any, batch_idx: int) -> None:
        # after the optimiser step (or between micro-batches): loss.step == trainer.global_step
        self._sync_step()

    def on_validation_batch_end(
        self, outputs: pl.utilities.types.STEP_OUTPUT, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # a validation step that calls the loss itself counted a step: undo it
        self._sync_step()

    def evaluate(self, batch: Any, prefix: str = "val") -> dict[str, float]:
        """
        Log the unweighted terms of a held-out batch as ``<prefix>/...`` epoch means
        (``sync_dist=True``), with ``val_model_kwargs``; β and :attr:`last_terms` do not move
        (it uses the loss's ``decompose``). Costs one device synchronisation. The module
        defines no ``validation_step`` (Lightning would warn on every fit without validation
        data); add one that calls this::

            class Module(ELBOLightningModule):
                def validation_step(self, batch, batch_idx):
                    self.evaluate(batch)

        :returns: the logged ``{name: value}``.
        """
        args, kwargs = self.model_inputs(batch, self.val_model_kwargs)
        terms = self.loss.decompose(self.model, self.guide, *args, **kwargs).as_dict(per_site=self.log_sites)
        size = len(args[0]) if args and torch.is_tensor(args[0]) and args[0].dim() else None
        values = self._select(terms, prefix)
        self.log_dict(values, on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        return values

    def _select(self, terms: Mapping[str, float], prefix: str) -> dict[str, float]:
        names = TRAIN_TERMS + (("capacity",) if "capacity" in terms else ())
        out = {f"{prefix}/{name}": terms[name] for name in names}
        if self.log_sites:
            out.update({f"{prefix}/{key}": value for key, value in terms.items() if key.startswith("kl/")})
        return out

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning hook: stores ``loss.state_dict()`` (the schedule position)."""
        if self._trainer is not None:
            self._sync_step()
        checkpoint[_CHECKPOINT_KEY] = {"loss": self.loss.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning hook: restores the schedule position, so β continues where it stopped."""
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is not None:
            self.loss.load_state_dict(state["loss"])


class DiagnosticsCallback(pl.Callback):
    """
    Runs the post-fit diagnostics on rank 0 and logs them through the Trainer's loggers
    (as ``diagnostics/<name>`` at the current global step): the importance-sampled log
    evidence, the ELBO, their gap and Pareto k̂ from
    :func:`~pyro_elbo_lab.estimate_evidence`, and optionally the active units of
    :func:`~pyro_elbo_lab.posterior_collapse`. Other ranks go on without waiting for it.

    :param args: the evaluation data, positional (e.g. held-out images).
    :param dict model_kwargs: its keyword data (e.g. the data size of its plate).
    :param int num_samples: importance samples of the evidence estimate.
    :param str per_datapoint: the data plate, to estimate :math:`\\log p(x_n)` per datapoint
        (the right mode for an amortised guide: k̂ over N-fold joint weights is hopeless).
    :param int every_n_epochs: also run at the end of every n-th epoch; default only at the
        end of training.
    :param bool collapse: also run :func:`~pyro_elbo_lab.posterior_collapse` (needs a data
        plate with latent sites, as in a VAE).
    :ivar list results: ``[(global_step, {name: value})]``, on rank 0.
    """

    def __init__(
        self,
        *args: Any,
        model_kwargs: Mapping[str, Any] | None = None,
        num_samples: int = 1000,
        per_datapoint: str | None = None,
        every_n_epochs: int | None = None,
        collapse: bool = False,
    ) -> None:
        super().__init__()
        check_int("num_samples", num_samples, 1, hint="importance samples of the evidence estimate")
        check_int("every_n_epochs", every_n_epochs, 1, allow_none=True, hint="or None to run only at the end")
        self.args = args
        self.model_kwargs = check_model_kwargs(model_kwargs)
        self.num_samples = num_samples
        self.per_datapoint = per_datapoint
        self.every_n_epochs = every_n_epochs
        self.collapse = bool(collapse)
        self.results: list[tuple[int, dict[str, float]]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.results or self.results[-1][0] != trainer.global_step:
            self.run(trainer, pl_module)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """
        Run the diagnostics now (rank 0 only) and log them; returns ``{name: value}``.

        :raises ValueError: if ``pl_module`` is not an :class:`ELBOLightningModule`.
        """
        if not isinstance(pl_module, ELBOLightningModule):
            raise ValueError(
                "DiagnosticsCallback diagnoses an ELBOLightningModule's model and guide, got "
                f"{type(pl_module).__name__}; attach it to a Trainer that fits an ELBOLightningModule"
            )
        if not trainer.is_global_zero:
            return None
        from .diagnostics import estimate_evidence, posterior_collapse

        args = _to_device(self.args, pl_module.device)
        kwargs = _to_device(self.model_kwargs, pl_module.device)
        with torch.no_grad():
            evidence = estimate_evidence(
                pl_module.model,
                pl_module.guide,
                *args,
                model_kwargs=kwargs,
                num_samples=self.num_samples,
                per_datapoint=self.per_datapoint,
            )
            metrics = {k: float(v) for k, v in evidence.as_dict().items() if k != "num_samples"}
            if self.collapse:
                report = posterior_collapse(pl_module.model, pl_module.guide, *args, model_kwargs=kwargs)
                metrics["active_units"] = float(report.active_units)
                metrics["collapse_kl"] = report.kl
        metrics = {f"diagnostics/{k}": v for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        self.results.append((trainer.global_step, metrics))
        return metrics
