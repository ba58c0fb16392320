r"""Named KLD-WRM optimizers: :class:`SOKLDWRM`, :class:`QKLDWRM`, :class:`QEKLDWRM`.

They are :class:`curvkit.optim.CurvatureOptimizer` with the methods' recommended settings as
defaults (:data:`curvkit_kldwrm.kldwrm.RECOMMENDED`, the same as ``create()``'s; the
author's MNIST step settings were ``lr=0.01``, ``weight_decay=1e-3`` added **before**
preconditioning, ``kl_clip=0.1`` and for Q/QE a per-layer ``rms_clip=2.0``) and two
additions the generic optimizer lacks:

* before each step they pass every layer's learning rate :math:`\eta_k = 1/\lambda_k` to its
  block (the wake recursions use :math:`\eta_{k-1}/\eta_k`, Q augments its factors by
  :math:`\eta_k A^{\text{loc}}`);
* :class:`QEKLDWRM` keeps the last ``capacity`` networks (parameter copies, FIFO) and, after
  the Q step, runs ``inner_steps`` SGD steps (lr ``inner_lr_factor·η``, momentum
  ``inner_momentum``) on
  :math:`\langle g_k, s\rangle + \tfrac12 s^\top(G^{\text{loc}}\otimes A^{\text{loc}})s
  + \tfrac{\lambda_k}{2\kappa} D_{\text{sym}}(\theta)` with :math:`s = \theta - \theta_k` and
  :math:`D_{\text{sym}}` the ω-weighted recursion of symmetrised KLs between the softmax of the
  model's outputs at θ and at the stored networks, on the **batch of the latest
  gradient-enabled forward pass** (captured by a forward pre-hook on the model: no extra call).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvkit.optim.optimizer import CurvatureOptimizer
from curvkit.optim.preconditioner import layer_matrix, split_layer_matrix

__all__ = ["QEKLDWRM", "QKLDWRM", "SOKLDWRM", "symmetric_kl"]

#: Key of the stored past networks inside ``QEKLDWRM.state_dict()``.
PAST_KEY = "kldwrm_past"


def symmetric_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    r""":math:`\tfrac12[\mathrm{KL}(p\|q) + \mathrm{KL}(q\|p)]` of the softmaxes over dim 1,
    averaged over the other dims (the author's ``exact_classif_sym_KL``)."""
    log_p, log_q = torch.log_softmax(logits_p, 1), torch.log_softmax(logits_q, 1)
    diff = log_p - log_q
    return (0.5 * (log_p.exp() - log_q.exp()) * diff).sum(1).mean()


class _KLDWRMOptimizer(CurvatureOptimizer):
    def _push_step_sizes(self) -> None:
        groups = self._group_of()
        for name, layer in self.preconditioner.layers.items():
            group = groups.get(id(layer.weight))
            block = self.preconditioner.blocks[name]
            if group is not None and hasattr(block, "set_step_size"):
                block.set_step_size(group["lr"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self._push_step_sizes()
        return super().step(closure)


class SOKLDWRM(_KLDWRMOptimizer):
    """SO-KLD-WRM (Puiu 2022); options: :class:`curvkit_kldwrm.SOKLDWRMConfig`."""

    method = "so-kldwrm"


class QKLDWRM(_KLDWRMOptimizer):
    """Q-KLD-WRM (Puiu 2022); options: :class:`curvkit_kldwrm.QKLDWRMConfig`."""

    method = "q-kldwrm"


class QEKLDWRM(QKLDWRM):
    """QE-KLD-WRM (Puiu 2022); options: :class:`curvkit_kldwrm.QEKLDWRMConfig`.

    Memory beyond Q-KLD-WRM: ``capacity`` copies of the model's parameters (the past
    networks; buffers are shared with the live model) plus, during a step, one copy each of
    θ_k and g_k and the past networks' outputs on the batch.
    """

    method = "qe-kldwrm"

    def __init__(self, model: nn.Module, params: Any = None, **kwargs: Any) -> None:
        super().__init__(model, params, **kwargs)
        for block in self.preconditioner.blocks.values():
            block.driven = True  # type: ignore[attr-defined]
        self.model = model
        self.past: list[dict[str, Tensor]] = []
        self._batch: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        ref = weakref.ref(self)

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            opt = ref()  # weakly held: a deleted optimizer records nothing
            if opt is not None:
                opt._capture(module, args, kwargs)

        self._input_hook = model.register_forward_pre_hook(capture, with_kwargs=True)
        weakref.finalize(self, self._input_hook.remove)

    def remove_hooks(self) -> None:
        """Detach from the model (the curvature hooks and the batch capture of the inner loop)."""
        super().remove_hooks()
        self._input_hook.remove()

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled() and not self.preconditioner.is_suspended:
            detach = lambda x: x.detach() if isinstance(x, Tensor) else x  # noqa: E731
            self._batch = (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()})

    def _snapshot(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        pre = self.preconditioner
        cfg: Any = self.config
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        theta_k = {id(p): p.detach().clone() for p in params}
        g_k = {id(p): p.grad.detach().clone() for p in params if p.grad is not None}
        before = pre.steps
        loss = super().step(closure)
        if pre.steps == before:  # skipped step: nothing changes
            return loss
        if len(self.past) == cfg.capacity and cfg.inner_steps > 0 and self._batch is not None:
            self._inner_loop(params, theta_k, g_k)
        self.past.append(self._snapshot())
        if len(self.past) > cfg.capacity:
            self.past.pop(0)
        self._batch = None
        return loss

    def _inner_loop(self, params: list[Tensor], theta_k: dict[int, Tensor], g_k: dict[int, Tensor]) -> None:
        pre, cfg = self.preconditioner, self.config
        groups = self._group_of()
        assert self._batch is not None
        args, kwargs = self._batch
        with pre.suspended():
            targets = [functional_call(self.model, past, args, kwargs) for past in self.past]
        omega = cfg.omega  # type: ignore[attr-defined]
        lam = 1.0 / self.param_groups[0]["lr"] if self.param_groups[0]["lr"] > 0 else 0.0
        scale = lam / (2.0 * cfg.kappa)  # type: ignore[attr-defined]
        bufs: dict[int, Tensor] = {}
        for _ in range(cfg.inner_steps):  # type: ignore[attr-defined]
            with torch.enable_grad(), pre.suspended():
                out = self.model(*args, **kwargs)
                d = symmetric_kl(out, targets[0])
                for t in targets[1:]:
                    d = omega * d + (1 - omega) * symmetric_kl(out, t)
                kl_grads = torch.autograd.grad(scale * d, params, allow_unused=True)
            total = {
                id(p): (g if g is not None else torch.zeros_like(p)) + g_k[id(p)] for p, g in zip(params, kl_grads)
            }
            for name, layer in pre.layers.items():
                block: Any = pre.blocks[name]
                if id(layer.weight) not in total or getattr(block, "B_A", None) is None:
                    continue
                b = layer.bias
                s = layer_matrix(
                    layer, layer.weight - theta_k[id(layer.weight)], None if b is None else b - theta_k[id(b)]
                )
                bw, bb = split_layer_matrix(layer, block.B_G @ s.to(block.B_A.dtype) @ block.B_A)
                total[id(layer.weight)] += bw.to(layer.weight.dtype)
                if b is not None and bb is not None:
                    total[id(b)] += bb.to(b.dtype)
            for p in params:
                d_p = total[id(p)]
                clip = cfg.inner_rms_clip  # type: ignore[attr-defined]
                if clip is not None:
                    rms = float(d_p.norm()) / math.sqrt(d_p.numel())
                    d_p = d_p * min(1.0, clip / max(rms, 1e-30))
                buf = bufs.get(id(p))
                if buf is None:
                    bufs[id(p)] = buf = d_p.clone()
                else:
                    buf.mul_(cfg.inner_momentum).add_(d_p)  # type: ignore[attr-defined]
                p.add_(buf, alpha=-cfg.inner_lr_factor * groups[id(p)]["lr"])  # type: ignore[attr-defined]

    def state_bytes(self) -> int:
        past = sum(t.numel() * t.element_size() for net in self.past for t in net.values())
        return super().state_bytes() + past

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out[PAST_KEY] = [{k: v.clone() for k, v in net.items()} for net in self.past]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        past = state_dict.pop(PAST_KEY, [])
        super().load_state_dict(state_dict)
        self.past = [{k: v.clone() for k, v in net.items()} for net in past]
