"""A full Llama training step (forward with labels, backward, AdamW step) with ``sdpa`` vs ``eager`` vs ``multimax``.

A small Llama (hidden 256, 4 layers, 4 heads of 64, SwiGLU 688, vocabulary 4096 so that attention, not the LM head,
is what grows with the length), batch 4, causal LM loss. Step times are medians of interleaved rounds in one
process; the model-level inference forward (no grad) is timed too; peak memory of a step (after a warm-up step has
created the optimizer state) is measured in a fresh process per implementation and length.
Writes ``bench_train_step.md`` / ``.json`` / ``.png`` to ``--out``.

    python benchmarks/bench_train_step.py            # 512, 1024, 2048 tokens per sequence
    python benchmarks/bench_train_step.py --quick    # 512 only, 3 rounds
    python benchmarks/bench_train_step.py --compile --seq 512 1024 --impls sdpa multimax   # torch.compile (Inductor)
    python benchmarks/bench_train_step.py --emulate-avx2 --impls sdpa multimax              # as on an AVX2 CPU

Each length also times one decode step (batch ``--batch``, one new token against a ``--decode-cache``-token KV
cache) unless ``--decode-cache 0``. With ``--compile`` every model is ``torch.compile``'d (Inductor, the default
backend) and timed after its compilation; results go to ``bench_train_step_compile.*``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

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

IMPLEMENTATIONS = ("sdpa", "eager", "multimax")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048], help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--intermediate", type=int, default=688, help="MLP size (default 688)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=list(IMPLEMENTATIONS),
        choices=IMPLEMENTATIONS + ("multimax_eager",),
        help="attention implementations (default: sdpa eager multimax)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--decode-cache",
        type=int,
        default=2048,
        help="KV-cache length of the decode-step timing (default 2048; 0 skips it)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every model (Inductor) and time the compiled steps"
    )
    parser.add_argument("--quick", action="store_true", help="512 tokens only, 3 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    add_isa_argument(parser)
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "SEQ", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_positive(
        parser, args, "seq", "batch", "hidden", "layers", "heads", "intermediate", "vocab", "threads", "repeats"
    )
    if args.decode_cache < 0:
        parser.error(f"--decode-cache must be >= 0, got {args.decode_cache}")
    if args.quick:
        args.seq, args.repeats = [512], 3
    return args


def build(impl: str, seq: int, args: argparse.Namespace):
    """``(model, optimizer, batch)`` for one implementation; the same initial weights for every implementation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_multimax  # noqa: F401

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(*args.seq, args.decode_cache + 1),
        multimax_init="paper",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation=impl)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, seq), generator=torch.Generator().manual_seed(1))
    if args.compile:
        model = torch.compile(model)
    return model, optimizer, {"input_ids": ids, "labels": ids}


def step_fn(model, optimizer, batch):
    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def forward_fn(model, batch):
    def forward():
        with torch.no_grad():
            model(input_ids=batch["input_ids"])

    return forward


