"""Warnings an export prints and writes into the manifest: results that are valid but that a
user would want to look at before serving them."""

from __future__ import annotations

from collections.abc import Sequence

from service.export.calibration import T_BOUNDS

BOUND_TOLERANCE = 0.01
"""Relative distance from a bound of the temperature search that counts as on it."""
ACCURACY_GAP = 0.10
"""Validation accuracy this far below training accuracy is worth a warning."""
NORMALISATION_GAP = 0.05
"""Raw inputs scoring this much better than normalised ones (or the reverse) says the
model expects the other."""


def temperature_bound(temperature: float, bounds: tuple[float, float] = T_BOUNDS) -> str | None:
    low, high = bounds
    if temperature <= low * (1 + BOUND_TOLERANCE) or temperature >= high / (1 + BOUND_TOLERANCE):
        return (f"calibration: the temperature {temperature:.5g} is at a bound of its search range "
                f"[{low}, {high}]: the model's confidences could not be calibrated on the validation "
                "split (are its inputs what it was trained on?)")
    return None


def accuracy_gap(train: float, val: float, gap: float = ACCURACY_GAP) -> str | None:
    if train - val > gap:
        return (f"validation accuracy {val:.3f} is far below training accuracy {train:.3f}: "
                "overfitting, or the validation split comes from other data")
    return None


def normalisation(model_input: str, accuracy_normalised: float, accuracy_raw: float,
                  layers: Sequence[str], gap: float = NORMALISATION_GAP) -> list[str]:
    out = []
    if model_input == "normalised" and layers:
        out.append(f"the model normalises its own inputs (layer {', '.join(layers)}), so with "
                   "--model-input normalised they are normalised twice; pass --model-input raw")
    if model_input == "normalised" and accuracy_raw - accuracy_normalised > gap:
        out.append(f"the model scores {accuracy_raw:.3f} on raw training rows but {accuracy_normalised:.3f} "
                   "on normalised ones: it seems to normalise its inputs itself, so they would be "
                   "normalised twice; pass --model-input raw")
    if model_input == "raw" and accuracy_normalised - accuracy_raw > gap:
        out.append(f"the model scores {accuracy_normalised:.3f} on normalised training rows but "
                   f"{accuracy_raw:.3f} on raw ones: it seems to expect normalised inputs; "
                   "pass --model-input normalised")
    return out
