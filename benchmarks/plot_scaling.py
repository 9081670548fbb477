"""The README's scaling figure: how cost grows with the work, from the JSON of two benchmarks.

    python benchmarks/scaling.py --json scaling.json
    python benchmarks/latency.py --contexts 1024,4096,16384 --json latency.json
    python benchmarks/plot_scaling.py scaling.json latency.json -o docs/img/scaling-h200.png

Four panels: throughput against the number of requests; time to first token and time per
output token (p50) against the context, a line per batch size (otvllm's rows of latency.json,
one attention backend: the first there, or `--backend`); and what the KV cache holds against
max_model_len (sequences of the full length, and its GiB). Drawn with matplotlib into a PNG (or
any format matplotlib writes, from the file's suffix).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from otvllm.tracing.export.trace_file import directory_problem  # noqa: E402
from otvllm.tracing.tools.jaeger_reader import read_json_file  # noqa: E402

GIB = 1 << 30


def read_json(path: str, keys: tuple[str, ...], what: str) -> dict:
    """The file's object, or ValueError naming the file and what is wrong with it."""
    data = read_json_file(path)
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path}: not the JSON of {what} (no {', '.join(repr(k) for k in missing)})")
    return data


def latency_rows(latency: dict, backend: str | None) -> tuple[str, list[dict]]:
    """(the backend drawn, otvllm's rows of it)."""
    rows = [r for r in latency["results"] if r.get("system") == "otvllm"]
    backends = list(dict.fromkeys(r["attention_backend"] for r in rows))
    if not backends:
        raise ValueError("latency JSON: no otvllm rows")
    backend = backend or backends[0]
    if backend not in backends:
        raise ValueError(f"latency JSON: no otvllm rows with attention backend {backend!r} "
                         f"(it has {', '.join(backends)})")
    return backend, [r for r in rows if r["attention_backend"] == backend]


def _log_x(ax, values) -> None:
    """A log x axis labelled at the measured values only."""
    values = sorted(set(values))
    ax.set_xscale("log")
    ax.set_xticks(values, [f"{v:,}" for v in values])
    ax.minorticks_off()


def figure(scaling: dict, latency: dict, backend: str | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backend, rows = latency_rows(latency, backend)
    fig, ((tput, ttft), (kv, tpot)) = plt.subplots(2, 2, figsize=(11, 7.5))
    fig.suptitle(f"otvllm on {scaling['device']}: how cost grows with the work")

    runs = sorted(scaling["throughput"], key=lambda r: r["requests"])
    tput.plot([r["requests"] for r in runs], [r["tok_s"] for r in runs], marker="o", label="tracing off")
    tput.set(xlabel="requests (benchmarks/throughput.py's kind)", ylabel="output tok/s", title="throughput",
             ylim=(0, None))
    _log_x(tput, [r["requests"] for r in runs])

    for batch in sorted({r["batch"] for r in rows}):
        points = sorted((r["context"], r["ttft_ms"], r["tpot_p50_ms"]) for r in rows if r["batch"] == batch)
        contexts = [p[0] for p in points]
        ttft.plot(contexts, [p[1] for p in points], marker="o", label=f"batch {batch}")
        tpot.plot(contexts, [p[2] for p in points], marker="o", label=f"batch {batch}")
    for ax, title, unit in ((ttft, "time to first token", "TTFT (ms)"),
                            (tpot, "time per output token (p50)", "TPOT (ms)")):
        ax.set(xlabel=f"context (prompt tokens), {backend} attention", ylabel=unit, title=title, ylim=(0, None))
        _log_x(ax, [r["context"] for r in rows])

    caches = sorted(scaling["kv_cache"], key=lambda r: r["max_model_len"])
    lens = [r["max_model_len"] for r in caches]
    kv.plot(lens, [r["full_length_seqs"] for r in caches], marker="o", label="sequences of full length")
    kv.set(xlabel="max_model_len", ylabel="sequences the KV cache holds", title="KV cache", ylim=(0, None))
    _log_x(kv, lens)
    for r in caches:
        kv.annotate(f"{r['kv_bytes'] / GIB:.1f} GiB", (r["max_model_len"], r["full_length_seqs"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    for ax in (tput, ttft, tpot, kv):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scaling", help="benchmarks/scaling.py --json output")
    parser.add_argument("latency", help="benchmarks/latency.py --json output")
    parser.add_argument("-o", "--output", required=True, help="the image to write (e.g. scaling.png)")
    parser.add_argument("--backend", help="the attention backend's rows to draw (default: the first in the file)")
    args = parser.parse_args()
    problem = directory_problem(os.path.abspath(args.output))
    if problem:
        parser.error(f"-o {args.output}: {problem}")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        parser.error("the figure needs matplotlib: pip install 'otvllm[bench]'")
    formats = Figure().canvas.get_supported_filetypes()
    suffix = os.path.splitext(args.output)[1].lstrip(".").lower()
    if suffix not in formats:
        parser.error(f"-o {args.output}: name the image with one of the suffixes {', '.join(sorted(formats))}")
    try:
        scaling = read_json(args.scaling, ("device", "throughput", "kv_cache"), "benchmarks/scaling.py")
        latency = read_json(args.latency, ("results",), "benchmarks/latency.py")
        fig = figure(scaling, latency, args.backend)
    except ValueError as e:
        parser.error(str(e))
    fig.savefig(args.output, dpi=110)
    print(f"figure written to {args.output}")


if __name__ == "__main__":
    sys.exit(main())
