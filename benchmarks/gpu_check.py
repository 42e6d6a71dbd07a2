"""MultiMax on a GPU: correctness on the hardware, attention speed and memory, end to end, and the GPU tests, in one
prepared run that writes everything to ``--output_dir`` (default ``$OUT``).

Parts (``--part``, run in this order with ``all``: what is least known first):

* ``correctness``: the Triton kernel against a float64 reference in float32, bfloat16 and float16; causal and not,
  padding masks with fully masked rows, a T5 score bias with a float mask, GQA, head dimensions 64 and 128, lengths
  that are multiples of no tile, per-layer and per-head σ with trained-looking values (slopes up to ±1), dropout
  (against the blocked path in float64 with the same seed); the output and every gradient (q, k, v, ranges, ts,
  bias) as ‖x − ref‖/‖ref‖ within a band per dtype, no NaN, every output element written (the allocator's free blocks
  are poisoned with NaN first), two runs bit-identical, and each call computed by the Triton kernel. Cases run in
  parallel worker processes (``--workers``), because compiling the kernels takes longer than running them.
* ``attention``: forward and forward+backward in bfloat16, causal and not, 1k/4k/16k/32k tokens (batch × heads fill
  the chip: 16k tokens per batch, 2048 = heads × head_dim), head_dim 64 and 128: ``multimax`` (Triton) against SDPA's
  flash backend, SDPA's cuDNN backend, FlexAttention with σ as ``score_mod`` and the parameters captured with
  ``requires_grad`` (``hf_multimax.kernels.flex``), and FlexAttention with plain SoftMax; medians of CUDA-event
  timings, peak memory above the inputs, TFLOP/s against the bf16 matrix-product rate measured in the same run. A
  multimax timing whose calls did not all run on Triton is recorded as failed. FlexAttention runs at 4k and 16k only
  (each length compiles it anew); what fails is recorded with its error.
* ``end_to_end``: a Llama of 1.1B parameters (TinyLlama's shape, random weights, bf16, from a config): a training
  step (forward, backward, fused AdamW) at batch 4 × 2048, and ``generate`` (prefill 2048, decode 256, batch 8,
  dynamic and static cache), ``multimax`` against ``sdpa``; output-layer MultiMax's chunked σ + cross-entropy
  against plain cross-entropy at vocabulary 128256 (8192 tokens, hidden 2048), time and peak memory.
* ``tests``: ``tests/unit/test_triton_kernel.py`` on the GPU (compiled, not interpreted), the CUDA test of
  ``tests/unit/test_kernels.py``, and the GPU-gated FSDP tests when there is more than one GPU; with pytest-xdist
  when it is installed.

Predicted time on one H200 (the GPU machine's image: torch 2.11, triton 3.6), each part its own process, from
compile times measured for sm_90 on a CPU (``triton_kernel.compile_offline``: 3-9 s for the three kernels of a
bf16/fp16 variant, ~20 s for fp32 at head dimension 64, ~60 s at 128) and the H200's measured rates (~790 TFLOP/s
bf16, 4.3 TB/s):

* correctness ~2 min: 21 cases, about 60 kernel variants to compile (~4 min of compiling) over 8 workers, the
  fp32 head-dimension-128 case (~60 s) first; the float64 references are small (L ≤ 1000).
* attention ~5-7 min: the matmul rate ~10 s; 96 multimax/SDPA entries of ~0.3-1 s each (warm-up, ≥ 3 timed calls
  or 0.25 s, one call for memory) ~1.5 min, with 4 multimax variants to compile (~25 s); then 32 FlexAttention
  entries, each compiling anew (~5-20 s), ~5 min: the budget cuts the last ones (recorded as skipped).
* end_to_end ~3 min: two 1.1B models with their AdamW states (~20 GB), 2 × 7 training steps of ~0.3 s; 2 models ×
  2 caches × (warm-up, 2 prefills, 2 full generates of ~6-8 s: 256 eager decode steps) ~1.5 min; the output layer
  ~15 s.
* tests ~3 min: every variant of the interpreter tests compiled (float64 ones included) over 8 xdist workers.

Every part starts no new work once ``--budget`` seconds (default 420) are spent and records what it skipped, so none
runs past ~8 minutes. Two commands on the GPU machine: ``correctness attention`` (~9 min, bounded by the wrapper's
``GPU_CHECK_SECONDS``) and ``end_to_end tests`` (~6 min).

    bash benchmarks/gpu_check.sh correctness attention       # on the GPU machine: install, run, results in $OUT
    python benchmarks/gpu_check.py --part correctness --output_dir /tmp/gpu
    python benchmarks/gpu_check.py --dry-run --output_dir /tmp/dry   # on a CPU: tiny sizes, Triton's interpreter
    python benchmarks/gpu_check.py --report-from a/gpu_check.json b/gpu_check.json --output_dir merged

Writes ``gpu_check.json`` (every number), ``gpu_check.md`` (tables, the issue's targets) and ``gpu_check.png`` after
each part, and prints a short table last. Exit code 1 when a correctness check fails, a multimax timing did not run on
the Triton kernel, or a test fails; a missed speed target is a result, not a failure.

``--dry-run`` runs the same code on the CPU at tiny sizes with ``TRITON_INTERPRET=1`` (Triton's interpreter on CPU
tensors; multimax is asked for ``backend="triton"``); the entries that need CUDA (SDPA cuDNN, FlexAttention's
compiled kernels, peak memory) are recorded as skipped with the reason. ``tests/integration/test_gpu_check.py`` runs
it, so that no GPU time goes to finding an import or shape error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("correctness", "attention", "end_to_end", "tests")
#: ‖x − ref‖ / ‖ref‖ allowed per input dtype (the issue's bands: float32 far under 1e-3, half precision 1e-3 to 1e-2).
BANDS = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 1e-2}
GRAD_NAMES = ("output", "dq", "dk", "dv", "d_ranges", "d_ts", "d_bias")


# ----------------------------------------------------------------------------------------------------------------------
# sizes


@dataclass(frozen=True)
class Sizes:
    """Every size of a run: the GPU's (:func:`gpu_sizes`) or the dry run's (:func:`dry_sizes`)."""

    correctness: tuple[dict, ...]
    attention_seqs: tuple[int, ...]  # in the order they are measured (the targets' lengths first)
    attention_tokens: int  # tokens per batch: batch = max(1, tokens // seq)
    attention_hidden: int  # heads = hidden // head_dim
    head_dims: tuple[int, ...]
    flex_seqs: tuple[int, ...]
    matmul_size: int
    llama: dict = field(default_factory=dict)
    train_batch: tuple[int, int] = (4, 2048)  # (sequences, tokens each)
    generate: tuple[int, int, int] = (8, 2048, 256)  # (batch, prompt, new tokens)
    output_layer: tuple[int, int, int] = (8192, 2048, 128256)  # (tokens, hidden, vocabulary)
    output_chunks: tuple[int | None, ...] = (None, 1024)  # chunk rows: the default (16 MiB of logits) and a larger one
    train_steps: int = 5
    train_warmup: int = 2
    generate_repeats: int = 2
    min_reps: int = 3
    max_reps: int = 30
    target_s: float = 0.25  # timed seconds per attention entry
    workers: int = 8


def correctness_cases(
    head_dims: tuple[int, int], lengths: dict[str, tuple[int, ...]], dtypes: dict, atomic: tuple = ()
) -> list[dict]:
    """The correctness matrix: each case kind × (dtype, head dimension) pairs of ``dtypes[kind]``, with the default
    (deterministic) backward, and the ``(kind, dtype, head dimension)`` cases of ``atomic`` with the opt-in one-kernel
    backward."""
    (b1, h1, hkv1, l1), (b2, h2, l2), (b3, h3, lq3, lk3), (b4, h4, l4) = (
        lengths["causal_gqa"],
        lengths["padding"],
        lengths["t5_bias"],
        lengths["dropout"],
    )
    kinds = {
        # GQA, causal, no mask, per-head σ
        "causal_gqa": dict(batch=b1, heads=h1, kv_heads=hkv1, q_len=l1, kv_len=l1, causal=True, per_head=True),
        # left padding (bool, causality inside the mask as Transformers builds it): padded query rows fully masked
        "padding": dict(batch=b2, heads=h2, kv_heads=h2, q_len=l2, kv_len=l2, mask="padding", per_head=False),
        # cross attention, T5 position bias with a gradient, float key-padding mask
        "t5_bias": dict(batch=b3, heads=h3, kv_heads=h3, q_len=lq3, kv_len=lk3, mask="keys_float", bias=True),
        # dropout on the probabilities, causal, shared σ
        "dropout": dict(batch=b4, heads=h4, kv_heads=h4, q_len=l4, kv_len=l4, causal=True, dropout=0.1, per_head=False),
    }
    cases = []
    plan = [(kind, dtype, size, "deterministic") for kind, pairs in dtypes.items() for dtype, size in pairs]
    plan += [(kind, dtype, size, "atomic") for kind, dtype, size in atomic]
    for kind, dtype, size, backward in plan:
        spec = dict(causal=False, mask="none", bias=False, dropout=0.0, per_head=True, order=2)
        spec.update(kinds[kind], kind=kind, dtype=dtype, head_dim=head_dims[size == "large"], backward=backward)
        spec["seed"] = len(cases)
        cases.append(spec)
    return cases


def gpu_sizes() -> Sizes:
    every = [("bfloat16", "small"), ("bfloat16", "large"), ("float16", "small"), ("float16", "large")]
    fp32 = [("float32", "small")]
    return Sizes(
        correctness=tuple(
            correctness_cases(
                (64, 128),
                {
                    "causal_gqa": (2, 8, 2, 1000),
                    "padding": (3, 4, 777),
                    "t5_bias": (2, 4, 300, 517),
                    "dropout": (2, 4, 513),
                },
                {
                    "causal_gqa": [("float32", "large"), *fp32, *every],
                    "padding": [*fp32, *every],
                    "t5_bias": [*fp32, *every],
                    "dropout": [*fp32, *every],
                },
                atomic=(
                    ("causal_gqa", "bfloat16", "large"),
                    ("causal_gqa", "float32", "small"),
                    ("t5_bias", "bfloat16", "small"),
                    ("dropout", "bfloat16", "large"),
                ),
            )
        ),
        attention_seqs=(4096, 16384, 1024, 32768),
        attention_tokens=16384,
        attention_hidden=2048,
        head_dims=(128, 64),
        flex_seqs=(4096, 16384),
        matmul_size=8192,
        # TinyLlama 1.1B: 22 layers, hidden 2048, 32 heads of 64, 4 key/value heads, SwiGLU 5632, vocabulary 32000.
        llama=dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
    )


def dry_sizes() -> Sizes:
    """Tiny sizes for the CPU and Triton's interpreter: every code path of :func:`gpu_sizes`, in about a minute."""
    return Sizes(
        correctness=tuple(
            correctness_cases(
                (16, 32),
                {"causal_gqa": (1, 4, 2, 70), "padding": (3, 2, 21), "t5_bias": (2, 2, 13, 17), "dropout": (1, 2, 19)},
                {
                    "causal_gqa": [("float32", "small"), ("bfloat16", "large")],
                    "padding": [("float32", "small"), ("float16", "small")],
                    "t5_bias": [("float32", "small"), ("bfloat16", "small")],
                    "dropout": [("float32", "small")],
                },
                atomic=(("t5_bias", "float32", "small"), ("causal_gqa", "bfloat16", "large")),
            )
        ),
        attention_seqs=(70,),
        attention_tokens=70,
        attention_hidden=32,
        head_dims=(16,),
        flex_seqs=(70,),
        matmul_size=256,
        llama=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=256,
        ),
        train_batch=(1, 24),
        train_warmup=1,
        generate=(2, 16, 3),
        output_layer=(64, 32, 1000),
        output_chunks=(None, 16),
        train_steps=1,
        generate_repeats=1,
        min_reps=1,
        max_reps=1,
        target_s=0.0,
        workers=1,
    )


