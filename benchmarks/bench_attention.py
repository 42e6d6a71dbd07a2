"""Attention alone: fused MultiMax vs SDPA vs eager SoftMax vs the MultiMax reference, forward and forward+backward.

Every implementation is the function Transformers calls for its ``attn_implementation`` (``sdpa``, ``eager`` (Llama's
eager function with the float causal mask Transformers builds for it), ``multimax`` (fused), ``multimax_eager``
(reference)), on the same causal inputs, timed round-robin in one process (medians); peak memory is measured in a
fresh process per implementation and size. Writes ``bench_attention.md`` / ``.json`` / ``.png`` to ``--out``.

    python benchmarks/bench_attention.py            # seq 256..4096, batch 4, 4 heads, head_dim 64, 2 threads
    python benchmarks/bench_attention.py --quick    # seq 256 and 1024, fewer repeats
    python benchmarks/bench_attention.py --emulate-avx2 --impls sdpa multimax   # as on an AVX2 CPU (_avx2 files)
    python benchmarks/bench_attention.py --device cuda --dtype bfloat16 --seq 1024 4096   # on a GPU (_cuda files)

On CUDA every timed call ends with ``torch.cuda.synchronize()`` and peak memory is ``torch.cuda.max_memory_allocated``
above what was allocated before the call, in the same process. Every ``multimax`` call is checked to have run on the
kernel the table claims (Triton on CUDA, the fused C++ kernel on the CPU where it builds): otherwise the script exits
with an error instead of reporting a fallback's times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    add_isa_argument,
    apply_isa,
    check_positive,
    child_report,
    environment,
    expected_backend,
    fmt,
    fmt_ratio,
    markdown_table,
    measure_peak_mb,
    median_times,
    on_backend,
    peak_in_subprocess,
    result_name,
    sgemm_gflops,
    write_report,
)

IMPLEMENTATIONS = ("sdpa", "eager", "multimax", "multimax_eager")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default cpu)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of queries, keys, values and MultiMax parameters (default float32)",
    )
    parser.add_argument("--order", type=int, default=2, help="SegLU order of MultiMax (default 2, the paper's)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per size (median reported)")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=list(IMPLEMENTATIONS),
        choices=IMPLEMENTATIONS,
        help="implementations to compare (default: all)",
    )
    parser.add_argument("--max-eager-seq", type=int, default=4096, help="skip eager SoftMax above this length")
    parser.add_argument(
        "--max-reference-seq",
        type=int,
        default=2048,
        help="skip multimax_eager (reference) above this length (it needs ~8 GB at 4096)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--profile-seq",
        type=int,
        default=1024,
        help="length of the profile section (where the time of multimax goes); 0 to skip",
    )
    parser.add_argument("--quick", action="store_true", help="seq 256 and 1024, 3 repeats")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    add_isa_argument(parser)
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "SEQ", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_positive(parser, args, "seq", "batch", "heads", "head_dim", "threads", "order", "repeats")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this PyTorch")
    if args.device == "cuda" and args.emulate_avx2:
        parser.error("--emulate-avx2 is a CPU switch; it does not combine with --device cuda")
    if args.quick:
        args.seq, args.repeats = [256, 1024], 3
    return args


def attention_module(args: argparse.Namespace) -> nn.Module:
    import hf_multimax  # noqa: F401  (registers the MultiMax implementations)
    from hf_multimax.modeling import SegLU

    module = nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 1
    module.multimax = SegLU(args.order, None, "paper")
    module.train()
    return module


def make_case(impl: str, seq: int, args: argparse.Namespace, grad: bool):
    """``run()`` for one implementation: forward (no grad) or forward + backward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from hf_multimax.attention import multimax_attention_forward, multimax_eager_attention_forward

    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, seq, args.head_dim)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    q, k, v = (randn(shape).requires_grad_(grad) for _ in range(3))
    grad_out = randn(args.batch, seq, args.heads, args.head_dim)
    module = attention_module(args).to(device=device, dtype=dtype)
    if not grad:
        module.multimax.requires_grad_(False)
    mask = None
    if impl == "eager":  # what Transformers builds for eager: a float (batch, 1, q, k) causal mask
        mask = torch.full((seq, seq), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)
        mask = mask.expand(args.batch, 1, seq, seq)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    function = {
        "sdpa": sdpa_attention_forward,
        "eager": eager_attention_forward,
        "multimax": multimax_attention_forward,
        "multimax_eager": multimax_eager_attention_forward,
    }[impl]
    scaling = args.head_dim**-0.5

    def run():
        if grad:
            out, _ = function(module, q, k, v, mask, scaling=scaling, dropout=0.0)
            out.backward(grad_out)
        else:
            with torch.no_grad():
                function(module, q, k, v, mask, scaling=scaling, dropout=0.0)
        sync()

    if impl == "multimax":  # the fused kernel, or the benchmark fails: a fallback's times are not the kernel's
        return on_backend(run, expected_backend(args.device, args.order), f"multimax on {args.device}")
    return run


