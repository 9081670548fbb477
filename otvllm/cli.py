"""The command line: `otvllm generate`, `otvllm serve`, `otvllm trace summary` and `otvllm trace plot`."""

import argparse
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

from otvllm import environment

EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 2, 130, 143
EXIT_BROKEN_PIPE = 128 + 13   # as a process killed by SIGPIPE


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the run ends like a Ctrl-C does."""

    error_type = "SIGTERM"

    def __str__(self) -> str:
        return "terminated by SIGTERM"


def _raise_terminated(signum, frame):
    raise Terminated()


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        ids = None
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"expected token ids (integers >= 0) separated by commas, got {text!r}")
    return ids


def _logit_bias(text: str) -> dict[int, float]:
    """ID:BIAS[,ID:BIAS...]; the values' range is SamplingParams' to check."""
    try:
        pairs = [part.split(":") for part in text.split(",")]
        bias = {int(token): float(value) for token, value in pairs}
    except ValueError:
        bias = None
    if not bias or any(token < 0 for token in bias):
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID:BIAS pairs separated by commas (e.g. 198:-100,13:5), "
                                         f"got {text!r}")
    return bias


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, naming the problem (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one to show."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    """--model, then one option per EngineConfig field, with the field's name (or flag), type,
    default, choices and help."""
    from otvllm.config import field_kind, option_fields

    parser.add_argument("--model", help="Hugging Face format model directory (default: the synthetic model)")
    for f in option_fields():
        kind, _ = field_kind(f)
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        common = dict(dest=f.name, default=f.default, help=f.metadata["help"])
        if kind is bool:
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, **common)
        else:
            choices = f.metadata["choices"]
            metavar = None if choices else flag.removeprefix("--").replace("-", "_").upper()
            parser.add_argument(flag, type=_int_at_least(f.metadata["minimum"]) if kind is int else kind,
                                choices=choices,
                                metavar=metavar, **common)


def build_parser() -> argparse.ArgumentParser:
    from otvllm import __version__

    parser = _Parser(prog="otvllm", description="A tracing-first LLM inference engine.")
    parser.add_argument("--version", action="version", version=f"otvllm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = _ShowDefaults

    gen = commands.add_parser("generate", help="generate text and trace the run", formatter_class=defaults,
                              description="Generate for the given prompts. With no --model, a built-in "
                                          "synthetic model (tiny random Qwen3, output is noise) is used.")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    gen.add_argument("--prompts-file", metavar="FILE",
                     help="prompts from FILE ('-': standard input), after any --prompt: one per line, or JSON "
                          "Lines (the first line starts with '{'), each line an object with a \"prompt\" (text or "
                          "token ids) and, optionally, sampling parameters for it alone (\"max_tokens\", "
                          "\"temperature\", \"stop_token_ids\", ...); blank lines are skipped")
    gen.add_argument("--num-prompts", type=_positive_int, default=None, metavar="N",
                     help="run N requests in all: the prompts given, repeated in turn up to N (the first N if "
                          "more are given); with no prompt given, N random prompts of 16-128 token ids")
    gen.add_argument("--max-tokens", type=_positive_int, default=64, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 is greedy. The CLI is greedy by default so that a run can be repeated; the "
                          "library's SamplingParams default is 1.0, as vLLM's")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    gen.add_argument("--top-k", type=int, default=-1, help="keep the k likeliest tokens; -1: all")
    gen.add_argument("--min-p", type=float, default=0.0,
                     help="keep the tokens at least this share as likely as the likeliest; 0: all")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--stop-token-ids", type=_token_ids, default=None, metavar="ID[,ID...]",
                     help="also stop when one of these token ids is generated")
    gen.add_argument("--min-tokens", type=_int_at_least(0), default=0, metavar="N",
                     help="EOS and the stop token ids cannot end an output shorter than N tokens")
    gen.add_argument("--logit-bias", type=_logit_bias, default=None, metavar="ID:BIAS[,ID:BIAS...]",
                     help="add BIAS (in [-100, 100]) to token ID's logit before sampling, greedy included")
    gen.add_argument("--presence-penalty", type=float, default=0.0,
                     help="subtracted from the logit of each token the output already holds, in [-2, 2]")
    gen.add_argument("--frequency-penalty", type=float, default=0.0,
                     help="subtracted from a token's logit once per time the output holds it, in [-2, 2]")
    gen.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="divides the positive logits (multiplies the negative ones) of tokens in the prompt "
                          "or the output; 1 is none")
    gen.add_argument("--logprobs", type=_int_at_least(0), default=None, metavar="N",
                     help="report each generated token's log-probability and its N likeliest alternatives")
    gen.add_argument("--prompt-logprobs", type=_int_at_least(0), default=None, metavar="N",
                     help="the same for each prompt token after the first (the prompt is then computed whole, "
                          "not taken from the prefix cache)")
    gen.add_argument("--output", choices=("text", "json"), default="text",
                     help="text: readable lines; json: one JSON object per prompt on stdout (JSON Lines: index, "
                          "prompt, text, token_ids, finish_reason, logprobs and prompt_logprobs when asked), "
                          "everything else on stderr")
    _add_engine_options(gen)
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
    _add_engine_options(serve)
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
    except BrokenPipeError:   # the reader of the output went away (`... | head`): stop as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nothing more to flush at exit
        return EXIT_BROKEN_PIPE


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


@dataclass
class _Request:
    prompt: str | list[int] | None   # None: a random prompt, made once the model's vocabulary is known
    params: object                   # its SamplingParams
    source: str                      # where it came from, to name it in errors ("prompts.jsonl line 3")


def _requests(args) -> list[_Request]:
    """The requests of a run, every prompt and parameter checked: --prompt ones, then the
    --prompts-file ones; --num-prompts N makes them N in all (repeated in turn, or the first N),
    or N random prompts when none is given."""
    from otvllm import SamplingParams
    from otvllm.prompt_file import read_prompt_file

    options = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                   max_tokens=args.max_tokens, min_tokens=args.min_tokens,
                   ignore_eos=args.ignore_eos, seed=args.seed, stop_token_ids=args.stop_token_ids,
                   logit_bias=args.logit_bias, logprobs=args.logprobs, prompt_logprobs=args.prompt_logprobs,
                   presence_penalty=args.presence_penalty,
                   frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty)
    params = SamplingParams(**options)
    given = []
    for i, prompt in enumerate(args.prompt, 1):
        if not prompt:
            raise ValueError(f"--prompt number {i} is an empty prompt: a prompt needs at least one token")
        given.append(_Request(prompt, params, f"--prompt number {i}"))
    if args.prompts_file is not None:
        name = "standard input" if args.prompts_file == "-" else args.prompts_file
        given += [_Request(p.prompt, p.params, f"{name} line {p.line}")
                  for p in read_prompt_file(args.prompts_file, options)]
    if args.num_prompts is None:
        if not given:
            raise ValueError("nothing to generate: give --prompt TEXT (repeatable), --prompts-file FILE "
                             "or --num-prompts N")
        return given
    if not given:
        return [_Request(None, params, f"random prompt {i}") for i in range(args.num_prompts)]
    return [given[i % len(given)] for i in range(args.num_prompts)]


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


def _generate(args) -> int:
    # Everything that can be checked is, before any work starts.
    environment.check()
    _check_model(args)
    requests = _requests(args)
    attrs = {"otvllm.cli.prompts": len(requests), "otvllm.cli.max_tokens": args.max_tokens}
    return _traced_run(args, attrs, default_trace_file=True, body=lambda: _run(args, requests))


def _check_model(args) -> None:
    """The model directory and the engine options, before anything starts."""
    from otvllm.config import EngineConfig
    from otvllm.synthetic import SYNTHETIC_MODEL

    if args.model is not None and not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} does not exist or is not a directory")
    config = EngineConfig(model=args.model or SYNTHETIC_MODEL, **_engine_options(args))
    if config.tensor_parallel_size > 1 and args.model is not None:   # the model's shape must split
        from otvllm.core.resolved_config import check_tensor_parallel, resolve_device
        from otvllm.models.spec import model_spec, read_config
        check_tensor_parallel(config, model_spec(*read_config(config.model)), resolve_device(config))


def _engine_options(args) -> dict:
    from otvllm.config import option_fields
    return {f.name: getattr(args, f.name) for f in option_fields()}


def _serve(args) -> int:
    environment.check()
    _check_model(args)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    from otvllm.serving.server import serve
    return _traced_run(args, {"otvllm.cli.port": args.port}, default_trace_file=False,
                       body=lambda: serve(args, _model(args), _engine_options(args)))


def _traced_run(args, attrs: dict, default_trace_file: bool, body) -> int:
    """Run `body` under the CLI's tracing: one trace per run (under TRACEPARENT when set),
    exported by the export process; Ctrl-C and SIGTERM end it with one line and the trace
    written."""
    from opentelemetry import context as otel_context

    from otvllm.config import requested_trace_level
    from otvllm.tracing import schema as S
    from otvllm.tracing.export.setup import export_settings, otlp_endpoint, start
    from otvllm.tracing.export.trace_file import default_trace_path
    from otvllm.tracing.level import TraceLevel
    from otvllm.tracing.recording.tracer import run_span

    level = requested_trace_level(args.trace_level)
    args.trace_level = str(level)
    settings, parent = None, None
    if level is not TraceLevel.OFF:
        endpoint = args.otlp_endpoint or otlp_endpoint()
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


def _model(args) -> str:
    """The model directory: --model, or the built-in synthetic model (written on first use)."""
    from otvllm.synthetic import synthetic_model_dir

    if args.model is not None:
        return args.model
    model = synthetic_model_dir()
    print(f"using the built-in synthetic model at {model} (random weights: its output is noise)", file=sys.stderr)
    return model


def _make_llm(args):
    from otvllm import LLM
    return LLM(_model(args), **_engine_options(args))


def _run(args, requests: list[_Request]) -> int:
    from otvllm import RequestError

    llm = _make_llm(args)
    randoms = iter(_random_prompts(sum(r.prompt is None for r in requests), llm.engine.spec.vocab_size))
    prompts = [next(randoms) if r.prompt is None else r.prompt for r in requests]
    start = time.perf_counter()
    try:
        outputs = llm.generate(prompts, [r.params for r in requests],
                               use_tqdm=not args.no_progress and len(prompts) > 1)
    except RequestError as e:   # a limit of the model (vocabulary, max_model_len): name the prompt's source
        raise ValueError(f"{requests[e.index].source}: {e.problem}") from None
    seconds = time.perf_counter() - start
    readable = sys.stderr if args.output == "json" else sys.stdout   # stdout stays JSON Lines
    for out, prompt, request in zip(outputs, prompts, requests):
        if args.output == "json":
            print(json.dumps(_output_object(out, prompt, request.params)), flush=True)
        else:
            _print_output(out, llm.tokenizer, request.params)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.token_ids) for o in outputs)
    print(f"{len(outputs)} requests, {prompt_tokens} prompt tokens, {output_tokens} output tokens in "
          f"{seconds:.2f} s: {output_tokens / seconds:.1f} output tok/s "
          f"({(prompt_tokens + output_tokens) / seconds:.1f} tok/s in all)", file=readable)
    return 0


def _top(logprobs: dict[int, float], n: int) -> list[tuple[int, float]]:
    """The n likeliest of one token's log-probabilities (the chosen token is also in `logprobs`)."""
    return sorted(logprobs.items(), key=lambda item: -item[1])[:n]