def decode_fn(impl: str, args: argparse.Namespace):
    """One greedy decode step (batch ``args.batch``, one token) against a KV cache of ``args.decode_cache`` tokens;
    the cache is cropped back after each step so that every call sees the same length."""
    model, _, _ = build(impl, 8, argparse.Namespace(**{**vars(args), "compile": False}))
    model.eval()
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, args.vocab, (args.batch, args.decode_cache), generator=gen)
    token = torch.randint(0, args.vocab, (args.batch, 1), generator=gen)
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values

    def step():
        with torch.no_grad():
            model(input_ids=token, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to the prompt length

    return step


def child(args: argparse.Namespace) -> None:
    impl, seq, mode = args.child[0], int(args.child[1]), args.child[2]
    torch.set_num_threads(args.threads)
    model, optimizer, batch = build(impl, seq, args)
    run = step_fn(model, optimizer, batch) if mode == "step" else forward_fn(model, batch)
    run()  # warm-up: optimizer state, kernels
    child_report(measure_peak_mb(run))


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_isa(args)
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    env = environment()
    print(env)
    if args.compile:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(64, dynamo.config.cache_size_limit)
    times = {"step": {}, "forward": {}}
    memory = {"step": {}, "forward": {}}
    for seq in args.seq:
        built = {impl: build(impl, seq, args) for impl in args.impls}
        warmup = 2 if args.compile else 1  # compiled: the first call compiles, the second may recompile
        times["step"][seq] = median_times({impl: step_fn(*built[impl]) for impl in args.impls}, args.repeats, warmup)
        times["forward"][seq] = median_times(
            {impl: forward_fn(m, b) for impl, (m, _, b) in built.items()}, args.repeats, warmup
        )
        del built
        for mode in ("step", "forward"):
            memory[mode][seq] = {}
            if args.no_memory or args.compile:
                continue
            for impl in args.impls:
                memory[mode][seq][impl] = peak_in_subprocess(
                    __file__,
                    [impl, str(seq), mode]
                    + [
                        f"--{k.replace('_', '-')}={getattr(args, k)}"
                        for k in (
                            "batch",
                            "hidden",
                            "layers",
                            "heads",
                            "intermediate",
                            "vocab",
                            "threads",
                            "decode_cache",
                        )
                    ]
                    + ["--seq", *map(str, args.seq)],
                )
        print(
            f"seq {seq}: "
            + ", ".join(
                f"{impl} step {times['step'][seq][impl] * 1000:.0f} ms / fwd "
                f"{times['forward'][seq][impl] * 1000:.0f} ms"
                for impl in args.impls
            ),
            flush=True,
        )

    decode = {}
    if args.decode_cache and not args.compile:
        decode = median_times({impl: decode_fn(impl, args) for impl in args.impls}, max(args.repeats, 9) * 3)
        print("decode step: " + ", ".join(f"{i} {t * 1000:.2f} ms" for i, t in decode.items()), flush=True)
    others = [impl for impl in args.impls if impl != "sdpa"]
    sections = [
        f"Llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, MLP {args.intermediate}, vocabulary "
        f"{args.vocab}; batch {args.batch}; float32; AdamW; median of {args.repeats} interleaved rounds"
        + ("; every model `torch.compile`d (Inductor), timed after compilation" if args.compile else "")
        + f".\n\n{env}"
    ]
    for mode, title in (("step", "Training step (forward + backward + AdamW)"), ("forward", "Inference forward")):
        rows = [
            [str(seq)]
            + [fmt(times[mode][seq].get(i)) for i in args.impls]
            + [fmt_ratio(times[mode][seq].get(i), times[mode][seq].get("sdpa")) for i in others]
            for seq in args.seq
        ]
        header = ["tokens"] + args.impls + [f"{i}/sdpa" for i in others]
        sections.append(f"## {title}: time\n\n" + markdown_table(header, rows))
        if not args.no_memory and not args.compile:
            rows = [
                [str(seq)]
                + [fmt(memory[mode][seq].get(i), "MiB") for i in args.impls]
                + [fmt_ratio(memory[mode][seq].get(i), memory[mode][seq].get("sdpa")) for i in others]
                for seq in args.seq
            ]
            sections.append(
                f"## {title}: peak memory above baseline (RSS high-water, fresh process)\n\n"
                + markdown_table(header, rows)
            )
    if decode:
        header = ["KV cache", *args.impls] + [f"{i}/sdpa" for i in others]
        rows = [
            [str(args.decode_cache)]
            + [fmt(decode.get(i)) for i in args.impls]
            + [fmt_ratio(decode.get(i), decode.get("sdpa")) for i in others]
        ]
        sections.append(f"## Decode step (batch {args.batch}, one token, no grad)\n\n" + markdown_table(header, rows))
    limit = 1.10 if args.compile else 1.05
    lines = ["## Targets"]
    for seq in args.seq:
        for mode, what in (("step", "training step time"), ("forward", "inference forward time")):
            t = times[mode][seq]
            if "multimax" in t and t.get("sdpa"):
                r = t["multimax"] / t["sdpa"]
                lines.append(
                    f"- {what} at {seq}, multimax/SDPA: **{r:.3f}** (target ≤ {limit:.2f}) "
                    f"{'met' if r <= limit else 'MISSED'}"
                )
        m = memory["step"].get(seq, {})
        if m.get("multimax") and m.get("sdpa"):
            r = m["multimax"] / m["sdpa"]
            lines.append(
                f"- training step peak memory at {seq}, multimax/SDPA: **{r:.3f}** (target ≤ 1.05) "
                f"{'met' if r <= 1.05 else 'MISSED'}"
            )
    if decode.get("multimax") and decode.get("sdpa"):
        r = decode["multimax"] / decode["sdpa"]
        lines.append(
            f"- decode step against a {args.decode_cache}-token cache, multimax/SDPA: **{r:.3f}** (target "
            f"≤ 1.05) {'met' if r <= 1.05 else 'MISSED'}"
        )
    sections.append("\n".join(lines))
    data = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "environment": env,
        "times": times,
        "memory": memory,
        "decode": decode,
    }
    name = result_name("bench_train_step" + ("_compile" if args.compile else ""), args)
    title = "Training-step benchmark" + (" (torch.compile)" if args.compile else "")
    title += " (AVX2 build and PyTorch at AVX2)" if args.emulate_avx2 else ""
    path = write_report(args.out, name, title, sections, data)
    plot(args, times, memory, args.out / f"{name}.png")
    print(f"wrote {path} and {args.out / (name + '.png')}")


def plot(args, times, memory, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(times["step"], "training step (s)"), (times["forward"], "inference forward (s)")]
    if not args.no_memory and not args.compile:
        panels.append((memory["step"], "training step peak memory (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    width = 0.8 / len(args.impls)
    for ax, (table, label) in zip(axes[0], panels):
        for n, impl in enumerate(args.impls):
            values = [table[seq].get(impl) or 0 for seq in args.seq]
            ax.bar([i + n * width for i in range(len(args.seq))], values, width, label=impl)
        ax.set_xticks([i + width * (len(args.impls) - 1) / 2 for i in range(len(args.seq))], [str(s) for s in args.seq])
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Llama {args.hidden}x{args.layers}, batch {args.batch}, {args.threads} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