def cuda_peak_mb(run) -> float:
    """Peak CUDA memory (MiB) one call allocates above what is allocated before it."""
    run()  # warm-up: kernels compiled, caches filled
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def skipped(impl: str, seq: int, args: argparse.Namespace) -> bool:
    return (impl == "eager" and seq > args.max_eager_seq) or (impl == "multimax_eager" and seq > args.max_reference_seq)


def child(args: argparse.Namespace) -> None:
    impl, seq, mode = args.child[0], int(args.child[1]), args.child[2]
    torch.set_num_threads(args.threads)
    run = make_case(impl, seq, args, grad=mode == "fwd+bwd")
    run_small = make_case(impl, 64, args, grad=mode == "fwd+bwd")
    run_small()  # load kernels, warm allocator paths, on a tiny problem
    child_report(measure_peak_mb(run))


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_isa(args)
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    env = environment()
    if args.device == "cuda":
        env += f"; GPU: {torch.cuda.get_device_name()}, dtype {args.dtype}"
    gflops = sgemm_gflops(device=args.device, dtype=getattr(torch, args.dtype))
    print(f"torch.mm {args.dtype} 2048x2048 on {args.device}: {gflops:.1f} GFLOP/s")
    print(env)
    impls = args.impls
    times: dict[str, dict[int, dict[str, float]]] = {"fwd+bwd": {}, "fwd": {}}
    memory: dict[str, dict[int, dict[str, float | None]]] = {"fwd+bwd": {}, "fwd": {}}
    for seq in args.seq:
        for mode in ("fwd+bwd", "fwd"):
            active = [impl for impl in impls if not skipped(impl, seq, args)]
            repeats = args.repeats
            cases = {impl: make_case(impl, seq, args, grad=mode == "fwd+bwd") for impl in active}
            times[mode][seq] = median_times(cases, repeats)
            del cases
            memory[mode][seq] = {}
            if not args.no_memory and args.device == "cuda":
                for impl in active:
                    memory[mode][seq][impl] = cuda_peak_mb(make_case(impl, seq, args, grad=mode == "fwd+bwd"))
            elif not args.no_memory:
                for impl in active:
                    memory[mode][seq][impl] = peak_in_subprocess(
                        __file__,
                        [
                            impl,
                            str(seq),
                            mode,
                            "--batch",
                            str(args.batch),
                            "--heads",
                            str(args.heads),
                            "--head-dim",
                            str(args.head_dim),
                            "--threads",
                            str(args.threads),
                            "--order",
                            str(args.order),
                            "--dtype",
                            args.dtype,
                        ]
                        + (["--emulate-avx2"] if args.emulate_avx2 else []),
                    )
            line = ", ".join(f"{impl} {times[mode][seq][impl] * 1000:.1f} ms" for impl in active)
            print(f"seq {seq:5d} {mode:8s}: {line}", flush=True)

    sections = [
        f"Batch {args.batch}, {args.heads} heads, head_dim {args.head_dim}, causal, {args.dtype} on {args.device}, "
        f"MultiMax order "
        f"{args.order}, median of {args.repeats} interleaved rounds.\n\n{env}",
    ]
    for mode in ("fwd+bwd", "fwd"):
        header = ["seq"] + [f"{impl}" for impl in impls] + [f"{impl}/sdpa" for impl in impls if impl != "sdpa"]
        rows = []
        for seq in args.seq:
            t = times[mode][seq]
            rows.append(
                [str(seq)]
                + [fmt(t.get(impl)) for impl in impls]
                + [fmt_ratio(t.get(impl), t.get("sdpa")) for impl in impls if impl != "sdpa"]
            )
        sections.append(
            f"## Time, {'forward + backward' if mode == 'fwd+bwd' else 'forward (inference, no grad)'}\n\n"
            + markdown_table(header, rows)
        )
    if not args.no_memory:
        for mode in ("fwd+bwd", "fwd"):
            header = ["seq"] + list(impls) + [f"{impl}/sdpa" for impl in impls if impl != "sdpa"]
            rows = []
            for seq in args.seq:
                m = memory[mode][seq]
                rows.append(
                    [str(seq)]
                    + [fmt(m.get(impl), "MiB") for impl in impls]
                    + [fmt_ratio(m.get(impl), m.get("sdpa")) for impl in impls if impl != "sdpa"]
                )
            sections.append(
                f"## Peak memory above baseline (RSS high-water, fresh process), {mode}\n\n"
                + markdown_table(header, rows)
            )
    # The rate of a shared machine drifts: the bound uses the best of the rates measured before and after the runs.
    gflops = max(gflops, sgemm_gflops(device=args.device, dtype=getattr(torch, args.dtype)))
    sections.append(bound_section(args, times, gflops))
    sections.append(targets(args, times, memory, gflops))
    if args.profile_seq:
        sections.append(profile_section(args, args.profile_seq))
    data = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "environment": env,
        "sgemm_gflops": gflops,
        "times": times,
        "memory": memory,
    }
    name = result_name("bench_attention" + ("_cuda" if args.device == "cuda" else ""), args)
    title = "Attention benchmark" + (" (AVX2 build and PyTorch at AVX2)" if args.emulate_avx2 else "")
    path = write_report(args.out, name, title, sections, data)
    plot(args, times, memory, args.out / f"{name}.png")
    print(f"wrote {path} and {args.out / (name + '.png')}")


