"""The efficiency score: the one number that ranks compressed students everywhere in rltune
(the environment's reward in trade-off mode, every tuner's objective, the reports).

For a student with accuracy ``a`` against the float32 student's ``a_ref`` (same split)::

    score = (a − a_ref)                                        accuracy kept
          − P · max(0, a_ref − a − floor)                      accuracy floor (soft budget)
          + w_size · log2(bytes_ref / bytes)                   size saved
          + w_latency · log2(latency_ref / latency)            latency saved
          + w_energy · log2(energy_ref / energy)               energy saved
          − P · max(0, log2(bytes / max_bytes))                hard size budget, if set
          − P · max(0, log2(energy / max_energy))              hard energy budget, if set

Why this form. AMC (He et al., 2018) rewards ``−error · log(FLOPs)``: savings count on a log scale,
so halving a cost is worth the same on a 2 KB model as on a 2 MB one, which is what lets one policy
act across model sizes. HAQ (Wang et al., 2018) instead maximises accuracy *under* a resource
budget. We keep AMC's log savings but make them additive (a product with the error lets a useless
model with zero cost score well) and express HAQ's constraints as hinge penalties with a steep
slope ``P`` (default 5, i.e. one point of accuracy below the floor costs 5 points), so every
candidate gets a finite, comparable number. The defaults (floor 1 pt, ``w_size`` 0.02 per
doubling) are those of the score in REFERENCE.md. In budget mode the target is met by
construction and the score reduces to accuracy at the target.
"""

from __future__ import annotations

import math
from typing import Any, Mapping


def efficiency_score(
    acc: float,
    ref_acc: float,
    bytes_: float,
    ref_bytes: float,
    weights: Mapping[str, Any],
    latency: float | None = None,
    ref_latency: float | None = None,
    energy: float | None = None,
    ref_energy: float | None = None,
) -> tuple[float, dict[str, float]]:
    """Return ``(score, parts)``; ``weights`` is a scenario's ``reward`` section.

    The parts sum to the score and are named as they appear in the environment's ``info``.
    """
    P = float(weights.get("floor_penalty", 5.0))
    floor = float(weights.get("accuracy_floor", 0.01))

    def log_saving(ref, val):
        if ref is None or val is None or ref <= 0 or val <= 0:
            return 0.0
        return math.log2(ref / val)

    parts = {
        "reward_accuracy": acc - ref_acc,
        "reward_floor": -P * max(0.0, ref_acc - acc - floor),
        "reward_size": float(weights.get("w_size", 0.0)) * log_saving(ref_bytes, bytes_),
        "reward_latency": float(weights.get("w_latency", 0.0)) * log_saving(ref_latency, latency),
        "reward_energy": float(weights.get("w_energy", 0.0)) * log_saving(ref_energy, energy),
        "reward_budget": 0.0,
    }
    max_bytes = weights.get("max_bytes")
    if max_bytes:
        parts["reward_budget"] -= P * max(0.0, math.log2(max(bytes_, 1e-12) / max_bytes))
    max_energy = weights.get("max_energy_pj")
    if max_energy and energy is not None:
        parts["reward_budget"] -= P * max(0.0, math.log2(max(energy, 1e-12) / max_energy))
    return sum(parts.values()), parts
