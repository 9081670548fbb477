"""`otvllm generate ...` and `otvllm trace summary FILE`."""

import argparse
import os
import random
import signal
import sys
import time

EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 2, 130, 143


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the run ends like a Ctrl-C does."""

    error_type = "SIGTERM"

    def __str__(self) -> str:
        return "terminated by SIGTERM"


def _raise_terminated(signum, frame):
    raise Terminated()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one to show."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _add_engine_options(parser: argparse.ArgumentParser, trace_levels) -> None:
    parser.add_argument("--model", help="Hugging Face format model directory (default: the synthetic model)")
    parser.add_argument("--max-num-seqs", type=_positive_int, default=256, help="sequences in one batch")
    parser.add_argument("--max-num-batched-tokens", type=_positive_int, default=16384,
                        help="tokens one prefill step may compute")
    parser.add_argument("--max-model-len", type=_positive_int, default=None,
                        help="longest prompt plus output (default: the model's limit, at most 4096)")
    parser.add_argument("--block-size", type=_positive_int, default=256, dest="kvcache_block_size",
                        help="KV-cache block (page) size in tokens")
    parser.add_argument("--num-kvcache-blocks", type=_positive_int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of the GPU's memory the engine may use")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    parser.add_argument("--attention-backend", choices=("auto", "torch", "triton", "flash_attn"), default="auto",
                        help="attention kernels")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--trace-level", choices=trace_levels, default=None,
                        help="default: OTVLLM_TRACE_LEVEL, else step")


def build_parser() -> argparse.ArgumentParser:
    from otvllm.tracing.level import NAMES

    from otvllm import __version__

    parser = argparse.ArgumentParser(prog="otvllm", description="A tracing-first LLM inference engine.")
    parser.add_argument("--version", action="version", version=f"otvllm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = _ShowDefaults

    gen = commands.add_parser("generate", help="generate text and trace the run", formatter_class=defaults,
                              description="Generate for the given prompts. With no --model, a built-in "
                                          "synthetic model (tiny random Qwen3, output is noise) is used.")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    gen.add_argument("--num-prompts", type=_positive_int, default=0,
                     help="add N random prompts (lengths 16-128 tokens), e.g. to exercise batching")
    gen.add_argument("--max-tokens", type=_positive_int, default=64, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 is greedy (the library's SamplingParams default is 1.0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    gen.add_argument("--top-k", type=int, default=-1, help="keep the k likeliest tokens; -1: all")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    _add_engine_options(gen, NAMES)
    gen.add_argument("--otlp-endpoint", default=None,
                     help="OTLP endpoint (default: OTEL_EXPORTER_OTLP_ENDPOINT); with none, a trace file is written")
    gen.add_argument("--trace-file", default=None, help="write the trace as Jaeger JSON to this file")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")

    serve = commands.add_parser("serve", help="serve an OpenAI-compatible API", formatter_class=defaults,
                                description="Serve /v1/completions and /v1/chat/completions over HTTP. With no "
                                            "--model, the built-in synthetic model is served.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--max-queue", type=_positive_int, default=1024,
                       help="requests that may wait for the engine; more get 503")
    serve.add_argument("--served-model-name", default=None, help="the model's name in the API "
                                                                  "(default: the model directory's name)")
    serve.add_argument("--stream-interval-ms", type=float, default=0.0,
                       help="send a streaming request's tokens at most this often after the first one "
                            "(0: every engine step); larger chunks cost the server less at high load")
    serve.add_argument("--drain-timeout", type=float, default=60.0,
                       help="on SIGTERM or Ctrl-C, seconds that running requests get to finish")
    _add_engine_options(serve, NAMES)
    serve.add_argument("--otlp-endpoint", default=None,
                       help="OTLP endpoint (default: OTEL_EXPORTER_OTLP_ENDPOINT); with none, no trace is exported")
    serve.add_argument("--trace-file", default=None, help="also write the trace as Jaeger JSON to this file")

    trace = commands.add_parser("trace", help="work with trace files")
    trace_commands = trace.add_subparsers(dest="trace_command", required=True)
    summary = trace_commands.add_parser("summary", help="print a breakdown of trace files")
    summary.add_argument("files", nargs="*", metavar="FILE", help="Jaeger JSON trace files")
    summary.add_argument("--latest", action="store_true",
                         help="the newest otvllm-trace-*.json in the current directory (with no FILE)")
    plot = trace_commands.add_parser("plot", help="draw a run's steps (time by phase, batch, KV blocks, memory)",
                                     formatter_class=defaults)
    plot.add_argument("file", metavar="FILE", help="a Jaeger JSON trace file")
    plot.add_argument("-o", "--output", default=None,
                      help="the plot: .html (interactive, self-contained) or .json (plotly figure) "
                           "(default: FILE with .html)")
    plot.add_argument("--call", type=int, default=0, help="which call of the file, in the order they started")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "trace":
            return _trace_plot(args) if args.trace_command == "plot" else _trace_summary(args)
        if args.command == "serve":
            return _serve(args)
        return _generate(args)
    except ValueError as e:
        print(f"otvllm: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _trace_summary(args) -> int:
    import glob

    from otvllm.tracing.tools.summary import summarize_file
    files = list(args.files)
    if args.latest:
        if files:
            raise ValueError("give trace files or --latest, not both")
        found = glob.glob("otvllm-trace-*.json")
        if not found:
            raise ValueError(f"--latest: no otvllm-trace-*.json in {os.getcwd()}")
        files = [max(found, key=os.path.getmtime)]
    if not files:
        raise ValueError("give a trace file (or several), or --latest")
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"trace file {path!r} does not exist")
    print("\n\n".join(summarize_file(path) for path in files))
    return 0


def _trace_plot(args) -> int:
    from otvllm.tracing.tools.plot import plot_file
    if not os.path.isfile(args.file):
        raise ValueError(f"trace file {args.file!r} does not exist")
    print(plot_file(args.file, args.output or os.path.splitext(args.file)[0] + ".html", args.call))
    return 0


def _random_prompts(n: int, vocab_size: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(min(vocab_size, 256)) for _ in range(rng.randint(16, 128))] for _ in range(n)]


def _parent_from_environment():
    """TRACEPARENT/TRACESTATE, OpenTelemetry's environment carrier, as a context (or None)."""
    traceparent = os.environ.get("TRACEPARENT", "").strip()
    if not traceparent:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    carrier = {"traceparent": traceparent, "tracestate": os.environ.get("TRACESTATE", "")}
    context = TraceContextTextMapPropagator().extract(carrier)
    if not trace.get_current_span(context).get_span_context().is_valid:
        raise ValueError(f"TRACEPARENT={traceparent!r} is not a W3C traceparent "
                         f"(00-<32 hex trace id>-<16 hex span id>-<2 hex flags>)")
    return context


