"""Training diagnostics, cheap enough to leave on: adapter and gradient norms, Signal-Drift, spectral suppression.

Our operational definitions (the LoRA-α paper's exact ones are not public):
- signal  S = -<∇L_probe(θ), Δθ>: the first-order predicted decrease of a fixed probe batch's loss from a step's
  update Δθ of the adapter parameters;
- drift   D = (L_probe(θ + Δθ) - L_probe(θ)) + S: how much the actual change exceeds that prediction
  (exactly ½ Δθᵀ H Δθ for a quadratic loss with Hessian H); drift ratio D / S;
- update norm ‖s·B·A‖_F, summed in squares over adapted layers (as are the A, B and gradient norms);
- spectral ratio σ₁(s·B·A) / σ₁(W) per adapted layer at the end of a trial, W the frozen weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Adapter:
    """One adapted layer: its LoRA factors, the scale applied to B·A, and the frozen weight."""

    a: torch.nn.Parameter  # r × in
    b: torch.nn.Parameter  # out × r
    scale: float
    weight: torch.Tensor  # out × in


def adapters(model: torch.nn.Module) -> list[Adapter]:
    from peft.tuners.lora import LoraLayer

    found = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, scale in module.scaling.items():
                found.append(
                    Adapter(module.lora_A[name].weight, module.lora_B[name].weight, scale,
                            module.get_base_layer().weight)
                )
    return found


def update_frobenius_squared(adapter: Adapter) -> torch.Tensor:
    """‖s·B·A‖_F² through r × r products: trace((BᵀB)(AAᵀ)) · s²."""
    a, b = adapter.a.detach().float(), adapter.b.detach().float()
    return (adapter.scale**2) * torch.trace((b.T @ b) @ (a @ a.T))


def norms(found: list[Adapter], grad_of: Callable[[torch.Tensor], torch.Tensor | None]) -> dict[str, float]:
    def total(tensors) -> float:
        return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tensors if t is not None))

    return {
        "lora_a_norm": total(ad.a.detach() for ad in found),
        "lora_b_norm": total(ad.b.detach() for ad in found),
        "update_norm": math.sqrt(max(0.0, float(sum(update_frobenius_squared(ad) for ad in found)))),
        "grad_a_norm": total(grad_of(ad.a) for ad in found),
        "grad_b_norm": total(grad_of(ad.b) for ad in found),
    }


class SignalDrift:
    """Measures one optimizer step against a fixed probe loss: call `before()`, take the step, then `after()`."""

    def __init__(self, probe_loss: Callable[[], torch.Tensor], params: list[torch.Tensor]):
        self.probe_loss, self.params = probe_loss, params

    def before(self) -> None:
        loss = self.probe_loss()
        self.gradients = torch.autograd.grad(loss, self.params)
        self.loss_before = float(loss.detach())
        self.snapshot = [p.detach().clone() for p in self.params]

    def after(self) -> dict[str, float]:
        with torch.no_grad():
            loss_after = float(self.probe_loss())
            predicted_change = sum(
                float((g.double() * (p.detach().double() - old.double())).sum())
                for g, p, old in zip(self.gradients, self.params, self.snapshot)
            )
        signal = -predicted_change
        drift = (loss_after - self.loss_before) + signal
        del self.gradients, self.snapshot
        return {
            "probe_loss": self.loss_before,
            "signal": signal,
            "drift": drift,
            "drift_ratio": drift / signal if signal != 0 else math.nan,
        }


def top_singular_value(matrix: torch.Tensor, iterations: int = 30) -> float:
    """σ₁ by power iteration: cheap for large frozen weights, where a full SVD is not."""
    matrix = matrix.detach().float()
    vector = torch.ones(matrix.shape[1], dtype=matrix.dtype, device=matrix.device) / math.sqrt(matrix.shape[1])
    for _ in range(iterations):
        vector = matrix.T @ (matrix @ vector)
        vector = vector / vector.norm().clamp_min(1e-30)
    return float((matrix @ vector).norm())


def spectral_ratios(found: list[Adapter]) -> list[float]:
    """σ₁(s·B·A) / σ₁(W) per adapted layer; σ₁ of the low-rank update from its r × r core (QR of each factor)."""
    ratios = []
    for adapter in found:
        _, r_b = torch.linalg.qr(adapter.b.detach().float())
        _, r_a = torch.linalg.qr(adapter.a.detach().float().T)
        update_top = abs(adapter.scale) * float(torch.linalg.svdvals(r_b @ r_a.T)[0])
        ratios.append(update_top / max(top_singular_value(adapter.weight), 1e-30))
    return ratios
