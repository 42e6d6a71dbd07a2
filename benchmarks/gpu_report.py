"""The report of ``gpu_check.py``: ``gpu_check.json`` (every number), ``gpu_check.md`` (tables and the issue's
targets), ``gpu_check.png`` and the short table printed last. Works from the JSON alone, so that parts run by separate
commands (or on separate days) can be merged into one report (``gpu_check.py --report-from``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from common import markdown_table

NAME = "gpu_check"
IMPL_LABELS = {
    "multimax": "multimax (Triton)",
    "multimax_atomic": "multimax, atomic bwd",
    "sdpa_flash": "SDPA flash",
    "sdpa_cudnn": "SDPA cuDNN",
    "flex_multimax": "Flex + σ",
    "flex_softmax": "Flex SoftMax",
}
#: The issue's targets (H200, bf16, medians): attention time and memory ratios, end to end, gradient accuracy.
LIMITS = {
    "fwd+bwd": 1.15,  # multimax / SDPA flash, at 4k and 16k, causal and not
    "fwd": 1.10,
    "flex": 0.85,  # multimax / FlexAttention with the same σ, wherever that runs
    "memory": 1.05,  # peak memory multimax / SDPA flash
    "train": 1.05,  # training step of the 1B model, multimax / sdpa
    "decode": 0.90,  # decode throughput multimax / sdpa, at least
    "param_grads": 1e-2,  # ranges/ts gradients in bf16, relative to float64
}


# ----------------------------------------------------------------------------------------------------------------------
# JSON


def load(path: Path, missing_ok: bool = False) -> dict:
    """A ``gpu_check.json``; ``{}`` when it does not exist and ``missing_ok``."""
    if missing_ok and not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("parts"), dict):
        raise ValueError(f"{path} is not a gpu_check.json (no 'parts')")
    return data


def merge(reports: list[dict]) -> dict:
    """One report from several: each part from the last report that has it; the environment of the last one (those
    of the others are kept under ``environments``)."""
    merged: dict = {"parts": {}, "environments": []}
    for report in reports:
        merged["parts"].update(report.get("parts", {}))
        if report.get("environment"):
            merged["environment"] = report["environment"]
            merged["environments"].append(report["environment"])
    return merged


def passed(data: dict) -> bool:
    return all(part.get("passed", False) for part in data.get("parts", {}).values())


def write(data: dict, out_dir: Path) -> None:
    """``gpu_check.json``, ``gpu_check.md`` and ``gpu_check.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data["targets"] = targets(data)
    (out_dir / f"{NAME}.json").write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    (out_dir / f"{NAME}.md").write_text(markdown(data), encoding="utf-8")
    plot(data, out_dir / f"{NAME}.png")


# ----------------------------------------------------------------------------------------------------------------------
# targets


def _entry(entries: list[dict], **key) -> dict | None:
    for entry in entries:
        if all(entry.get(k) == v for k, v in key.items()) and entry.get("status") == "ok":
            return entry
    return None


def _ratio(a: dict | None, b: dict | None, field: str) -> float | None:
    if a is None or b is None or a.get(field) is None or not b.get(field):
        return None
    return a[field] / b[field]


