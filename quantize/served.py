"""``loragate eval --served``: the adapter as the gateway serves it, and the base chosen by measured loss.

The llama.cpp backend serves a GGUF LoRA on a base GGUF (the shipped one is Q4_1). When that
path loses more than ``quantize.max_quality_loss_points`` against the adapter that was scored,
the base itself is exported at higher precisions in turn (Q8_0, then F16) and the first one
within the ceiling becomes the GGUF the backend serves that base from (audited, and shown by
``/v1/models``). A higher-precision base costs speed and memory, never quality, for the other
adapters on it; a base that settings pin (``gateway.llamacpp.gguf``) is left alone.
"""

from __future__ import annotations

from pathlib import Path

from loragate.registry import Registry

from .compare import CompareReport, Score, compare_version
from .gguf_export import export_base_gguf

BASE_TYPES = ("q8_0", "f16")  # tried in this order


def score_served(registry: Registry, ref: str, data: Path, *, limit: int | None = None, pick_base: bool = True,
                 score: Score | None = None) -> list[CompareReport]:
    """The adapter and its served path on the same prompts, recorded for the gate (``SUITE@served``);
    with ``pick_base``, then on each higher-precision base until one is within the ceiling."""
    first = compare_version(registry, ref, data, types=(), merged=False, limit=limit, score=score)
    return [first, *(pick_base_by_loss(registry, ref, data, first, limit=limit, score=score) if pick_base else [])]


def pick_base_by_loss(registry: Registry, ref: str, data: Path, first: CompareReport, *, limit: int | None = None,
                      score: Score | None = None) -> list[CompareReport]:
    """Serve the base at each higher precision in turn while the served path (``first``'s last
    row, then each new one) loses more than the ceiling; the reports of the bases tried."""
    gateway = registry.settings.gateway
    base = registry.get(ref).base_model
    if gateway.backend != "llamacpp" or gateway.llamacpp.gguf is not None or base != gateway.llamacpp.base_model:
        return []  # served by vLLM, pinned by settings, or not the base the backend serves
    reports = [first]
    for out_type in _higher_than_serving(registry, base):
        served = reports[-1].rows[-1]
        if served.fit:
            break
        gguf = export_base_gguf(registry, base, out_type)
        registry.set_serving_gguf(base, gguf, out_type=out_type,
                                  reason=f"{ref} lost {served.quality_loss_points:.1f} points on {served.artifact} "
                                         f"(ceiling {first.ceiling_points:g})")
        reports.append(compare_version(registry, ref, data, types=(), merged=False, limit=limit, score=score,
                                       adapter_row=first.rows[0]))
    return reports[1:]


def _higher_than_serving(registry: Registry, base: str) -> tuple[str, ...]:
    """The types of ``BASE_TYPES`` above the one the base is served from now (the shipped one is lower)."""
    record = next(b for b in registry.base_models() if b.id == base)
    current = (record.serving_gguf or {}).get("type")
    return BASE_TYPES[BASE_TYPES.index(current) + 1:] if current in BASE_TYPES else BASE_TYPES
