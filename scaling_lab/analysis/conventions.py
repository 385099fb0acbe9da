"""Scale conventions: how a LoRA α becomes the multiplier s applied to B·A, and exact conversions between them.

A trial's scaling rule says how its α was applied: s = α / r^q with q = 1 ("standard", PEFT's default α/r),
q = 0.5 ("rslora", α/√r) and q = 0 ("fixed", the α value is the scale itself): RULE_EXPONENTS and
effective_scale, defined once in scaling_lab/objective.py for the grid and the analysis.

A convention says in which terms a law is stated: α_conv = s · r^p with p = 1 ("standard"), p = 0.5 ("rslora")
and p = 0 ("scale"). A law α* = c · r^k in one convention is α* = c · r^(k + p_to − p_from) in another: the same
c, the exponent shifted by the difference of the conventions' exponents. The conversion is exact.
"""

from __future__ import annotations

import numpy as np

from scaling_lab.objective import RULE_EXPONENTS as RULE_EXPONENTS, effective_scale as effective_scale

CONVENTION_EXPONENTS: dict[str, float] = {"standard": 1.0, "rslora": 0.5, "scale": 0.0}

CONVENTION_DESCRIPTIONS: dict[str, str] = {
    "standard": "standard convention: α is PEFT's lora_alpha with scale = α/r",
    "rslora": "rsLoRA convention: α is PEFT's lora_alpha with use_rslora, scale = α/√r",
    "scale": "scale convention: the effective multiplier s applied to B·A",
}

CONVENTION_AXIS_LABELS: dict[str, str] = {
    "standard": "α (lora_alpha, scale = α/r)",
    "rslora": "α_rs (lora_alpha with rsLoRA, scale = α/√r)",
    "scale": "effective scale s (multiplier of B·A)",
}

CONVENTION_SYMBOLS: dict[str, str] = {"standard": "α", "rslora": "α_rs", "scale": "s"}


def alpha_in_convention(scale: np.ndarray, rank: np.ndarray, convention: str) -> np.ndarray:
    """The α that, under `convention`, applies the multiplier `scale` at `rank`."""
    return np.asarray(scale, dtype=float) * np.asarray(rank, dtype=float) ** CONVENTION_EXPONENTS[convention]


def convert_exponent(k: float, from_convention: str, to_convention: str) -> float:
    """The rank exponent of the same law stated in another convention (the coefficient c does not change)."""
    return k + CONVENTION_EXPONENTS[to_convention] - CONVENTION_EXPONENTS[from_convention]