def _output_object(out, prompt, params) -> dict:
    """One line of `--output json`."""
    entry = {"index": out.request_id, "prompt": prompt, "text": out.text, "token_ids": out.token_ids,
             "finish_reason": out.finish_reason}

    def listed(token: int, lp: dict | None, n: int):
        if lp is None:   # a prompt's first token
            return None
        return {"token_id": token, "logprob": lp[token],
                "top_logprobs": [{"token_id": i, "logprob": v} for i, v in _top(lp, n)]}

    if out.prompt_logprobs is not None:
        entry["prompt_logprobs"] = [listed(token, lp, params.prompt_logprobs)
                                    for token, lp in zip(out.prompt_token_ids, out.prompt_logprobs)]
    if out.logprobs is not None:
        entry["logprobs"] = [listed(token, lp, params.logprobs) for token, lp in zip(out.token_ids, out.logprobs)]
    return entry


def _print_output(out, tokenizer, params) -> None:
    if out.prompt is not None:
        print(f"--- prompt {out.request_id}: {out.prompt!r}")
        print(f"{out.text!r} [{len(out.token_ids)} tokens, {out.finish_reason}]")
    else:
        print(f"--- prompt {out.request_id}: {len(out.prompt_token_ids)} token ids -> "
              f"{len(out.token_ids)} tokens [{out.finish_reason}]")

    def token(i: int) -> str:
        return f"{i} {tokenizer.decode([i])!r}" if tokenizer is not None else str(i)

    def lines(kind: str, token_ids: list[int], logprobs: list, n: int) -> None:
        for position, (chosen, lp) in enumerate(zip(token_ids, logprobs)):
            if lp is not None:
                top = ", ".join(f"{token(i)} {v:.4f}" for i, v in _top(lp, n))
                print(f"  {kind} {position}: {token(chosen)} {lp[chosen]:.4f}" + (f" | top: {top}" if top else ""))

    if out.prompt_logprobs is not None:
        lines("prompt token", out.prompt_token_ids, out.prompt_logprobs, params.prompt_logprobs)
    if out.logprobs is not None:
        lines("token", out.token_ids, out.logprobs, params.logprobs)


if __name__ == "__main__":
    sys.exit(main())