def targets(data: dict) -> list[dict]:
    """``[{"name", "value", "limit", "met"}]`` for every target the parts present can say something about; ``value``
    is ``None`` where a side of the comparison did not run."""
    found = []

    def add(name: str, value: float | None, limit: float, at_least: bool = False) -> None:
        met = None if value is None else (value >= limit if at_least else value <= limit)
        found.append({"name": name, "value": value, "limit": limit, "at_least": at_least, "met": met})

    parts = data.get("parts", {})
    attention = parts.get("attention", {})
    entries = attention.get("entries", [])
    for seq in attention.get("target_seqs", []):
        for head_dim in sorted({e["head_dim"] for e in entries}):
            for causal in (True, False):
                where = f"{seq} tokens, d{head_dim}, {'causal' if causal else 'non-causal'}"
                key = dict(seq=seq, head_dim=head_dim, causal=causal)
                for mode in ("fwd+bwd", "fwd"):
                    mm = _entry(entries, impl="multimax", mode=mode, **key)
                    add(
                        f"attention {mode}, {where}: multimax / SDPA flash",
                        _ratio(mm, _entry(entries, impl="sdpa_flash", mode=mode, **key), "ms"),
                        LIMITS[mode],
                    )
                    flex = _entry(entries, impl="flex_multimax", mode=mode, **key)
                    if flex is not None:
                        add(f"attention {mode}, {where}: multimax / Flex + σ", _ratio(mm, flex, "ms"), LIMITS["flex"])
                mm = _entry(entries, impl="multimax", mode="fwd+bwd", **key)
                flash = _entry(entries, impl="sdpa_flash", mode="fwd+bwd", **key)
                atomic = _entry(entries, impl="multimax_atomic", mode="fwd+bwd", **key)
                if atomic is not None:  # the opt-in backward, against the same limit (the default must meet it)
                    add(
                        f"attention fwd+bwd, {where}: multimax with the atomic backward (opt-in) / SDPA flash",
                        _ratio(atomic, flash, "ms"),
                        LIMITS["fwd+bwd"],
                    )
                if mm is not None and mm.get("peak_mib") is not None:
                    add(
                        f"peak memory fwd+bwd, {where}: multimax / SDPA flash",
                        _ratio(mm, flash, "peak_mib"),
                        LIMITS["memory"],
                    )
    e2e = parts.get("end_to_end", {})
    train = e2e.get("train")
    if isinstance(train, list):
        add(
            "training step, multimax / sdpa",
            _ratio(_entry(train, impl="multimax"), _entry(train, impl="sdpa"), "step_ms"),
            LIMITS["train"],
        )
    generate = e2e.get("generate")
    if isinstance(generate, list):
        for cache in ("dynamic", "static"):
            add(
                f"decode throughput ({cache} cache), multimax / sdpa",
                _ratio(
                    _entry(generate, impl="multimax", cache=cache),
                    _entry(generate, impl="sdpa", cache=cache),
                    "decode_tokens_per_s",
                ),
                LIMITS["decode"],
                at_least=True,
            )
    cases = [c for c in parts.get("correctness", {}).get("cases", []) if c.get("dtype") == "bfloat16" and "errors" in c]
    if cases:
        worst = max(c["errors"][name]["rel"] for c in cases for name in ("d_ranges", "d_ts"))
        add("ranges/ts gradients in bf16, worst ‖x − ref‖/‖ref‖ against float64", worst, LIMITS["param_grads"])
    return found


# ----------------------------------------------------------------------------------------------------------------------
# Markdown


