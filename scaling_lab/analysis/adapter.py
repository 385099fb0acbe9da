"""From a law to an adapter: laws read back from law.json (no refit), and the PEFT adapter config a user trains with.

A law in law.json keeps its coefficients, their covariance from the residuals and, since format 2, the bootstrap
resamples of its coefficients, so a prediction from law.json has the same interval as one from a fresh fit. An
older law.json has no resamples: its intervals then come from the residual covariance alone, and say so.

PEFT's LoraConfig applies scale = lora_alpha / r, or lora_alpha / √r with use_rslora. A law stated in the standard
convention gives lora_alpha directly; in the rsLoRA convention, lora_alpha with use_rslora; in the scale
convention, lora_alpha = s · r. The file is written as JSON (PEFT itself imports torch, which the analysis does
not); `peft.LoraConfig.from_pretrained(DIR)` loads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaling_lab.analysis.conventions import CONVENTION_DESCRIPTIONS
from scaling_lab.analysis.fit import AnalysisError
from scaling_lab.analysis.powerlaw import Prediction, extrapolation_warnings, interval_band
from scaling_lab.results import ResultsError

ADAPTER_CONFIG = "adapter_config.json"
PREDICTION_NOTE = "scaling_lab_prediction.json"
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


@dataclass(frozen=True)
class StoredLaw:
    """One α law of a law.json: enough to predict with its interval and its warnings."""

    entry: dict
    convention: str

    @property
    def group(self) -> dict:
        return self.entry.get("group") or {}

    def group_label(self) -> str:
        return ", ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                         for name, value in self.group.items()) or "all cells"

    def formula(self) -> str:
        return self.entry["formula"]

    @property
    def has_size(self) -> bool:
        return self.entry.get("m") is not None

    @property
    def has_bootstrap(self) -> bool:
        return bool(self.entry.get("bootstrap_parameters"))

    def predict(self, rank: float, model_params: float | None = None) -> Prediction:
        if self.has_size and model_params is None:
            raise AnalysisError(f"the joint law {self.formula()} needs a model size (--model-params)")
        size_term = [self.entry["m"]] if self.has_size else []
        parameters = np.array([math.log(self.entry["c"]), self.entry["k"], *size_term])
        row = [1.0, math.log(rank)] + ([math.log(model_params)] if self.has_size else [])
        covariance = np.array(self.entry["covariance_from_residuals"], dtype=float)
        if self.has_bootstrap:
            stored = self.entry["bootstrap_parameters"]
            replicates = np.array([[math.nan if v is None else v for v in row] for row in stored])
        else:
            replicates = np.tile(parameters, (2, 1))  # no spread: the interval comes from the covariance alone
        values, lows, highs = interval_band(parameters, covariance, replicates, int(self.entry["dof"]), np.array([row]))
        warnings = extrapolation_warnings(rank, self.entry["ranks"], model_params if self.has_size else None,
                                          self.entry.get("model_sizes") or ())
        if not self.entry.get("supported", True):
            warnings.append("the law is not supported by the data: " + "; ".join(self.entry.get("warnings", [])))
        if not self.has_bootstrap:
            warnings.append("this law.json holds no bootstrap resamples: the interval is the residual one alone "
                            "(refit the results for the full interval)")
        return Prediction(float(values[0]), float(lows[0]), float(highs[0]), tuple(warnings))


def is_law_file(source: str) -> bool:
    return source.lower().endswith(".json")


def read_law_document(path: str | Path) -> dict:
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{path}: not a readable law.json ({str(exc).splitlines()[0]})") from None
    if not isinstance(document, dict) or "laws" not in document or "convention" not in document:
        raise ResultsError(f"{path}: not a law.json written by `python -m scaling_lab.analysis fit`")
    return document


def stored_laws(document: dict, model: str | None = None, model_params: float | None = None) -> list[StoredLaw]:
    """The laws a prediction uses, as `predict` chooses them from a fit: the joint law with `model_params`, that
    model's own law with `model`, otherwise every α law."""
    convention = document["convention"]["name"]
    if model_params is not None:
        entries = document.get("joint_laws") or []
        if not entries:
            raise AnalysisError("no joint law in model size in this law.json (fit it from several model sizes)")
    elif model is not None:
        entries = [e for e in document["laws"] if (e.get("group") or {}).get("model") == model]
        if not entries:
            known = sorted({c["model"] for c in document.get("cells", [])})
            raise AnalysisError(f"no law for model {model!r} (models: {', '.join(known)})")
    else:
        entries = document["laws"]
    fitted = [e for e in entries if e.get("c") is not None]
    if not fitted:
        reasons = "; ".join(str(e.get("reason")) for e in entries)
        raise AnalysisError(f"no law could be fitted ({reasons})")
    return [StoredLaw(e, convention) for e in fitted]


