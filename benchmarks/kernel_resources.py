"""What the Triton kernels cost a Hopper GPU's multiprocessor, read without a GPU: compile them for sm_90 and report
registers per thread, spilled bytes (stack frame), local-memory instructions, shared memory and tensor-core
instructions (``HGMMA`` is Hopper's wgmma; ``HMMA`` the older mma.sync) for each kernel, head dimension and mask.

How the default tiles (``triton_kernel.TILES_BY_HEAD_DIM``) were chosen, and what to look at before GPU time goes to
a tile: a kernel that spills hundreds of bytes per thread, or whose matrix products are not HGMMA, will be slow
whatever its timing says. Takes about 10 s per kernel per case on 2 CPU cores (compiling is the cost).

    python benchmarks/kernel_resources.py                       # the default tiles -> results/kernel_resources_sm90.*
    python benchmarks/kernel_resources.py --tiles '{"dq": [64, 64, 8, 2]}' --out /tmp/res   # other tiles
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table  # noqa: E402

CASES = ("causal", "full", "bias", "bool_mask", "float_mask")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="head dimensions (default 64 128)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16"], help="default bf16")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=CASES,
        default=["causal", "full"],
        help="causal, full, bias (T5 bias and its gradient), bool_mask / float_mask (padding masks, with dropout)",
    )
    parser.add_argument(
        "--tiles", help="JSON {kernel: [BLOCK_M, BLOCK_N, warps, stages]} (as HF_MULTIMAX_TRITON_TILES)"
    )
    parser.add_argument(
        "--backward",
        choices=["deterministic", "atomic"],
        default="deterministic",
        help="the backward to compile (as HF_MULTIMAX_TRITON_BACKWARD; default deterministic)",
    )
    parser.add_argument("--order", type=int, default=2, help="σ's order (default 2)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90: H100/H200)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the report (default {RESULTS})")
    args = parser.parse_args(argv)
    if not 1 <= args.order <= 4:
        parser.error(f"--order {args.order}: the Triton kernel has orders 1 to 4")
    if any(not 16 <= d <= 256 for d in args.head_dims):
        parser.error(f"--head-dims {args.head_dims}: each between 16 and 256")
    return args


def problem(dtype: torch.dtype, head_dim: int, case: str, order: int):
    from hf_multimax.kernels.problem import AttentionProblem

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 256, head_dim, generator=gen).to(dtype)
    k = torch.randn(1, 4, 256, head_dim, generator=gen).to(dtype)
    bias = torch.randn(1, 4, 256, 256, generator=gen) if case == "bias" else None
    mask = None
    if case in ("bool_mask", "float_mask"):
        mask = (torch.arange(256) >= 17).expand(1, 1, 256, 256)
        if case == "float_mask":
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    ranges = torch.zeros(4, 2 * order)
    return AttentionProblem.build(
        q, k, k, ranges, ranges, scale=head_dim**-0.5, mask=mask, causal=case == "causal", bias=bias,
        dropout_p=0.1 if mask is not None else 0.0, native_dtype=True,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiles:
        os.environ["HF_MULTIMAX_TRITON_TILES"] = args.tiles
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["HF_MULTIMAX_TRITON_BACKWARD"] = args.backward
    import triton

    from hf_multimax.kernels import triton_kernel

    if args.tiles:
        try:
            triton_kernel._env_tiles(args.tiles)
        except ValueError as error:
            print(f"error: --tiles: {error}", file=sys.stderr)
            return 2
    rows, records = [], []
    start = time.perf_counter()
    for name in args.dtypes:
        for head_dim in args.head_dims:
            for case in args.cases:
                p = problem(DTYPES[name], head_dim, case, args.order)
                report = triton_kernel.compile_offline(p, arch=args.arch)
                for kernel, r in report.items():
                    records.append({"dtype": name, "head_dim": head_dim, "case": case, "kernel": kernel, **r})
                    short = kernel.strip("_").removesuffix("_kernel")
                    tiles = "×".join(map(str, r["tiles"]))
                    rows.append(
                        [name, head_dim, case, short, tiles, r["num_warps"], r["num_stages"], r["registers"],
                         r["stack"], r["spill_ops"], f"{r['shared'] / 1024:.0f}", r["wgmma"], r["mma"]]
                    )  # fmt: skip
                    print("  ".join(str(x) for x in rows[-1]), flush=True)
    headers = ["dtype", "head dim", "mask", "kernel", "tiles", "warps", "stages", "registers", "spilled B", "LDL+STL",
               "shared KB", "HGMMA", "HMMA"]  # fmt: skip
    environment = {
        "arch": f"sm_{args.arch}",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "order": args.order,
        "tiles": args.tiles or "TILES_BY_HEAD_DIM",
        "backward": args.backward,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernel_resources_sm{args.arch}{'_atomic' if args.backward == 'atomic' else ''}"
    command = shlex.join(["python", "benchmarks/kernel_resources.py", *(sys.argv[1:] if argv is None else argv)])
    stem.with_suffix(".json").write_text(json.dumps({"environment": environment, "kernels": records}, indent=2) + "\n")
    text = (
        f"# Triton kernels compiled for sm_{args.arch} (no GPU): resources\n\n"
        f"`{command}` — triton {triton.__version__}, torch {torch.__version__}, σ order "
        f"{args.order}, tiles: {environment['tiles']}, {args.backward} backward. "
        "Registers per thread (255 is the cap), bytes of stack frame per "
        "thread (spilled registers), local-memory loads and stores in the machine code, shared memory per program, "
        "and tensor-core instructions (HGMMA: Hopper's wgmma; HMMA: mma.sync). Read off the compiler's output, not "
        "measured on a GPU.\n\n" + markdown_table(headers, [[str(x) for x in row] for row in rows]) + "\n"
    )
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.md/.json in {environment['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