def _f(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


def _environment_line(env: dict) -> str:
    if not env:
        return ""
    where = f"{env.get('gpu', 'CPU')}" + (
        f" (sm_{env['capability'].replace('.', '')}, {env.get('multiprocessors')} SMs, {env.get('memory_gib')} GiB)"
        if env.get("gpu")
        else ""
    )
    line = (
        f"{where}; torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}"
        + (f", CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}" if env.get("cuda") else "")
        + f"; Python {env.get('python')}; Triton kernel: {env.get('triton_status')}."
    )
    if env.get("dry_run"):
        line = (
            "**Dry run** on the CPU with Triton's interpreter at tiny sizes: these numbers check the script, they "
            f"measure nothing. {line}"
        )
    return line


def _correctness_section(part: dict) -> str:
    names = ("output", "dq", "dk", "dv", "d_ranges", "d_ts", "d_bias")
    header = ["case", "backward", "dtype", "d", "B×H(kv)×Lq×Lk", *names, "eager out", "same twice", "masked rows 0"]
    header += ["ran on", "ok"]
    rows = []
    for case in part.get("cases", []):
        errors = case.get("errors", {})
        shape = f"{case['batch']}×{case['heads']}({case['kv_heads']})×{case['q_len']}×{case['kv_len']}"
        if not errors:
            rows.append(
                [case["kind"], case.get("backward", "deterministic"), case["dtype"], str(case["head_dim"]), shape]
                + [case.get("error", "")[:120]]
                + [""] * (len(header) - 6)
            )
            continue
        rows.append(
            [case["kind"], case.get("backward", "deterministic"), case["dtype"], str(case["head_dim"]), shape]
            + [_f(errors[n]["rel"], ".1e") if n in errors else "–" for n in names]
            + [
                _f(errors["output"].get("eager_rel"), ".1e"),
                "yes" if case.get("deterministic") else ("no" if case.get("backward") == "atomic" else "NO"),
                {None: "–", True: "yes", False: "NO"}[case.get("masked_rows_zero")],
                ",".join(case.get("backends", [])),
                "ok" if case.get("passed") else "**FAILED**",
            ]
        )
    bands = ", ".join(f"{k} {v:.0e}" for k, v in {"float32": 1e-4, "float16": 5e-3, "bfloat16": 1e-2}.items())
    return (
        "## Correctness on the hardware\n\n‖x − ref‖/‖ref‖ of the Triton kernel's output and gradients against the "
        "float64 reference on the same (rounded) values; bands: " + bands + ". 'eager out': the eager reference run "
        "in the case's dtype, for scale. Dropout cases are compared with the blocked path in float64 with the same "
        "seed. 'atomic': the opt-in one-kernel backward, whose runs may differ in the last bits ('same twice' is "
        f"not required of it). {part.get('workers', '?')} worker processes.\n\n" + markdown_table(header, rows)
    )


def _attention_section(part: dict) -> str:
    entries = part.get("entries", [])
    matmul = part.get("matmul_tflops")
    lines = [
        "## Attention speed and memory",
        f"bfloat16, medians of CUDA-event timings; batch × heads fill the chip; TFLOP/s by FlashAttention's count "
        f"(causal: half); the matrix-product rate measured in this run: {_f(matmul, '.3g')} TFLOP/s "
        f"({part.get('matmul', '')}). Peak memory: above the inputs, one call.",
    ]
    impls = [i for i in IMPL_LABELS if any(e["impl"] == i for e in entries)]
    keys = sorted({(e["seq"], e["head_dim"], e["causal"]) for e in entries}, key=lambda k: (k[1], not k[2], k[0]))
    for mode in ("fwd+bwd", "fwd"):
        header = ["seq", "d", "causal", "B×H"] + [f"{IMPL_LABELS[i]} ms" for i in impls]
        header += [
            "multimax / flash",
            "atomic bwd / flash",
            "multimax / Flex + σ",
            "multimax TFLOP/s (of mm)",
            "flash TFLOP/s",
            "multimax MiB",
            "flash MiB",
        ]
        rows = []
        for seq, head_dim, causal in keys:
            key = dict(seq=seq, head_dim=head_dim, causal=causal, mode=mode)
            got = {i: _entry(entries, impl=i, **key) for i in impls}
            mm, flash = got.get("multimax"), got.get("sdpa_flash")
            any_entry = next((e for e in entries if all(e.get(k) == v for k, v in key.items()) and "batch" in e), {})
            rows.append(
                [
                    str(seq),
                    str(head_dim),
                    "yes" if causal else "no",
                    f"{any_entry.get('batch', '?')}×{any_entry.get('heads', '?')}",
                ]
                + [_f(got[i]["ms"] if got[i] else None, ".2f") for i in impls]
                + [
                    _f(_ratio(mm, flash, "ms")),
                    _f(_ratio(got.get("multimax_atomic"), flash, "ms")),
                    _f(_ratio(mm, got.get("flex_multimax"), "ms")),
                    "–" if mm is None else f"{mm['tflops']:.0f} ({_f(mm.get('of_matmul'), '.0%')})",
                    _f(flash["tflops"] if flash else None, ".0f"),
                    _f(mm.get("peak_mib") if mm else None, ".0f"),
                    _f(flash.get("peak_mib") if flash else None, ".0f"),
                ]
            )
        lines.append(
            f"### {'Forward + backward' if mode == 'fwd+bwd' else 'Forward'}\n\n" + markdown_table(header, rows)
        )
    problems = [e for e in entries if e.get("status") != "ok"]
    if problems:
        grouped: dict[str, list[str]] = {}
        for e in problems:
            what = f"{e['status']}: {e.get('error', '')}"
            grouped.setdefault(what, []).append(
                f"{IMPL_LABELS.get(e['impl'], e['impl'])} {e['seq']} d{e['head_dim']} "
                f"{'causal' if e['causal'] else 'non-causal'} {e['mode']}"
            )
        lines.append(
            "### Entries that did not run\n\n"
            + "\n".join(f"- {what} — {'; '.join(where)}" for what, where in grouped.items())
        )
    return "\n\n".join(lines)


def _end_to_end_section(part: dict) -> str:
    model = part.get("model", {})
    lines = [
        "## End to end",
        f"Llama from a config, random weights, bfloat16: hidden {model.get('hidden_size')}, "
        f"{model.get('num_hidden_layers')} layers, {model.get('num_attention_heads')} heads "
        f"({model.get('num_key_value_heads')} key/value), SwiGLU {model.get('intermediate_size')}, vocabulary "
        f"{model.get('vocab_size')}; σ with trained-looking values.",
    ]

    def failed(section) -> str | None:
        return None if isinstance(section, list) else f"{section.get('status')}: {section.get('error', '')}"

    train = part.get("train")
    if train is not None:
        rows = [
            [
                e["impl"],
                f"{e.get('parameters', 0) / 1e9:.2f}B",
                f"{e.get('batch')}×{e.get('seq')}",
                _f(e.get("step_ms"), ".0f"),
                _f(e.get("tokens_per_s"), ",.0f"),
                _f(e.get("peak_mib"), ",.0f"),
                e.get("error", ""),
            ]
            for e in (train if isinstance(train, list) else [])
        ]
        lines.append(
            "### Training step (forward, backward, fused AdamW)\n\n"
            + (
                failed(train)
                or markdown_table(["impl", "parameters", "batch", "step ms", "tokens/s", "peak MiB", "error"], rows)
            )
        )
    generate = part.get("generate")
    if generate is not None:
        rows = [
            [
                e["impl"],
                e["cache"],
                f"{e.get('batch')}×{e.get('prompt')}+{e.get('new_tokens')}",
                _f(e.get("prefill_ms"), ".0f"),
                _f(e.get("prefill_tokens_per_s"), ",.0f"),
                _f(e.get("decode_tokens_per_s"), ",.0f"),
                _f(e.get("peak_mib"), ",.0f"),
                e.get("error", "")[:160],
            ]
            for e in (generate if isinstance(generate, list) else [])
        ]
        lines.append(
            "### generate (prefill, then greedy decoding)\n\nDecode throughput: batch × (new − 1) tokens over the "
            "time of a full generate minus a prefill-only one.\n\n"
            + (
                failed(generate)
                or markdown_table(
                    [
                        "impl",
                        "cache",
                        "batch×prompt+new",
                        "prefill ms",
                        "prefill tokens/s",
                        "decode tokens/s",
                        "peak MiB",
                        "error",
                    ],
                    rows,
                )
            )
        )
    output = part.get("output_layer")
    if output is not None:
        rows = [
            [
                e["impl"],
                f"{e.get('tokens')}×{e.get('hidden')} → {e.get('vocab')}",
                _f(e.get("ms"), ".1f"),
                _f(e.get("peak_mib"), ",.0f"),
                e.get("error", "")[:160],
            ]
            for e in (output if isinstance(output, list) else [])
        ]
        lines.append(
            "### Output layer: σ + cross-entropy, forward and backward\n\n"
            + (
                failed(output)
                or markdown_table(["implementation", "tokens × hidden → vocab", "ms", "peak MiB", "error"], rows)
            )
        )
    return "\n\n".join(lines)


def _tests_section(part: dict) -> str:
    rows = [
        [
            r["name"],
            " ".join(r.get("args", [])),
            r.get("status", ""),
            str(r.get("tests", "–")),
            str(r.get("failures", "–")),
            str(r.get("errors", "–")),
            str(r.get("skipped", "–")),
            _f(r.get("seconds"), ".0f"),
        ]
        for r in part.get("runs", [])
    ]
    text = "## GPU tests\n\n" + markdown_table(
        ["run", "pytest arguments", "status", "tests", "failures", "errors", "skipped", "seconds"], rows
    )
    failing = [f for r in part.get("runs", []) for f in r.get("failing", [])]
    if failing:
        text += "\n\nFailing:\n\n" + "\n".join(f"- {f}" for f in failing[:40])
    if part.get("fsdp"):
        text += f"\n\nFSDP tests not run: {part['fsdp']}."
    return text


def _targets_section(found: list[dict]) -> str:
    rows = [
        [
            t["name"],
            _f(t["value"], ".3g"),
            ("≥ " if t["at_least"] else "≤ ") + f"{t['limit']:g}",
            {None: "not measured", True: "met", False: "**missed**"}[t["met"]],
        ]
        for t in found
    ]
    return "## Targets (issue 23)\n\n" + markdown_table(["target", "value", "limit", ""], rows)


SECTIONS: dict[str, Callable[[dict], str]] = {
    "correctness": _correctness_section,
    "attention": _attention_section,
    "end_to_end": _end_to_end_section,
    "tests": _tests_section,
}


def markdown(data: dict) -> str:
    parts = data.get("parts", {})
    status = ", ".join(
        f"{name} {'passed' if part.get('passed') else 'FAILED'} ({part.get('seconds', '?')} s)"
        for name, part in parts.items()
    )
    sections = [f"# MultiMax on the GPU: gpu_check\n\n{_environment_line(data.get('environment', {}))}\n\n{status}."]
    for name, render in SECTIONS.items():
        if name in parts:
            part = parts[name]
            sections.append(
                render(part)
                if "error" not in part or name == "tests"
                else f"## {name}\n\nThe part failed: {part['error']}\n\n```\n{part.get('traceback', '')}\n```"
            )
    sections.append(_targets_section(data.get("targets", targets(data))))
    return "\n\n".join(sections) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# figure and the short table


def plot(data: dict, path: Path) -> None:
    from hf_multimax.extras import require

    require("analysis", "the figure of benchmarks/gpu_check.py", modules=["matplotlib"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = data.get("parts", {})
    panels: list[Callable] = []
    entries = parts.get("attention", {}).get("entries", [])
    for mode in ("fwd+bwd", "fwd"):
        for head_dim in sorted({e["head_dim"] for e in entries}):
            for causal in (True, False):
                panels.append(lambda ax, m=mode, d=head_dim, c=causal: _attention_panel(ax, entries, m, d, c))
    cases = [c for c in parts.get("correctness", {}).get("cases", []) if "errors" in c]
    if cases:
        panels.append(lambda ax: _correctness_panel(ax, cases))
    found = [t for t in data.get("targets", []) if t["value"] is not None]
    if found:
        panels.append(lambda ax: _targets_panel(ax, found))
    if not panels:
        panels.append(lambda ax: ax.text(0.5, 0.5, "no results yet", ha="center", va="center"))
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, panels, strict=False):
        draw(ax)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    env = data.get("environment", {})
    fig.suptitle(
        f"MultiMax gpu_check: {env.get('gpu', 'CPU dry run')}, torch {env.get('torch')}, triton {env.get('triton')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _attention_panel(ax, entries: list[dict], mode: str, head_dim: int, causal: bool) -> None:
    for impl, label in IMPL_LABELS.items():
        points = sorted(
            (e["seq"], e["tflops"])
            for e in entries
            if e["impl"] == impl
            and e["mode"] == mode
            and e["head_dim"] == head_dim
            and e["causal"] == causal
            and e.get("status") == "ok"
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"{mode}, d{head_dim}, {'causal' if causal else 'non-causal'}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _correctness_panel(ax, cases: list[dict]) -> None:
    names = ("output", "dq", "dk", "dv", "d_ranges", "d_ts", "d_bias")
    dtypes = sorted({c["dtype"] for c in cases})
    width = 0.8 / len(dtypes)
    for n, dtype in enumerate(dtypes):
        worst = [
            max(
                (c["errors"][name]["rel"] for c in cases if c["dtype"] == dtype and name in c["errors"]),
                default=float("nan"),
            )
            for name in names
        ]
        ax.bar([i + n * width for i in range(len(names))], [max(w, 1e-12) for w in worst], width, label=dtype)
    ax.set_yscale("log")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=45, fontsize=7)
    ax.set_ylabel("worst ‖x − ref‖/‖ref‖")
    ax.set_title("correctness vs float64", fontsize=9)
    ax.legend(fontsize=7)


def _targets_panel(ax, found: list[dict]) -> None:
    values = [t["value"] / t["limit"] for t in found]
    colors = ["tab:green" if t["met"] else "tab:red" for t in found]
    ax.barh(range(len(found)), values, color=colors)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(found)), [t["name"][:48] for t in found], fontsize=5)
    ax.set_xlabel("value / limit (green: met)")
    ax.set_title("targets", fontsize=9)


def summary(data: dict) -> str:
    """The short table printed last: one line per part, then the targets."""
    parts = data.get("parts", {})
    env = data.get("environment", {})
    lines = [
        f"gpu_check: {env.get('gpu', 'CPU (dry run)')}, torch {env.get('torch')}, triton {env.get('triton')}",
        f"{'part':12s} {'status':7s} {'s':>5s}  result",
    ]
    for name, part in parts.items():
        lines.append(
            f"{name:12s} {'passed' if part.get('passed') else 'FAILED':7s} {part.get('seconds', 0):5.0f}  "
            f"{_part_line(name, part)}"
        )
    found = data.get("targets", targets(data))
    met = sum(t["met"] is True for t in found)
    lines.append(f"targets: {met} of {len(found)} met ({sum(t['met'] is None for t in found)} not measured)")
    for t in found:
        mark = {None: "  ?", True: " ok", False: " NO"}[t["met"]]
        lines.append(f"{mark} {_f(t['value'], '8.3g')} {'>=' if t['at_least'] else '<='} {t['limit']:<6g} {t['name']}")
    return "\n".join(lines)


def _part_line(name: str, part: dict) -> str:
    if "error" in part and name != "tests":
        return f"error: {part['error'][:100]}"
    if name == "correctness":
        cases = part.get("cases", [])
        worst = {}
        for c in cases:
            for values in c.get("errors", {}).values():
                worst[c["dtype"]] = max(worst.get(c["dtype"], 0.0), values["rel"])
        text = ", ".join(f"{d} {w:.1e}" for d, w in sorted(worst.items()))
        return f"{sum(c.get('passed', False) for c in cases)}/{len(cases)} cases; worst rel. error {text}"
    if name == "attention":
        entries = part.get("entries", [])
        ok = sum(e["status"] == "ok" for e in entries)
        failed = [e for e in entries if e["impl"].startswith("multimax") and e["status"] == "failed"]
        return f"{ok}/{len(entries)} entries ran; {len(failed)} multimax failures"
    if name == "end_to_end":
        bits = []
        for section in ("train", "generate", "output_layer"):
            value = part.get(section)
            if isinstance(value, dict):
                bits.append(f"{section} {value.get('status')}")
            elif value is not None:
                bits.append(f"{section} {sum(e['status'] == 'ok' for e in value)}/{len(value)} ok")
        return "; ".join(bits)
    runs = part.get("runs", [])
    return "; ".join(f"{r['name']}: {r.get('tests', '?')} tests, {r.get('failures', '?')} failed" for r in runs)