def attention_flops(args: argparse.Namespace, seq: int, mode: str) -> float:
    """Matrix-product FLOPs of causal attention: QKᵀ and PV forward (2 products); the backward recomputes QKᵀ and
    forms dV, dP, dQ, dK (5 more). Each product costs 2·pairs·d with pairs = L(L+1)/2 under causality."""
    pairs = seq * (seq + 1) / 2
    products = 2 if mode == "fwd" else 7
    return products * 2 * pairs * args.head_dim * args.batch * args.heads


def bound_section(args: argparse.Namespace, times, gflops: float) -> str:
    header = ["seq", "mode", "GFLOP", "sgemm-bound time", "multimax", "multimax / bound", "sdpa / bound"]
    rows = []
    for mode in ("fwd+bwd", "fwd"):
        for seq in args.seq:
            flops = attention_flops(args, seq, mode)
            bound = flops / (gflops * 1e9)
            t = times[mode][seq]
            rows.append(
                [
                    str(seq),
                    mode,
                    f"{flops / 1e9:.2f}",
                    fmt(bound),
                    fmt(t.get("multimax")),
                    fmt_ratio(t.get("multimax"), bound),
                    fmt_ratio(t.get("sdpa"), bound),
                ]
            )
    return (
        f"## Against the sgemm bound\n\nThe time the matrix products alone would take at the `torch.mm` rate "
        f"measured in this process (the best of before and after the runs: {gflops:.1f} GFLOP/s, {args.dtype} "
        f"2048×2048 on {args.device}"
        + (f", {args.threads} threads" if args.device == "cpu" else "")
        + ").\n\n"
        + markdown_table(header, rows)
    )