def _check_generate_args(args):
    """Everything that can be checked before any work starts; returns the sampling params."""
    from otvllm import SamplingParams

    if not args.prompt and not args.num_prompts:
        raise ValueError("nothing to generate: give --prompt TEXT (repeatable) or --num-prompts N")
    _check_model(args)
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, seed=args.seed)


def _generate(args) -> int:
    params = _check_generate_args(args)
    attrs = {"otvllm.cli.prompts": len(args.prompt) + args.num_prompts, "otvllm.cli.max_tokens": args.max_tokens}
    return _traced_run(args, attrs, default_trace_file=True, body=lambda: _run(args, params))


def _check_model(args) -> None:
    if args.model is not None and not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} does not exist or is not a directory")


def _serve(args) -> int:
    _check_model(args)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    from otvllm.serving.server import serve
    return _traced_run(args, {"otvllm.cli.port": args.port}, default_trace_file=False,
                       body=lambda: serve(args, _make_llm(args)))


def _traced_run(args, attrs: dict, default_trace_file: bool, body) -> int:
    """Run `body` under the CLI's tracing: one trace per run (under TRACEPARENT when set),
    exported by the export process; Ctrl-C and SIGTERM end it with one line and the trace
    written."""
    from opentelemetry import context as otel_context

    from otvllm.tracing import schema as S
    from otvllm.tracing.export.setup import export_settings, start
    from otvllm.tracing.export.trace_file import default_trace_path
    from otvllm.tracing.level import TraceLevel
    from otvllm.tracing.recording.profiler import settings_from_env as profile_settings_from_env
    from otvllm.tracing.recording.tracer import run_span

    level = TraceLevel.parse(args.trace_level)
    args.trace_level = str(level)
    if level >= TraceLevel.STEP:
        profile_settings_from_env()   # a bad OTVLLM_TRACE_PROFILE_* is refused before any work starts
    settings, parent = None, None
    if level is not TraceLevel.OFF:
        endpoint = args.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
        trace_file = args.trace_file
        if trace_file is None and not endpoint and default_trace_file:
            trace_file = default_trace_path()
        settings = export_settings(endpoint=endpoint, trace_file=trace_file)
        parent = _parent_from_environment()

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_terminated)
    session = start(settings)
    token = otel_context.attach(parent) if parent is not None else None
    code = 0
    try:
        with run_span(S.CLI_RUN, {"otvllm.cli.command": args.command, **attrs}):
            code = body()
    except (KeyboardInterrupt, Terminated) as e:
        code = EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT
        print(f"otvllm: interrupted by {'SIGTERM' if code == EXIT_SIGTERM else 'SIGINT'}"
              f"{'; writing the trace of the run so far' if session.sink else ''}", file=sys.stderr, flush=True)
    finally:
        if token is not None:
            otel_context.detach(token)
        # The trace must be written whole: a second Ctrl-C or SIGTERM does not cut it short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            report = session.shutdown(quiet=True)
            for _, line in report.lines() if report else []:
                print(line, file=sys.stderr, flush=True)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    return code


def _make_llm(args):
    from otvllm import LLM
    from otvllm.synthetic import synthetic_model_dir

    model = args.model
    if model is None:
        model = synthetic_model_dir()
        print(f"using the built-in synthetic model at {model} (random weights: its output is noise)",
              file=sys.stderr)
    return LLM(model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               max_model_len=args.max_model_len, kvcache_block_size=args.kvcache_block_size,
               num_kvcache_blocks=args.num_kvcache_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
               device=args.device, dtype=args.dtype, attention_backend=args.attention_backend,
               enforce_eager=args.enforce_eager, trace_level=args.trace_level)


def _run(args, params) -> int:
    llm = _make_llm(args)
    prompts = list(args.prompt) + _random_prompts(args.num_prompts, llm.engine.spec.vocab_size)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.no_progress and len(prompts) > 1)
    seconds = time.perf_counter() - start
    for out in outputs:
        if out.prompt is not None:
            print(f"--- prompt {out.request_id}: {out.prompt!r}")
            print(f"{out.text!r} [{len(out.token_ids)} tokens, {out.finish_reason}]")
        else:
            print(f"--- prompt {out.request_id}: {len(out.prompt_token_ids)} token ids -> "
                  f"{len(out.token_ids)} tokens [{out.finish_reason}]")
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.token_ids) for o in outputs)
    print(f"{len(outputs)} requests, {prompt_tokens} prompt tokens, {output_tokens} output tokens in "
          f"{seconds:.2f} s: {output_tokens / seconds:.1f} output tok/s "
          f"({(prompt_tokens + output_tokens) / seconds:.1f} tok/s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