# ----------------------------------------------------------------------------------------------------------------------
# shared helpers


@dataclass
class Context:
    """What every part needs: the device, the sizes, the time budget and the backend multimax is asked for."""

    device: str
    sizes: Sizes
    dry_run: bool
    budget_s: float
    started: float = field(default_factory=time.perf_counter)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def multimax_backend(self) -> str | None:
        """The automatic choice on the GPU (what users get; the recorder checks it is Triton); Triton by name on the
        CPU, where the automatic choice is the C++ kernel."""
        return None if self.cuda else "triton"

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s

    def skipped_for_budget(self) -> str:
        return f"skipped: the part's time budget ({self.budget_s:.0f} s) was spent"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def time_call(ctx: Context, fn: Callable[[], object], warmup: int = 1, reps: int | None = None) -> float:
    """Median seconds of ``fn()`` (CUDA events on the GPU), after ``warmup`` calls; the number of repetitions fills
    ``sizes.target_s`` within ``[min_reps, max_reps]`` unless ``reps`` is given."""
    import torch

    for _ in range(warmup):
        fn()
    ctx.sync()

    def once() -> float:
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    samples = [once()]
    if reps is None:
        wanted = int(ctx.sizes.target_s / max(samples[0], 1e-6))
        reps = min(ctx.sizes.max_reps, max(ctx.sizes.min_reps, wanted))
    samples += [once() for _ in range(reps - 1)]
    return statistics.median(samples)


