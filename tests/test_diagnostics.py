"""Tier 1: the diagnostics on cases whose answers are known by hand."""

import math

import torch

from scaling_lab.diagnostics import (
    Adapter,
    SignalDrift,
    norms,
    spectral_ratios,
    top_singular_value,
    update_frobenius_squared,
)


def test_signal_and_drift_of_a_gradient_step_on_a_quadratic():
    hessian = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    step_size = 0.1
    probe = SignalDrift(lambda: 0.5 * x @ hessian @ x, [x])
    gradient = (hessian @ x).detach()

    probe.before()
    with torch.no_grad():
        x -= step_size * gradient
    measured = probe.after()

    signal = step_size * float(gradient @ gradient)  # -<g, Δx> with Δx = -η g
    drift = 0.5 * step_size**2 * float(gradient @ hessian @ gradient)  # ½ Δxᵀ H Δx
    assert math.isclose(measured["signal"], signal, rel_tol=1e-12)
    assert math.isclose(measured["drift"], drift, rel_tol=1e-9)
    assert math.isclose(measured["drift_ratio"], drift / signal, rel_tol=1e-9)
    assert math.isclose(measured["probe_loss"], 0.5 * 7.0, rel_tol=1e-12)  # xᵀHx = 3 - 4 + 8 at (1, -2)


def random_adapter(seed: int, scale: float = 2.5) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(3, 7, generator=generator))
    b = torch.nn.Parameter(torch.randn(5, 3, generator=generator))
    return Adapter(a=a, b=b, scale=scale, weight=torch.randn(5, 7, generator=generator))


def test_update_norm_and_spectral_ratio_match_the_dense_update():
    adapter = random_adapter(0)
    dense = adapter.scale * adapter.b.detach() @ adapter.a.detach()
    assert math.isclose(float(update_frobenius_squared(adapter)), float(dense.pow(2).sum()), rel_tol=1e-5)
    (ratio,) = spectral_ratios([adapter])
    expected = torch.linalg.svdvals(dense)[0] / torch.linalg.svdvals(adapter.weight)[0]
    assert math.isclose(ratio, float(expected), rel_tol=1e-4)
    top = float(torch.linalg.svdvals(adapter.weight)[0])
    assert math.isclose(top_singular_value(adapter.weight), top, rel_tol=1e-4)


def test_norms_add_up_in_squares_over_layers():
    first, second = random_adapter(1), random_adapter(2)
    measured = norms([first, second], grad_of=lambda p: torch.ones_like(p))
    expected_a = math.hypot(first.a.norm().item(), second.a.norm().item())
    assert math.isclose(measured["lora_a_norm"], expected_a, rel_tol=1e-6)
    assert math.isclose(measured["grad_a_norm"], math.sqrt(2 * 21), rel_tol=1e-9)
    assert math.isclose(measured["grad_b_norm"], math.sqrt(2 * 15), rel_tol=1e-9)
    dense = [ad.scale * ad.b.detach() @ ad.a.detach() for ad in (first, second)]
    assert math.isclose(measured["update_norm"], math.sqrt(sum(float(d.pow(2).sum()) for d in dense)), rel_tol=1e-5)