def targets(args, times, memory, gflops: float) -> str:
    lines = ["## Targets"]

    def ratio(table, mode, seq):
        t = table[mode].get(seq, {})
        if t.get("multimax") is None or not t.get("sdpa"):
            return None
        return t["multimax"] / t["sdpa"]

    checks = [(f"fwd+bwd time at {seq}, multimax/SDPA", ratio(times, "fwd+bwd", seq), 1.00) for seq in args.seq]
    checks += [
        (f"forward (inference) time at {seq}, multimax/SDPA", ratio(times, "fwd", seq), 1.00) for seq in args.seq
    ]
    if times["fwd+bwd"].get(1024, {}).get("multimax"):
        bound = attention_flops(args, 1024, "fwd+bwd") / (gflops * 1e9)
        checks.append(("fwd+bwd time at 1024, multimax / sgemm bound", times["fwd+bwd"][1024]["multimax"] / bound, 1.5))
    if not args.no_memory:
        checks += [
            (f"peak memory fwd+bwd at {seq}, multimax/SDPA", ratio(memory, "fwd+bwd", seq), 1.10)
            for seq in args.seq
            if seq >= 2048
        ]
    for name, value, limit in checks:
        if value is not None:
            lines.append(f"- {name}: **{value:.3f}** (target ≤ {limit:.2f}) {'met' if value <= limit else 'MISSED'}")
    return "\n".join(lines)


def profile_section(args: argparse.Namespace, seq: int) -> str:
    """Where the fused path's time goes at one length: forward vs backward against SDPA, the cost of σ's order
    (order 1..3 against SDPA), and the PyTorch operators around the kernel (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    rounds = max(3, args.repeats)
    orders = {}
    for order in (1, 2, 3):
        order_args = argparse.Namespace(**{**vars(args), "order": order})
        orders[f"multimax order {order}"] = make_case("multimax", seq, order_args, grad=True)
    cases = {"sdpa": make_case("sdpa", seq, args, grad=True), **orders}
    fwd_bwd = median_times(cases, rounds)
    fwd = median_times(
        {"sdpa": make_case("sdpa", seq, args, grad=False), "multimax": make_case("multimax", seq, args, grad=False)},
        rounds,
    )
    rows = [["sdpa", fmt(fwd["sdpa"]), fmt(fwd_bwd["sdpa"] - fwd["sdpa"]), fmt(fwd_bwd["sdpa"]), "1.00"]]
    for name in orders:
        note = name == f"multimax order {args.order}"
        rows.append(
            [
                name,
                fmt(fwd["multimax"]) if note else "",
                fmt(fwd_bwd[name] - fwd["multimax"]) if note else "",
                fmt(fwd_bwd[name]),
                fmt_ratio(fwd_bwd[name], fwd_bwd["sdpa"]),
            ]
        )
    table = markdown_table(["implementation", "forward", "backward (fwd+bwd − fwd)", "fwd+bwd", "fwd+bwd / sdpa"], rows)
    run = make_case("multimax", seq, args, grad=True)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            run()
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48)
    return (
        f"## Profile at {seq} (causal, fwd+bwd)\n\n{table}\n\nThe C++ kernel calls appear as "
        "`hf_multimax::attention` (forward) and `hf_multimax::attention_backward` (backward); every other "
        "row is PyTorch work around them (gradient accumulation into .grad, buffers, casts), three iterations:\n\n"
        f"```\n{ops}\n```"
    )


def plot(args, times, memory, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fwd+bwd", times, "forward + backward time (s)"), ("fwd", times, "forward time (s)")]
    if not args.no_memory:
        panels.append(("fwd+bwd", memory, "peak memory fwd+bwd (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    for ax, (mode, table, label) in zip(axes, panels):
        for impl in args.impls:
            points = [(seq, table[mode][seq].get(impl)) for seq in args.seq]
            points = [(s, v) for s, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"Causal attention, batch {args.batch}, {args.heads} heads, head_dim {args.head_dim}, {args.threads} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
