"""A replica as a live deployment measured it, for the simulator: step model plus serving delay.

``kvpilot bench --profile OUT`` (``cluster.bench.profile``) measures a running endpoint over HTTP
only and ``fit_profile`` turns its measurements into a ``ServingProfile``; ``kvpilot simulate
--profile OUT --config serve.yaml`` replays traces with it (the config gives the replica's KV
cache and batch limits, planned as the deployment plans them). Three kinds of measurement:

``prefill``
    The time to first token of a lone request of ``P`` prompt tokens and one output token
    (median over repetitions, distinct prompts: no prefix-cache hits).
``cached``
    The same prompts sent again: the prefix cache holds all of each prompt but its last token,
    so the engine runs one token through the model, as in a decode step of one sequence.
``decode``
    The median time per output token after the first of ``B`` concurrent streams of ``L``
    prompt tokens: one decode step of ``B`` sequences at context about ``L`` + half the output.

The serving path (HTTP, Serve's proxy, the ingress's checks and tokenization, the router, the
replica's hand-over to the engine, the first chunk's way back) is a per-request delay outside
the engine: ``serving_delay_s`` = cached TTFT − the decode step of one sequence at the same
context, both one token through the model. The engine's prefill steps are then
``TTFT(P) − serving_delay_s``, and the decode steps are the measured times per token, which carry
the serving path's per-token work (detokenizing, one SSE event per token; on a CPU replica it shares the
cores with the engine). ``cluster.sim.perfmodel.fit_rows`` fits the step model to both.
The simulator adds ``serving_delay_s`` to every request's time to first token and end-to-end
latency; the engine does not wait for it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.sim.perfmodel import FitError, MeasuredStep, StepModel, fit_rows

PROFILE_KIND = "kvpilot-sim-profile"
PROFILE_VERSION = 1


@dataclass(frozen=True)
class PrefillSample:
    prompt_tokens: int
    ttft_ms: float  # median over repetitions


@dataclass(frozen=True)
class DecodeSample:
    batch: int
    context_tokens: int  # per sequence, mean over the measured steps
    itl_ms: float  # one decode step: the median time per output token after the first


@dataclass(frozen=True)
class ServingProfile:
    """What ``kvpilot bench --profile`` measured of one model's endpoint, fitted."""

    model: str
    url: str
    measured_at: str
    step: StepModel
    serving_delay_s: float
    prefill: list[PrefillSample]
    cached: PrefillSample  # the repeated prompts: TTFT with all but one token cached
    decode: list[DecodeSample]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": PROFILE_KIND, "version": PROFILE_VERSION, "model": self.model, "url": self.url,
                "measured_at": self.measured_at, "serving_delay_s": self.serving_delay_s,
                "step_model": self.step.to_dict(), "prefill": [asdict(s) for s in self.prefill],
                "cached": asdict(self.cached), "decode": [asdict(s) for s in self.decode], "notes": self.notes}

    def describe(self) -> str:
        return (f"profile of {self.model} at {self.url} ({self.measured_at}): serving delay "
                f"{self.serving_delay_s * 1e3:.1f} ms per request; {self.step.describe()}")


def fit_profile(model: str, url: str, measured_at: str, prefill: list[PrefillSample], cached: PrefillSample,
                decode: list[DecodeSample]) -> ServingProfile:
    """The step model and the serving delay from one profiling run (see the module docstring)."""
    if not prefill:
        raise ValueError("profile: no prefill measurements (every prompt length was over max_model_len?)")
    if not decode:
        raise ValueError("profile: no decode measurements")
    lone = [d for d in decode if d.batch == 1]
    if not lone:
        raise ValueError("profile: no decode measurement of one sequence (batch 1), needed for the serving delay")
    step_one = min(lone, key=lambda d: abs(d.context_tokens - cached.prompt_tokens))
    delay_ms = max(0.0, cached.ttft_ms - step_one.itl_ms)
    notes = [f"serving delay = cached-prompt TTFT {cached.ttft_ms:.2f} ms ({cached.prompt_tokens} tokens, all but "
             f"one cached) - decode step of one sequence {step_one.itl_ms:.2f} ms (context "
             f"{step_one.context_tokens}) = {delay_ms:.2f} ms per request, outside the engine",
             "prefill rows: TTFT of a lone request minus the serving delay",
             "decode rows: median time per output token of B concurrent streams (carries the per-token serving "
             "work)"]
    rows = [MeasuredStep(s.prompt_tokens, s.prompt_tokens * s.prompt_tokens / 2, 0, 0,
                         max(1e-3, s.ttft_ms - delay_ms)) for s in prefill]
    rows += [MeasuredStep(0, 0.0, d.batch, d.batch * d.context_tokens, d.itl_ms) for d in decode]
    step = fit_rows(rows, hardware="measured", tp=1, quantization="as served", notes=notes)
    return ServingProfile(model=model, url=url, measured_at=measured_at, step=step, serving_delay_s=delay_ms / 1e3,
                          prefill=list(prefill), cached=cached, decode=list(decode), notes=notes)


def _step_from_dict(d: dict[str, Any]) -> StepModel:
    return StepModel(**{**d, "fit": FitError(**d["fit"])})


def load_profile(path: str | Path) -> ServingProfile:
    """Read a profile written by ``kvpilot bench --profile``; errors name the file and the field."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--profile: cannot read {path} ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"--profile: {path} is not JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("kind") != PROFILE_KIND:
        raise ValueError(f"--profile: {path}: kind is {doc.get('kind') if isinstance(doc, dict) else doc!r}, "
                         f"not {PROFILE_KIND!r} (write one with kvpilot bench --profile)")
    if doc.get("version") != PROFILE_VERSION:
        raise ValueError(f"--profile: {path}: version {doc.get('version')!r} is not {PROFILE_VERSION}")
    try:
        delay = float(doc["serving_delay_s"])
        if not delay >= 0:
            raise ValueError(f"--profile: {path}: serving_delay_s {delay!r} must be >= 0")
        return ServingProfile(
            model=str(doc["model"]), url=str(doc["url"]), measured_at=str(doc["measured_at"]),
            step=_step_from_dict(doc["step_model"]), serving_delay_s=delay,
            prefill=[PrefillSample(**s) for s in doc["prefill"]], cached=PrefillSample(**doc["cached"]),
            decode=[DecodeSample(**s) for s in doc["decode"]], notes=list(doc.get("notes", [])))
    except KeyError as e:
        raise ValueError(f"--profile: {path}: field {e.args[0]!r} is missing") from None
    except TypeError as e:
        raise ValueError(f"--profile: {path}: {e}") from None