@contextlib.contextmanager
def peak_during(ctx: Context) -> Iterator[dict]:
    """``{"mib": ...}`` after the block: the peak CUDA memory (MiB) allocated inside it above what was allocated
    before it; ``None`` on the CPU."""
    found: dict = {"mib": None}
    if not ctx.cuda:
        yield found
        return
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield found
    torch.cuda.synchronize()
    found["mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20


def peak_mib(ctx: Context, fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory (MiB) that one ``fn()`` allocates above what is allocated before it; ``None`` on the CPU
    (where ``fn`` is not called)."""
    if not ctx.cuda:
        return None
    with peak_during(ctx) as peak:
        fn()
    return peak["mib"]


def error_text(error: BaseException, limit: int = 400) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def expect_triton(entry: dict) -> Iterator[None]:
    """Record which backends the attention calls inside ran on into ``entry["backends"]``; a call that did not run on
    the Triton kernel marks the entry failed (the timing would not be of the kernel it claims)."""
    from common import backend_mismatch

    from hf_multimax.kernels import record_backends

    with record_backends() as seen:
        yield
    entry["backends"] = sorted({call.backend for call in seen})
    mismatch = backend_mismatch(seen, "triton")
    if mismatch:
        entry.update(status="failed", error=f"multimax {mismatch}")


def cleanup(ctx: Context) -> None:
    import gc

    gc.collect()
    if ctx.cuda:
        import torch

        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# part 1: correctness


def trained_looking_parameters(order: int, heads: int | None, gen) -> tuple:
    """σ parameters as training leaves them (not the identity): breakpoints below and above 0, slopes up to ±1."""
    import torch

    shape = (2 * order,) if heads is None else (heads, 2 * order)
    low_side = torch.arange(2 * order) % 2 == 0
    magnitude = 0.25 + 1.75 * torch.rand(shape, generator=gen)
    ranges = torch.where(low_side, -magnitude, magnitude)
    ts = torch.rand(shape, generator=gen) * 2 - 1
    return ranges, ts


def correctness_case(spec: dict) -> dict:
    """One correctness case (in a worker process): the kernel against the float64 reference."""
    keys = ("kind", "backward", "dtype", "head_dim", "batch", "heads", "kv_heads", "q_len", "kv_len")
    result = {key: spec[key] for key in keys}
    started = time.perf_counter()
    try:
        result.update(_correctness_case(spec))
    except Exception as error:  # noqa: BLE001 (a worker reports, the main process decides)
        result.update(passed=False, error=error_text(error), traceback=traceback.format_exc()[-2000:])
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def _poison_free_blocks(device, shapes: list[tuple[int, ...]]) -> None:
    """Fill blocks of these float32 shapes with NaN and free them, so that the caching allocator hands them to the
    kernel's ``torch.empty`` outputs: an element the kernel never writes then shows as NaN (no-op on the CPU)."""
    import torch

    if device.type != "cuda":
        return
    blocks = [torch.full(shape, float("nan"), device=device) for shape in shapes]
    del blocks


def _correctness_case(spec: dict) -> dict:
    import torch
    from torch import nn

    from hf_multimax.attention import multimax_eager_attention_forward
    from hf_multimax.kernels import multimax_attention, record_backends
    from hf_multimax.modeling import SegLU

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    os.environ["HF_MULTIMAX_TRITON_BACKWARD"] = spec["backward"]  # read at each backward (the pool reuses workers)
    b, h, hkv, lq, lk, d = (spec[k] for k in ("batch", "heads", "kv_heads", "q_len", "kv_len", "head_dim"))
    gen = torch.Generator().manual_seed(spec["seed"])
    q, k, v = (torch.randn(shape, generator=gen) for shape in ((b, h, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)))
    ranges, ts = trained_looking_parameters(spec["order"], h if spec["per_head"] else None, gen)
    bias = torch.randn(1, h, lq, lk, generator=gen) if spec["bias"] else None
    grad_out = torch.randn(b, lq, h, d, generator=gen)
    mask = None
    if spec["mask"] == "padding":  # left padding, causality inside the mask (as sdpa_mask builds it)
        pads = torch.tensor([0, lq // 7, lq // 2][:b] + [0] * max(0, b - 3))
        keys = torch.arange(lk)[None, :] >= pads[:, None]
        mask = keys[:, None, None, :] & (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None])[None, None]
    elif spec["mask"] == "keys_float":
        keep = torch.rand(b, lk, generator=gen) > 0.2
        keep[:, 0] = True
        mask = torch.zeros(b, 1, 1, lk).masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min).to(dtype)
    mask = mask.to(device) if mask is not None else None
    # Inputs and parameters in the case's dtype (a bf16 model's σ parameters are bf16); the reference gets float64
    # copies of the same rounded values.
    leaves = [t.to(device=device, dtype=dtype) for t in (q, k, v, ranges, ts)] + (
        [bias.to(device=device, dtype=dtype)] if bias is not None else []
    )
    grad_out = grad_out.to(device=device, dtype=dtype)

    def run(inputs: list, backend: str | None) -> tuple[list, list]:
        inputs = [t.detach().clone().requires_grad_() for t in inputs]
        torch.manual_seed(spec["seed"])  # the dropout seed the call draws
        _poison_free_blocks(device, [(b, lq, h, d), (2, b, h, lq)])
        with record_backends() as seen:
            out = multimax_attention(
                *inputs[:5],
                attention_mask=mask,
                is_causal=spec["causal"],
                position_bias=inputs[5] if bias is not None else None,
                dropout_p=spec["dropout"],
                backend=backend,
            )
            grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
        return [out.detach(), *grads], seen

    first, seen = run(leaves, spec["backend"])
    second, _ = run(leaves, spec["backend"])
    exact = [t.detach().double() for t in leaves]
    if spec["dropout"]:  # the same dropout mask: the blocked path (its own implementation of the hash) in float64
        reference, _ = run(exact, "torch")
        same_dtype = None
    else:

        def eager(inputs: list) -> list:
            inputs = [nn.Parameter(t.detach().clone()) for t in inputs]  # σ's parameters are module parameters
            module = nn.Module()
            module.multimax = SegLU(spec["order"], h if spec["per_head"] else None)
            module.multimax.multimax_ranges, module.multimax.multimax_ts = inputs[3:5]
            module.num_key_value_groups, module.is_causal = h // hkv, spec["causal"]
            out, _ = multimax_eager_attention_forward(
                module, *inputs[:3], mask, position_bias=inputs[5] if bias is not None else None
            )
            grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
            return [out.detach(), *grads]

        reference = eager(exact)
        same_dtype = eager(leaves)  # the eager path in the case's dtype: how far rounding alone takes it

    names = [n for n in GRAD_NAMES if n != "d_bias" or bias is not None]
    errors, ok = {}, True
    band = BANDS[spec["dtype"]]
    for i, name in enumerate(names):
        got, want = first[i].double(), reference[i]
        scale = want.norm().item() or 1.0
        errors[name] = {
            "rel": (got - want).norm().item() / scale,
            "max_rel": (got - want).abs().max().item() / (want.abs().max().item() or 1.0),
            "eager_rel": None if same_dtype is None else (same_dtype[i].double() - want).norm().item() / scale,
            "finite": bool(torch.isfinite(first[i]).all()),
        }
        ok &= errors[name]["finite"] and errors[name]["rel"] <= band
    deterministic = all(torch.equal(a, c) for a, c in zip(first, second, strict=True))
    backends = sorted({call.backend for call in seen})
    on_triton = backends == ["triton"] and len(seen) == 2
    masked_rows_zero = None
    if mask is not None and mask.dtype == torch.bool:
        dead = ~mask.any(-1)  # (B, 1, Lq): rows with no key to attend
        rows = first[0].transpose(1, 2)[dead.expand(b, h, lq)]
        masked_rows_zero = bool(rows.numel() > 0 and (rows == 0).all())
    # The one-kernel backward adds with atomics: its runs may differ in the last bits, so only the bands apply.
    passed = ok and (deterministic or spec["backward"] == "atomic") and on_triton and masked_rows_zero is not False
    return dict(
        errors=errors,
        band=band,
        deterministic=deterministic,
        backends=backends,
        fallback=next((c.fallback for c in seen if c.fallback), None),
        masked_rows_zero=masked_rows_zero,
        passed=passed,
    )


def run_correctness(ctx: Context) -> dict:
    cases = [dict(spec, device=ctx.device, backend=ctx.multimax_backend) for spec in ctx.sizes.correctness]
    # Longest first (float32 compiles slowest, then the larger head dimension), so the pool finishes together.
    cases.sort(key=lambda c: (c["dtype"] != "float32", -c["head_dim"]))
    results: list[dict] = []
    workers = max(1, min(ctx.sizes.workers, len(cases)))
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        pending = pool.imap_unordered(correctness_case, cases)
        for _ in cases:
            remaining = ctx.budget_s - (time.perf_counter() - ctx.started)
            try:
                result = pending.next(timeout=max(1.0, remaining))
            except multiprocessing.TimeoutError:
                break
            results.append(result)
            print(
                f"  correctness {result['kind']} {result['dtype']} d{result['head_dim']} {result['backward']}: "
                f"{'ok' if result['passed'] else 'FAILED ' + result.get('error', '')}",
                flush=True,
            )
    finally:
        pool.terminate()
        pool.join()
    key = ("kind", "dtype", "head_dim", "backward")
    done = {tuple(r[k] for k in key) for r in results}
    for spec in cases:
        if tuple(spec[k] for k in key) not in done:
            results.append(
                {k: spec[k] for k in (*key, "batch", "heads", "kv_heads", "q_len", "kv_len")}
                | {"passed": False, "error": ctx.skipped_for_budget()}
            )
    results.sort(key=lambda r: tuple(r[k] for k in key))
    return {"cases": results, "workers": workers, "passed": all(r["passed"] for r in results)}


# ----------------------------------------------------------------------------------------------------------------------
# part 2: attention speed and memory

IMPLS = ("multimax", "sdpa_flash", "sdpa_cudnn", "flex_multimax", "flex_softmax")
#: The kernel's opt-in one-kernel backward (atomic dQ), timed forward + backward only (its forward is multimax's).
ATOMIC = "multimax_atomic"
MULTIMAX_IMPLS = ("multimax", ATOMIC)


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, mode: str) -> float:
    """FlashAttention's count: 4·B·H·L²·D for the forward (two products), half of it causal; the backward 2.5 times
    the forward (five products)."""
    forward = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return forward * (1.0 if mode == "fwd" else 3.5)


def _attention_call(ctx: Context, impl: str, inputs: dict, causal: bool, grad: bool) -> Callable[[], object]:
    """One call of ``impl`` on ``inputs`` (forward, or forward and the gradients of every input that has one)."""
    import torch
    from torch.nn import functional as F

    q, k, v, ranges, ts, grad_out = (inputs[n] for n in ("q", "k", "v", "ranges", "ts", "grad_out"))
    scale = q.shape[-1] ** -0.5
    if impl in MULTIMAX_IMPLS:
        from hf_multimax.kernels import multimax_attention

        def forward():
            return multimax_attention(q, k, v, ranges, ts, scale=scale, is_causal=causal, backend=ctx.multimax_backend)

        leaves, layout = [q, k, v, ranges, ts], "blhd"
    elif impl.startswith("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if impl == "sdpa_cudnn" and not ctx.cuda:
            raise Skip("needs CUDA (the cuDNN backend)")
        backend = SDPBackend.FLASH_ATTENTION if impl == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION

        def forward():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

        leaves, layout = [q, k, v], "bhld"
    else:
        if not ctx.cuda:
            raise Skip("needs CUDA (compiled FlexAttention)")
        from hf_multimax.kernels import flex

        if impl == "flex_multimax":

            def forward():
                return flex.flex_multimax_attention(q, k, v, ranges, ts, scale=scale, is_causal=causal)

            leaves, layout = [q, k, v, ranges, ts], "blhd"
        else:

            def forward():
                return flex.flex_softmax_attention(q, k, v, scale=scale, is_causal=causal)

            leaves, layout = [q, k, v], "bhld"
    dout = grad_out if layout == "blhd" else grad_out.transpose(1, 2)
    if not grad:

        def call():
            with torch.no_grad():
                return forward()

        return call
    if impl == ATOMIC:
        from hf_multimax.kernels import triton_kernel

        def atomic():
            was, triton_kernel.BACKWARD = triton_kernel.BACKWARD, "atomic"
            try:
                return torch.autograd.grad(forward(), leaves, dout)
            finally:
                triton_kernel.BACKWARD = was

        return atomic
    return lambda: torch.autograd.grad(forward(), leaves, dout)


class Skip(Exception):
    """An entry that cannot run here (recorded as skipped with the reason)."""


def _attention_inputs(ctx: Context, seq: int, head_dim: int, grad: bool) -> dict:
    import torch

    batch = max(1, ctx.sizes.attention_tokens // seq)
    heads = max(1, ctx.sizes.attention_hidden // head_dim)
    dtype, device = torch.bfloat16, torch.device(ctx.device)
    gen = torch.Generator(device).manual_seed(seq + head_dim)  # drawn where they live: 100M values per tensor at 32k

    def randn(*shape, grad: bool = grad):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).requires_grad_(grad)

    params = trained_looking_parameters(2, None, torch.Generator().manual_seed(seq))
    ranges, ts = (t.to(device=device, dtype=dtype).requires_grad_(grad) for t in params)
    return dict(
        q=randn(batch, heads, seq, head_dim),
        k=randn(batch, heads, seq, head_dim),
        v=randn(batch, heads, seq, head_dim),
        ranges=ranges,
        ts=ts,
        grad_out=randn(batch, seq, heads, head_dim, grad=False),
        batch=batch,
        heads=heads,
    )


def _measure_attention(
    ctx: Context, impl: str, seq: int, head_dim: int, causal: bool, mode: str, matmul: float
) -> dict:
    import torch

    entry = dict(impl=impl, seq=seq, head_dim=head_dim, causal=causal, mode=mode, status="ok")
    if ctx.over_budget():
        return entry | {"status": "skipped", "error": ctx.skipped_for_budget()}
    try:
        inputs = _attention_inputs(ctx, seq, head_dim, grad=mode == "fwd+bwd")
        entry.update(batch=inputs["batch"], heads=inputs["heads"])
        call = _attention_call(ctx, impl, inputs, causal, grad=mode == "fwd+bwd")
        guard = expect_triton(entry) if impl in MULTIMAX_IMPLS else contextlib.nullcontext()
        with guard:
            seconds = time_call(ctx, call, warmup=2 if ctx.cuda else 1)
            entry["peak_mib"] = peak_mib(ctx, call)
        if entry["status"] == "ok":
            flops = attention_flops(inputs["batch"], inputs["heads"], seq, head_dim, causal, mode)
            entry.update(ms=seconds * 1000, tflops=flops / seconds / 1e12)
            entry["of_matmul"] = entry["tflops"] / matmul if matmul else None
    except Skip as why:
        entry.update(status="skipped", error=str(why))
    except torch.OutOfMemoryError as error:
        entry.update(status="failed", error=error_text(error))
    except Exception as error:  # noqa: BLE001 (recorded: FlexAttention's failures are results)
        entry.update(status="failed", error=error_text(error))
    finally:
        inputs = call = None
        cleanup(ctx)
    return entry


def run_attention(ctx: Context) -> dict:
    import torch
    from common import sgemm_gflops

    if ctx.cuda:  # FlexAttention compiles once per shape and score_mod: more than Dynamo's default 8 recompilations
        import torch._dynamo

        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    rates = [sgemm_gflops(size=ctx.sizes.matmul_size, repeats=10 if ctx.cuda else 2, device=ctx.device, dtype=dtype)]
    entries = []
    configs = [(seq, d, c) for seq in ctx.sizes.attention_seqs for d in ctx.sizes.head_dims for c in (True, False)]
    flex_configs = [(seq, d, c) for (seq, d, c) in configs if seq in ctx.sizes.flex_seqs]
    plan = [(impl, cfg) for cfg in configs for impl in (*IMPLS[:3], ATOMIC)]
    plan += [(impl, cfg) for impl in IMPLS[3:] for cfg in flex_configs]  # the slow compilations last
    for impl, (seq, head_dim, causal) in plan:
        for mode in ("fwd+bwd",) if impl == ATOMIC else ("fwd", "fwd+bwd"):
            entry = _measure_attention(ctx, impl, seq, head_dim, causal, mode, rates[0] / 1000)
            entries.append(entry)
            shown = f"{entry['ms']:.2f} ms" if "ms" in entry else f"{entry['status']} ({entry.get('error', '')[:80]})"
            print(
                f"  attention {impl:15s} seq {seq:6d} d{head_dim} {'causal' if causal else 'full  '} {mode:7s}: "
                f"{shown}",
                flush=True,
            )
    rates.append(
        sgemm_gflops(size=ctx.sizes.matmul_size, repeats=10 if ctx.cuda else 2, device=ctx.device, dtype=dtype)
    )
    return {
        "dtype": "bfloat16",
        "target_seqs": [s for s in ctx.sizes.attention_seqs if s in (4096, 16384)] or list(ctx.sizes.attention_seqs),
        "matmul_tflops": max(rates) / 1000,
        "matmul": f"{str(dtype).replace('torch.', '')} {ctx.sizes.matmul_size}³ torch.mm, random data, best of the "
        "rates before and after the entries",
        "entries": entries,
        "passed": not [e for e in entries if e["impl"] in MULTIMAX_IMPLS and e["status"] == "failed"],
    }


# ----------------------------------------------------------------------------------------------------------------------
# part 3: end to end


def _llama(ctx: Context, impl: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_multimax

    config = LlamaConfig(**ctx.sizes.llama, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    for seglu in hf_multimax.multimax_modules(model).values():  # trained-looking σ, not the identity it starts as
        ranges, ts = trained_looking_parameters(seglu.order, seglu.num_heads, gen)
        with torch.no_grad():
            seglu.multimax_ranges.copy_(ranges)
            seglu.multimax_ts.copy_(ts)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _guarded(impl: str, entry: dict):
    return expect_triton(entry) if impl == "multimax" else contextlib.nullcontext()


def _train_steps(ctx: Context, impls: tuple[str, ...]) -> list[dict]:
    import torch

    batch, seq = ctx.sizes.train_batch
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, ctx.sizes.llama["vocab_size"], (batch, seq), generator=gen).to(ctx.device)
    models = {impl: _llama(ctx, impl).train() for impl in impls}
    params = {impl: sum(p.numel() for p in model.parameters()) for impl, model in models.items()}
    optimizers = {impl: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=ctx.cuda) for impl, m in models.items()}
    entries = {impl: dict(impl=impl, batch=batch, seq=seq, parameters=params[impl], status="ok") for impl in impls}

    def step(impl: str) -> None:
        loss = models[impl](input_ids=ids, labels=ids).loss
        loss.backward()
        optimizers[impl].step()
        optimizers[impl].zero_grad(set_to_none=True)

    samples: dict[str, list[float]] = {impl: [] for impl in impls}
    for impl in impls:  # warm-up: kernels compiled, optimizer state created
        with _guarded(impl, entries[impl]):
            for _ in range(ctx.sizes.train_warmup):
                step(impl)
    for _ in range(ctx.sizes.train_steps):  # interleaved, medians
        for impl in impls:
            with _guarded(impl, entries[impl]):
                ctx.sync()
                start = time.perf_counter()
                step(impl)
                ctx.sync()
                samples[impl].append(time.perf_counter() - start)
    for impl in impls:
        if ctx.cuda:  # (peak_mib runs nothing on the CPU, and an empty record would fail the guard)
            with _guarded(impl, entries[impl]):
                entries[impl]["peak_mib"] = peak_mib(ctx, lambda impl=impl: step(impl))
        entries[impl]["step_ms"] = statistics.median(samples[impl]) * 1000
        entries[impl]["tokens_per_s"] = batch * seq / (entries[impl]["step_ms"] / 1000)
    models.clear()
    optimizers.clear()
    cleanup(ctx)
    return list(entries.values())


def _generate(ctx: Context, impls: tuple[str, ...]) -> list[dict]:
    import torch

    batch, prompt, new = ctx.sizes.generate
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, ctx.sizes.llama["vocab_size"], (batch, prompt), generator=gen).to(ctx.device)
    attention_mask = torch.ones_like(ids)
    results = []
    for impl in impls:
        model = _llama(ctx, impl).eval()
        for cache in ("dynamic", "static"):
            entry = dict(impl=impl, cache=cache, batch=batch, prompt=prompt, new_tokens=new, status="ok")

            def generate(tokens: int, model=model, cache=cache):
                with torch.no_grad():
                    out = model.generate(
                        ids,
                        attention_mask=attention_mask,
                        max_new_tokens=tokens,
                        min_new_tokens=tokens,
                        do_sample=False,
                        cache_implementation="static" if cache == "static" else None,
                    )
                assert out.shape == (batch, prompt + tokens), out.shape
                return out

            try:
                with _guarded(impl, entry):
                    generate(2)  # warm-up: every kernel variant of prefill and decode compiled
                    prefill = time_call(ctx, lambda: generate(1), warmup=0, reps=ctx.sizes.generate_repeats)
                    with peak_during(ctx) as peak:
                        full = time_call(ctx, lambda: generate(new), warmup=0, reps=ctx.sizes.generate_repeats)
                entry["peak_mib"] = peak["mib"]
                entry.update(
                    prefill_ms=prefill * 1000,
                    total_ms=full * 1000,
                    prefill_tokens_per_s=batch * prompt / prefill,
                    decode_tokens_per_s=batch * (new - 1) / max(full - prefill, 1e-9),
                )
            except Exception as error:  # noqa: BLE001 (recorded; multimax failures fail the part)
                entry.update(status="failed", error=error_text(error))
            results.append(entry)
            print(
                f"  generate {impl:8s} {cache:7s}: {entry.get('decode_tokens_per_s', 0):.0f} decode tokens/s "
                f"{entry.get('error', '')}",
                flush=True,
            )
        del model
        cleanup(ctx)
    return results


def _output_layer(ctx: Context) -> list[dict]:
    import torch
    from torch.nn import functional as F

    from hf_multimax.loss import fused_linear_seglu_cross_entropy, unfused_linear_seglu_cross_entropy

    tokens, hidden_size, vocab = ctx.sizes.output_layer
    gen = torch.Generator().manual_seed(4)
    device, dtype = torch.device(ctx.device), torch.bfloat16
    hidden = (torch.randn(tokens, hidden_size, generator=gen)).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * hidden_size**-0.5).to(device=device, dtype=dtype)
    weight.requires_grad_()
    ranges, ts = (t.to(device=device, dtype=dtype).requires_grad_() for t in trained_looking_parameters(2, None, gen))
    labels = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "plain CE": lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels),
        "σ + CE, materialised": lambda: unfused_linear_seglu_cross_entropy(hidden, weight, None, ranges, ts, labels),
    }
    for chunk in ctx.sizes.output_chunks:
        rows = chunk or max(1, (1 << 22) // vocab)
        variants[f"σ + CE, chunked ({rows} rows{', default' if chunk is None else ''})"] = lambda chunk=chunk: (
            fused_linear_seglu_cross_entropy(hidden, weight, None, ranges, ts, labels, chunk_size=chunk)
        )
    results = []
    for name, loss_fn in variants.items():
        leaves = [hidden, weight] if name == "plain CE" else [hidden, weight, ranges, ts]
        entry = dict(impl=name, tokens=tokens, hidden=hidden_size, vocab=vocab, status="ok")
        try:
            call = lambda loss_fn=loss_fn, leaves=leaves: torch.autograd.grad(loss_fn(), leaves)  # noqa: E731
            entry["ms"] = time_call(ctx, call, warmup=1, reps=max(1, min(5, ctx.sizes.max_reps))) * 1000
            entry["peak_mib"] = peak_mib(ctx, call)
        except Exception as error:  # noqa: BLE001 (recorded)
            entry.update(status="failed", error=error_text(error))
        results.append(entry)
        cleanup(ctx)
    return results


@contextlib.contextmanager
def _models_ask_for(backend: str | None) -> Iterator[None]:
    """The models' attention calls name no backend: ``$HF_MULTIMAX_BACKEND`` decides for them (the dry run's
    ``"triton"``; ``None`` leaves the automatic choice)."""
    previous = os.environ.get("HF_MULTIMAX_BACKEND")
    if backend is not None:
        os.environ["HF_MULTIMAX_BACKEND"] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_MULTIMAX_BACKEND", None)
        else:
            os.environ["HF_MULTIMAX_BACKEND"] = previous


def run_end_to_end(ctx: Context) -> dict:
    import torch

    impls = ("sdpa", "multimax")
    result: dict = {"model": dict(ctx.sizes.llama), "dtype": "bfloat16"}
    sections = (
        ("train", _train_steps, (ctx, impls)),
        ("generate", _generate, (ctx, impls)),
        ("output_layer", _output_layer, (ctx,)),
    )
    for name, fn, args in sections:
        if ctx.over_budget():
            result[name] = {"status": "skipped", "error": ctx.skipped_for_budget()}
            continue
        try:
            with _models_ask_for(ctx.multimax_backend):
                result[name] = fn(*args)
        except torch.OutOfMemoryError as error:
            result[name] = {"status": "failed", "error": error_text(error)}
        except Exception as error:  # noqa: BLE001 (a section's failure does not lose the others)
            result[name] = {"status": "failed", "error": error_text(error), "traceback": traceback.format_exc()[-2000:]}
        cleanup(ctx)
        print(f"  end_to_end {name}: done", flush=True)
    failed = []
    for name in ("train", "generate"):
        value = result.get(name)
        if isinstance(value, dict):
            failed.append(value.get("status") == "failed")
        else:
            failed.extend(e["impl"] == "multimax" and e["status"] == "failed" for e in value)
    result["passed"] = not any(failed)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# part 4: the GPU test files


def _pytest_runs(ctx: Context) -> list[tuple[str, list[str]]]:
    import importlib.util

    import torch

    if ctx.dry_run:  # the same command line, two quick tests of the interpreter
        return [
            (
                "triton kernel (dry run: two tests)",
                ["tests/unit/test_triton_kernel.py", "-k", "real_self_test or shared_table"],
            )
        ]
    parallel = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    runs = [
        ("triton kernel, compiled", ["tests/unit/test_triton_kernel.py", *parallel]),
        ("CUDA tests of test_kernels", ["tests/unit/test_kernels.py", "-k", "cuda"]),
    ]
    if torch.cuda.device_count() > 1:
        runs.append(("FSDP on GPUs", ["tests/distributed/test_distributed.py", "-k", "gpus"]))
    return runs


def _junit_summary(path: Path) -> dict:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failing = []
    for case in suite.iter("testcase"):
        for problem in list(case.findall("failure")) + list(case.findall("error")):
            message = " ".join((problem.get("message") or "").split())[:300]
            failing.append(f"{case.get('classname')}::{case.get('name')}: {message}")
    return counts | {"seconds": float(suite.get("time", 0.0)), "failing": failing}


def run_tests(ctx: Context) -> dict:
    import importlib.util

    import torch

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HF_MULTIMAX_BACKEND")}
    results = []
    for name, args in _pytest_runs(ctx):
        remaining = ctx.budget_s - (time.perf_counter() - ctx.started)
        entry: dict = {"name": name, "args": args}
        if remaining < 30:
            results.append(entry | {"status": "skipped", "error": ctx.skipped_for_budget()})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            junit = Path(tmp) / "junit.xml"
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
            if importlib.util.find_spec("pytest_timeout"):
                command.append("--timeout=300")
            try:
                done = subprocess.run(
                    command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=remaining, check=False
                )
                entry.update(returncode=done.returncode, output_tail=(done.stdout + done.stderr)[-3000:])
                if junit.exists():
                    entry.update(_junit_summary(junit))
                entry["status"] = "ok" if done.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                entry.update(status="failed", error=f"did not finish in the part's remaining {remaining:.0f} s")
        results.append(entry)
        print(
            f"  tests {name}: {entry['status']} ({entry.get('tests', '?')} tests, {entry.get('failures', '?')} "
            f"failures, {entry.get('errors', '?')} errors)",
            flush=True,
        )
    skipped_fsdp = None if torch.cuda.device_count() > 1 else "one GPU: the FSDP tests need more than one"
    return {"runs": results, "fsdp": skipped_fsdp, "passed": all(r["status"] != "failed" for r in results)}


# ----------------------------------------------------------------------------------------------------------------------
# environment and command line


def environment(ctx: Context) -> dict:
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from hf_multimax.kernels import triton_kernel

    env = {
        "dry_run": ctx.dry_run,
        "device": ctx.device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "triton_status": triton_kernel.triton_status(ctx.device)[1],
        "cpu_count": os.cpu_count(),
    }
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            gpus=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="parts, in this order: correctness, attention, end_to_end, tests (each <= --budget s; the module\n"
        "docstring says what each measures and how long it takes on an H200)\n\n"
        "examples:\n" + __doc__[__doc__.index("    bash benchmarks/gpu_check.sh") : __doc__.index("\n\nWrites")],
    )
    parser.add_argument(
        "--part",
        nargs="+",
        choices=[*PARTS, "all"],
        default=["all"],
        help="what to run, in this order: correctness attention end_to_end tests (default: all)",
    )
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
        help="folder for gpu_check.{json,md,png} (default $OUT); results of other parts already there are kept",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="on the CPU, tiny sizes, Triton's interpreter (TRITON_INTERPRET=1): checks the script, not the GPU",
    )
    parser.add_argument(
        "--budget", type=float, default=420.0, help="seconds after which a part starts no new work (default 420)"
    )
    parser.add_argument("--workers", type=int, help="processes for the correctness cases (default 8; dry run 1)")
    parser.add_argument("--no-summary", action="store_true", help="do not print the short table at the end")
    parser.add_argument(
        "--report-from",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="run nothing: merge these gpu_check.json files (later ones win per part) and write the report",
    )
    args = parser.parse_args(argv)
    if args.output_dir is None:
        parser.error("--output_dir is required when $OUT is not set")
    if args.budget <= 0:
        parser.error(f"--budget must be > 0, got {args.budget}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.report_from:
        missing = [str(p) for p in args.report_from if not p.is_file()]
        if missing:
            parser.error(f"--report-from: no such file: {', '.join(missing)}")
    args.parts = list(PARTS) if "all" in args.part else [p for p in PARTS if p in args.part]
    return args


RUNNERS = {"correctness": run_correctness, "attention": run_attention, "end_to_end": run_end_to_end, "tests": run_tests}


def main(argv=None) -> int:
    args = parse_args(argv)
    import gpu_report

    if args.report_from:
        data = gpu_report.merge([gpu_report.load(path) for path in args.report_from])
        gpu_report.write(data, args.output_dir)
        print(gpu_report.summary(data))
        return 0 if gpu_report.passed(data) else 1
    if args.dry_run:  # before triton is first imported (hf_multimax.kernels.triton_kernel decorates at import)
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "error: no CUDA device is available to this PyTorch; use --dry-run to check the script on a CPU",
            file=sys.stderr,
        )
        return 2
    sizes = dry_sizes() if args.dry_run else gpu_sizes()
    if args.workers:
        sizes = dataclasses.replace(sizes, workers=args.workers)
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = gpu_report.load(args.output_dir / "gpu_check.json", missing_ok=True)
    if data.get("environment", {}).get("dry_run", args.dry_run) != args.dry_run:
        data = {}  # a dry run's results and a GPU run's are never merged
    data["environment"] = environment(Context(device, sizes, args.dry_run, args.budget))
    data.setdefault("parts", {})
    for part in args.parts:
        ctx = Context(device, sizes, args.dry_run, args.budget)
        print(f"== {part} (budget {args.budget:.0f} s)", flush=True)
        try:
            result = RUNNERS[part](ctx)
        except Exception as error:  # noqa: BLE001 (the other parts and the report still run)
            traceback.print_exc()
            result = {"passed": False, "error": error_text(error), "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - ctx.started, 1)
        data["parts"][part] = result
        gpu_report.write(data, args.output_dir)  # after every part: a later failure or time-out loses nothing
        print(f"== {part}: {'passed' if result['passed'] else 'FAILED'} in {result['seconds']:.0f} s", flush=True)
    if not args.no_summary:
        print(gpu_report.summary(data))
    return 0 if gpu_report.passed(data) else 1


if __name__ == "__main__":
    sys.exit(main())