def study_spec_of(document: dict, law_path: Path | None) -> tuple[dict | None, str]:
    """The study spec behind a law: law.json's own copy, else the spec.yaml of the results it was fitted on."""
    if document.get("study_spec"):
        origin = f"{law_path} (study_spec)" if law_path else f"{str(document.get('source')).rstrip('/')}/spec.yaml"
        return document["study_spec"], origin
    from scaling_lab.analysis.load import read_study_spec

    source = document.get("source") or ""
    candidates = [Path(source)] + ([law_path.parent / Path(source).name] if law_path is not None and source else [])
    for candidate in candidates:
        if source and candidate.is_dir():
            spec = read_study_spec(candidate)
            if spec is not None:
                return spec, str(candidate / "spec.yaml")
    return None, "none found (PEFT's defaults for target_modules and dropout)"


def peft_lora_alpha(value: float, convention: str, rank: int) -> tuple[float, bool]:
    """PEFT's lora_alpha and use_rslora that apply the optimum `value` stated in `convention` at `rank`."""
    if convention == "standard":
        return value, False
    if convention == "rslora":
        return value, True
    return value * rank, False


def write_peft_config(
    out_dir: Path,
    *,
    law: StoredLaw,
    rank: int,
    prediction: Prediction,
    spec: dict | None,
    spec_origin: str,
    model: str | None,
    model_params: float | None,
    provenance: dict,
) -> list[Path]:
    """DIR/adapter_config.json (what PEFT loads) and DIR/scaling_lab_prediction.json (the interval, the law, where
    it came from)."""
    lora_alpha, use_rslora = peft_lora_alpha(prediction.value, law.convention, rank)
    low, _ = peft_lora_alpha(prediction.low, law.convention, rank)
    high, _ = peft_lora_alpha(prediction.high, law.convention, rank)
    lora = (spec or {}).get("lora") or {}
    models = {m.get("name"): m for m in (spec or {}).get("models") or []}
    model_entry = models.get(model) if model else (next(iter(models.values())) if len(models) == 1 else None)
    target_modules = lora.get("target_modules", "all-linear")
    config = {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES[(model_entry or {}).get("kind", "causal_lm")],
        "r": rank,
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "lora_dropout": float(lora.get("dropout", 0.0)),
        "bias": "none",
        "init_lora_weights": "gaussian" if lora.get("init") == "gaussian" else True,
        "base_model_name_or_path": (model_entry or {}).get("source"),
    }
    learning_rates = ((spec or {}).get("grid") or {}).get("learning_rates") or []
    group_lr = law.group.get("learning_rate")
    single_lr = learning_rates[0] if len(learning_rates) == 1 else None
    note = {
        "what": "the optimal LoRA α predicted by a scaling_lab law, written as PEFT's adapter config beside this file",
        "rank": rank,
        "model": model,
        "model_params": model_params,
        "law": {"formula": law.formula(), "group": law.group, "convention": law.convention,
                "convention_description": CONVENTION_DESCRIPTIONS[law.convention],
                "c": law.entry["c"], "c_ci95": law.entry.get("c_ci95"), "k": law.entry["k"],
                "k_ci95": law.entry.get("k_ci95"), "m": law.entry.get("m"), "supported": law.entry.get("supported"),
                "ranks_measured": law.entry.get("ranks")},
        "prediction_in_law_convention": {"value": prediction.value, "ci95": [prediction.low, prediction.high]},
        "peft": {"lora_alpha": lora_alpha, "lora_alpha_ci95": [low, high], "use_rslora": use_rslora,
                 "effective_scale": lora_alpha / (math.sqrt(rank) if use_rslora else rank)},
        "learning_rate": group_lr if group_lr is not None else single_lr,
        "learning_rate_note": "the law holds at the learning rate its trials ran at: train at it",
        "warnings": list(prediction.warnings) + ([] if spec else ["no study spec found: target_modules and "
                                                                  "lora_dropout are PEFT's defaults here"]),
        "study_spec": spec_origin,
        **provenance,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in ((ADAPTER_CONFIG, config), (PREDICTION_NOTE, note)):
        path = out_dir / name
        path.write_text(json.dumps(content, indent=2, allow_nan=False) + "\n")
        written.append(path)
    return written
