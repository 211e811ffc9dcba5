"""Step time of one vLLM replica, fitted to the Splitwise simulator's profile table.

The table (``benchmarks/traces/splitwise_sim_perf_model.csv``, Mutinifni/splitwise-sim)
profiles Llama-2-70B in fp16 on A100-80GB and H100-80GB at TP 2, 4 and 8:
``prompt_time`` (ms) is one prefill of ``batch_size`` prompts of ``prompt_size``
tokens; ``token_time`` (ms) is one decode step of ``batch_size`` sequences whose
context grows from ``prompt_size`` to ``prompt_size + token_size``.

One engine step (vLLM V1 runs prefill chunks and decodes in the same forward pass):

    step_ms = c0 + c_prefill × prefill_tokens + c_attn × prefill_attention_pairs
                 + c_decode × decode_seqs + c_kv × decode_context_tokens

* ``c0``: the fixed cost of a forward pass (streaming the weights, launches, the
  TP all-reduces); fitted separately for steps with decodes (``c0_decode``) and
  prefill-only steps (``c0_prefill``), because the table measures them apart.
* ``c_prefill`` (ms/token): the linear layers, compute bound.
* ``c_attn`` (ms per query-key pair): prefill attention; a chunk of ``c`` tokens
  after ``o`` computed ones attends ``c × (o + c/2)`` pairs (causal).
* ``c_decode`` (ms/sequence): per decoding sequence (its token's share of the
  linear layers, sampling, bookkeeping).
* ``c_kv`` (ms/context token): decode attention reads the whole KV of each
  sequence, memory bound. The table cannot identify it (its longest decode
  context is 32 × 576 tokens, where it is within the noise; an unconstrained
  fit even goes negative), so it is fixed at the roofline: KV bytes per token
  per GPU / HBM bandwidth.

Coefficients come from least squares with non-negative coefficients per (hardware, TP) on the table,
leaving out the ``batch_size = 64`` prefill rows (their ``prompt_time``, 359 ms
for 32,768 tokens on H100 TP=2, is 8× below the 8,192-token single prompt: the
profile did not run them; the decode rows of the same batch are kept).

**Adaptation to a quantized model (the table has no AWQ rows).** Decode-heavy
steps are memory bound: the intercepts are shifted by the change in weight
bytes streamed per GPU per step, ``(W_quant − W_fp16) / HBM bandwidth``, with
both weights from the planner at the same TP (Llama-2-70B AWQ at TP=2 on H100:
17.05 GiB against 64.2 GiB per GPU, about 15 ms less per step). Prefill FLOPs
per GPU are those of the same TP (vLLM runs AWQ through the Marlin kernels on
compute capability ≥ 8.0, which dequantize on the fly at close to fp16 GEMM
speed), so ``c_prefill``, ``c_attn`` and ``c_decode`` are kept. A TP the table
lacks scales the compute coefficients by ``tp_table / tp`` (FLOPs ∝ 1/TP) from
the nearest profiled TP. These are assumptions, not measurements; ``describe()``
prints them.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cluster.config import ModelConfig
from cluster.planning.modelspec import BUILTIN
from cluster.planning.planner import kv_bytes_per_token, weight_bytes_per_gpu

DEFAULT_TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "traces" / "splitwise_sim_perf_model.csv"
TABLE_MODEL = "llama2-70b"
TABLE_SOURCE = "meta-llama/Llama-2-70b-hf"  # the architecture profiled, from the built-in table
# HBM bandwidth (bytes/s) of the profiled GPUs: H100 SXM5 80 GB 3.35 TB/s, A100 SXM4 80 GB 2.039 TB/s (NVIDIA datasheets).
HBM_BYTES_PER_S = {"H100-80GB": 3.35e12, "A100-80GB": 2.039e12}
_TABLE_HW = {"H100-80GB": "h100-80gb", "A100-80GB": "a100-80gb"}
BROKEN_PREFILL_BATCH = 64  # rows whose prompt_time is not a prefill (see the module docstring)


@dataclass(frozen=True)
class FitError:
    rows: int
    mape: float  # mean absolute percentage error over prefill and decode rows
    max_ape: float
    r2: float
    mape_prefill: float
    mape_decode: float


@dataclass(frozen=True)
class StepModel:
    """Coefficients in milliseconds; ``step_s`` turns a batch into seconds."""

    c0_decode: float
    c0_prefill: float
    c_prefill: float
    c_attn: float
    c_decode: float
    c_kv: float
    hardware: str
    tp: int
    quantization: str
    fit: FitError
    assumptions: list[str] = field(default_factory=list)

    def step_ms(self, prefill_tokens: int, attn_pairs: float, decode_seqs: int, decode_ctx: int) -> float:
        c0 = self.c0_decode if decode_seqs else self.c0_prefill
        return (c0 + self.c_prefill * prefill_tokens + self.c_attn * attn_pairs
                + self.c_decode * decode_seqs + self.c_kv * decode_ctx)

    def prefill_tokens_per_s(self, chunk_tokens: int = 512) -> float:
        """Prefill speed: the linear layers' rate, ``1 / c_prefill``; a measured fit that puts prefill
        in attention or the intercept alone (``c_prefill`` 0) gets the rate of a ``chunk_tokens`` chunk."""
        if self.c_prefill > 0:
            return 1e3 / self.c_prefill
        ms = self.step_ms(chunk_tokens, chunk_tokens * chunk_tokens / 2, 0, 0)
        return chunk_tokens * 1e3 / ms if ms > 0 else float("inf")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"step_ms = {self.c0_decode:.2f} (decode steps) | {self.c0_prefill:.2f} (prefill-only) "
                f"+ {self.c_prefill:.4f}×prefill_tokens + {self.c_attn:.2e}×prefill_pairs "
                f"+ {self.c_decode:.3f}×decode_seqs + {self.c_kv:.2e}×decode_ctx_tokens")


def _rows(table: Path, hardware: str, tp: int) -> list[dict]:
    hw = _TABLE_HW.get(hardware)
    if hw is None:
        raise ValueError(f"perf model: hardware {hardware!r} is not profiled; choose one of {', '.join(_TABLE_HW)}")
    with open(table, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == TABLE_MODEL and r["hardware"] == hw
                and int(r["tensor_parallel"]) == tp]
    return rows


def _nnls(x: list[list[float]], y: list[float]) -> np.ndarray:
    """Least squares with every coefficient >= 0 (a cost cannot be negative): exact, by trying each column subset."""
    a, b = np.asarray(x, float), np.asarray(y, float)
    k = a.shape[1]
    best, best_res = np.zeros(k), float(((b) ** 2).sum())
    for mask in range(1, 1 << k):
        cols = [i for i in range(k) if mask >> i & 1]
        coef, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
        if (coef < 0).any():
            continue
        full = np.zeros(k)
        full[cols] = coef
        res = float(((a @ full - b) ** 2).sum())
        if res < best_res:
            best, best_res = full, res
    return best


def fit_table(hardware: str = "H100-80GB", tp: int = 2, table: Path = DEFAULT_TABLE) -> StepModel:
    """Fit the fp16 Llama-2-70B step model for one profiled (hardware, TP) and report its error on the table."""
    rows = _rows(table, hardware, tp)
    if not rows:
        raise ValueError(f"perf model: no {TABLE_MODEL} rows for {hardware} TP={tp} in {table}")
    spec = BUILTIN[TABLE_SOURCE]
    c_kv = kv_bytes_per_token(spec, "auto", "float16", tp) / HBM_BYTES_PER_S[hardware] * 1e3
    px, py, dx, dy, dctx = [], [], [], [], []
    for r in rows:
        p, b, t = int(r["prompt_size"]), int(r["batch_size"]), int(r["token_size"])
        if b != BROKEN_PREFILL_BATCH:
            px.append([1.0, b * p, b * p * p / 2])
            py.append(float(r["prompt_time"]))
        ctx = b * (p + t / 2)  # mean context of the decode steps the row averages
        dx.append([1.0, b])
        dy.append(float(r["token_time"]) - c_kv * ctx)
        dctx.append(ctx)
    c0p, cp, ca = _nnls(px, py)
    c0d, cd = _nnls(dx, dy)
    pred_p = np.asarray(px) @ np.array([c0p, cp, ca])
    pred_d = np.asarray(dx) @ np.array([c0d, cd]) + c_kv * np.asarray(dctx)
    y = np.concatenate([py, np.asarray(dy) + c_kv * np.asarray(dctx)])
    pred = np.concatenate([pred_p, pred_d])
    ape = np.abs(pred - y) / y
    n_p = len(py)
    err = FitError(
        rows=len(y),
        mape=float(ape.mean()),
        max_ape=float(ape.max()),
        r2=float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()),
        mape_prefill=float(ape[:n_p].mean()),
        mape_decode=float(ape[n_p:].mean()),
    )
    return StepModel(
        c0_decode=float(c0d), c0_prefill=float(c0p), c_prefill=float(cp), c_attn=float(ca), c_decode=float(cd),
        c_kv=float(c_kv), hardware=hardware, tp=tp, quantization="none", fit=err,
        assumptions=[
            f"fitted by least squares to {err.rows} rows of {table.name} ({TABLE_MODEL}, {hardware}, TP={tp}, fp16); "
            f"prefill rows with batch {BROKEN_PREFILL_BATCH} left out (not a prefill)",
            f"decode attention fixed at the HBM roofline: {c_kv:.2e} ms per context token "
            f"(KV bytes per token per GPU / {HBM_BYTES_PER_S[hardware] / 1e12:.2f} TB/s)",
        ],
    )


def step_model_for(cfg: ModelConfig, table: Path = DEFAULT_TABLE) -> StepModel:
    """The step model of ``cfg``'s replica: the table's fit, adapted to its quantization and TP."""
    spec = cfg.spec()
    base_spec = BUILTIN[TABLE_SOURCE]
    if (spec.num_layers, spec.hidden_size, spec.intermediate_size) != (
            base_spec.num_layers, base_spec.hidden_size, base_spec.intermediate_size):
        raise ValueError(f"perf model: the table profiles Llama-2-70B only; {cfg.source} has another architecture")
    tp = cfg.tensor_parallel_size
    profiled = sorted({2, 4, 8}, key=lambda t: (abs(math.log2(t / tp)), t))
    base = fit_table(cfg.accelerator, profiled[0], table)
    scale = base.tp / tp
    bw = HBM_BYTES_PER_S[cfg.accelerator]
    w_fp16 = weight_bytes_per_gpu(base_spec, "none", "float16", base.tp)
    w_target = weight_bytes_per_gpu(spec, cfg.quantization, cfg.effective_dtype(), tp)
    shift_ms = (w_target - w_fp16) / bw * 1e3
    c_kv = kv_bytes_per_token(spec, cfg.kv_cache_dtype, cfg.effective_dtype(), tp) / bw * 1e3
    notes = list(base.assumptions)
    notes.append(
        f"{cfg.quantization if cfg.quantization != 'none' else 'fp16'} weights at TP={tp}: "
        f"{w_target / 2**30:.2f} GiB per GPU against {w_fp16 / 2**30:.2f} GiB profiled at TP={base.tp}: per-step "
        f"intercepts shifted by {shift_ms:+.1f} ms (memory bound: weight bytes / HBM bandwidth)")
    notes.append("prefill and per-sequence decode costs kept from fp16 (same FLOPs per GPU; AWQ/GPTQ run through "
                 "Marlin kernels at near-fp16 GEMM speed on compute capability >= 8.0): an assumption, not measured")
    if scale != 1:
        notes.append(f"TP={tp} not profiled: compute coefficients scaled by {base.tp}/{tp} from TP={base.tp}")
    return StepModel(
        c0_decode=max(1.0, base.c0_decode + shift_ms), c0_prefill=max(1.0, base.c0_prefill + shift_ms),
        c_prefill=base.c_prefill * scale, c_attn=base.c_attn * scale, c_decode=base.c_decode * scale,
        c_kv=c_kv, hardware=cfg.accelerator, tp=tp, quantization=cfg.quantization, fit=base.fit, assumptions=notes,
    )


@dataclass(frozen=True)
class MeasuredStep:
    """One measured engine step (or the mean of several alike): the batch and its time in ms.

    ``prefill_tokens`` / ``attn_pairs`` describe prefill work as ``StepModel.step_ms`` counts it
    (a chunk of ``c`` tokens after ``o`` computed ones attends ``c × (o + c/2)`` pairs);
    ``decode_seqs`` / ``decode_ctx`` the decoding sequences and their summed context.
    """

    prefill_tokens: int
    attn_pairs: float
    decode_seqs: int
    decode_ctx: int
    ms: float


def fit_rows(rows: list[MeasuredStep], *, hardware: str = "cpu", tp: int = 1, quantization: str = "none",
             notes: list[str] | None = None) -> StepModel:
    """Fit every ``StepModel`` coefficient (``c_kv`` included) to measured steps of a real engine.

    Non-negative least squares (as ``fit_table``) on the columns ``[decode step, prefill-only step,
    prefill tokens, prefill pairs, decode sequences, decode context tokens]``. Rows of pure
    prefill steps fit ``c0_prefill``, ``c_prefill``, ``c_attn``; rows with decodes the rest. The
    error is on the same rows (an in-sample fit: few rows, few coefficients).
    """
    if not rows:
        raise ValueError("fit_rows: no measured steps")
    x = [[1.0 if r.decode_seqs else 0.0, 0.0 if r.decode_seqs else 1.0, float(r.prefill_tokens), float(r.attn_pairs),
          float(r.decode_seqs), float(r.decode_ctx)] for r in rows]
    y = np.array([r.ms for r in rows], float)
    coef = _nnls(x, y.tolist())
    c0d, c0p, cp, ca, cd, ckv = (float(c) for c in coef)
    pred = np.asarray(x) @ coef
    ape = np.abs(pred - y) / y
    is_dec = np.array([bool(r.decode_seqs) for r in rows])
    ss_tot = float(((y - y.mean()) ** 2).sum())
    err = FitError(
        rows=len(rows),
        mape=float(ape.mean()),
        max_ape=float(ape.max()),
        r2=float(1 - ((pred - y) ** 2).sum() / ss_tot) if ss_tot > 0 else 1.0,
        mape_prefill=float(ape[~is_dec].mean()) if (~is_dec).any() else float("nan"),
        mape_decode=float(ape[is_dec].mean()) if is_dec.any() else float("nan"),
    )
    return StepModel(
        c0_decode=c0d, c0_prefill=c0p, c_prefill=cp, c_attn=ca, c_decode=cd, c_kv=ckv, hardware=hardware, tp=tp,
        quantization=quantization, fit=err,
        assumptions=[f"fitted by non-negative least squares to {len(rows)} measured steps of the real engine",
                     *(notes or [])],
    )
