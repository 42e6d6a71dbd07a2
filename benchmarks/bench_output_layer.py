"""Output-layer MultiMax + cross-entropy: fused chunked vs materialised, peak memory and time (forward + backward).

``materialised`` is what a ``multimax_output`` model computes (:func:`unfused_linear_seglu_cross_entropy`: the LM head,
σ on the full (tokens, vocab) float32 logits, cross-entropy); ``fused`` is
:func:`fused_linear_seglu_cross_entropy` (chunks of rows, gradients computed on the fly); ``plain CE`` is the usual
SoftMax head (``F.cross_entropy(F.linear(...))``) for scale. Peak memory: fresh process per implementation.
Writes ``bench_output_layer.md`` / ``.json`` / ``.png`` to ``--out``.

    python benchmarks/bench_output_layer.py            # vocabulary 32000, 1024 tokens, hidden 256
    python benchmarks/bench_output_layer.py --quick    # 3 rounds
    python benchmarks/bench_output_layer.py --emulate-avx2   # as on an AVX2 CPU (_avx2 files)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    add_isa_argument,
    apply_isa,
    check_positive,
    child_report,
    environment,
    fmt,
    fmt_ratio,
    markdown_table,
    measure_peak_mb,
    median_times,
    peak_in_subprocess,
    result_name,
    write_report,
)

IMPLEMENTATIONS = ("materialised", "fused", "plain CE")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="rows (batch × sequence)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--order", type=int, default=2, help="SegLU order (default 2)")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default 2**22 // vocab)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--quick", action="store_true", help="1024 tokens, 3 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    add_isa_argument(parser)
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_positive(parser, args, "tokens", "vocab", "hidden", "order", "chunk_size", "threads", "repeats")
    if args.quick:
        args.tokens, args.repeats = [1024], 3
    return args


def make_case(impl: str, tokens: int, args: argparse.Namespace):
    import hf_multimax  # noqa: F401
    from hf_multimax.loss import fused_linear_seglu_cross_entropy, unfused_linear_seglu_cross_entropy

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, args.hidden, generator=gen).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden**-0.5).requires_grad_()
    ranges = (torch.randn(2 * args.order, generator=gen) * 0.5).requires_grad_()
    ts = (torch.randn(2 * args.order, generator=gen) * 0.1).requires_grad_()
    labels = torch.randint(0, args.vocab, (tokens,), generator=gen)

    def run():
        if impl == "materialised":
            loss = unfused_linear_seglu_cross_entropy(hidden, weight, None, ranges, ts, labels)
        elif impl == "fused":
            loss = fused_linear_seglu_cross_entropy(
                hidden, weight, None, ranges, ts, labels, chunk_size=args.chunk_size
            )
        else:
            loss = F.cross_entropy(F.linear(hidden, weight), labels)
        loss.backward()
        hidden.grad = weight.grad = ranges.grad = ts.grad = None

    return run


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    impl, tokens = args.child[0], int(args.child[1])
    make_case(impl, 16, args)()  # load kernels on a tiny problem
    child_report(measure_peak_mb(make_case(impl, tokens, args)))


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_isa(args)
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    env = environment()
    print(env)
    times, memory = {}, {}
    for tokens in args.tokens:
        times[tokens] = median_times({impl: make_case(impl, tokens, args) for impl in IMPLEMENTATIONS}, args.repeats)
        memory[tokens] = {}
        if not args.no_memory:
            for impl in IMPLEMENTATIONS:
                memory[tokens][impl] = peak_in_subprocess(
                    __file__,
                    [
                        impl,
                        str(tokens),
                        f"--vocab={args.vocab}",
                        f"--hidden={args.hidden}",
                        f"--order={args.order}",
                        f"--threads={args.threads}",
                    ]
                    + (["--emulate-avx2"] if args.emulate_avx2 else [])
                    + ([f"--chunk-size={args.chunk_size}"] if args.chunk_size else []),
                )
        print(
            f"tokens {tokens}: "
            + ", ".join(f"{i} {times[tokens][i] * 1000:.0f} ms / {memory[tokens].get(i)} MiB" for i in IMPLEMENTATIONS),
            flush=True,
        )
    chunk = args.chunk_size or max(1, (1 << 22) // args.vocab)
    sections = [
        f"Vocabulary {args.vocab}, hidden {args.hidden}, SegLU order {args.order}, chunk {chunk} rows, "
        f"float32, forward + backward, median of {args.repeats} interleaved rounds.\n\n{env}"
    ]
    header = ["tokens"] + [f"{i} time" for i in IMPLEMENTATIONS] + [f"{i} peak" for i in IMPLEMENTATIONS]
    header += ["fused/materialised time", "fused/materialised peak", "fused/plain CE time", "fused/plain CE peak"]
    rows = []
    for tokens in args.tokens:
        t, m = times[tokens], memory[tokens]
        rows.append(
            [str(tokens)]
            + [fmt(t[i]) for i in IMPLEMENTATIONS]
            + [fmt(m.get(i), "MiB") for i in IMPLEMENTATIONS]
            + [
                fmt_ratio(t["fused"], t["materialised"]),
                fmt_ratio(m.get("fused"), m.get("materialised")),
                fmt_ratio(t["fused"], t["plain CE"]),
                fmt_ratio(m.get("fused"), m.get("plain CE")),
            ]
        )
    sections.append("## Forward + backward\n\n" + markdown_table(header, rows))
    lines = ["## Targets"]
    for tokens in args.tokens:
        t, m = times[tokens], memory[tokens]
        checks = [(f"time at {tokens} tokens, fused / plain SoftMax CE", t["fused"] / t["plain CE"], 1.15)]
        if m.get("fused") and m.get("plain CE"):
            checks.append(
                (f"peak memory at {tokens} tokens, fused / plain SoftMax CE", m["fused"] / m["plain CE"], 0.10)
            )
        for what, r, limit in checks:
            lines.append(f"- {what}: **{r:.3f}** (target ≤ {limit:.2f}) {'met' if r <= limit else 'MISSED'}")
    sections.append("\n".join(lines))
    data = {"args": {k: str(v) for k, v in vars(args).items()}, "environment": env, "times": times, "memory": memory}
    name = result_name("bench_output_layer", args)
    title = "Output-layer MultiMax + cross-entropy benchmark" + (" (AVX2)" if args.emulate_avx2 else "")
    path = write_report(args.out, name, title, sections, data)
    plot(args, times, memory, args.out / f"{name}.png")
    print(f"wrote {path} and {args.out / (name + '.png')}")


def plot(args, times, memory, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(times, "forward + backward (s)")] + ([] if args.no_memory else [(memory, "peak memory (MiB)")])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    width = 0.8 / len(IMPLEMENTATIONS)
    for ax, (table, label) in zip(axes[0], panels):
        for n, impl in enumerate(IMPLEMENTATIONS):
            ax.bar(
                [i + n * width for i in range(len(args.tokens))],
                [table[t].get(impl) or 0 for t in args.tokens],
                width,
                label=impl,
            )
        ax.set_xticks([i + width for i in range(len(args.tokens))], [str(t) for t in args.tokens])
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Output-layer MultiMax + CE, vocabulary {args.vocab}, hidden {args.hidden}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
