"""docs/debugging.md cannot drift from the code: every `otvllm ...` command it shows parses with
the CLI and its settings are accepted; the span and attribute names it cites are in the schema;
the summary lines it quotes are what `otvllm trace summary` prints for its own commands, run for
real on the synthetic model; its pictures exist and stay small."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from otvllm import environment
from otvllm.cli import build_parser
from otvllm.config import EngineConfig, option_fields
from otvllm.tracing import schema as S
from otvllm.tracing.tools.summary import summarize_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(ROOT, "docs", "debugging.md")
# Sections whose commands run for real here (tiny and quick on CPU): their quoted summary lines
# must be what the summary of their own trace prints, numbers aside.
RUN_FOR_REAL = ("Why a request waited", "Preemption", "Prefix caching", "Per-layer detail")
FILE_NAME = re.compile(r"\.(json|html|py|md|png|sh)$")
DOTTED = re.compile(r"^[a-z_]+(\.[a-z0-9_*]+)+( [a-z+]+)?$")


def guide_text() -> str:
    with open(GUIDE) as f:
        return f.read()


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def prose(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def commands(text: str, inline: bool = True) -> list[list[str]]:
    """Every otvllm invocation: the lines of bash blocks, and inline code, that run `otvllm`
    (after any VAR=value assignments)."""
    found = [line for block in blocks(text, "bash") for line in block.splitlines()]
    found += [] if not inline else re.findall(r"`([^`\n]*\botvllm [^`\n]*)`", prose(text))
    words = [shlex.split(line) for line in found]
    return [w for w in words if _program(w) == "otvllm"]


def _program(words: list[str]) -> str | None:
    rest = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    return rest[0] if rest else None


def split_command(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    return env, words[len(env) + 1:]


def test_the_guide_shows_commands_and_has_a_section_per_scenario():
    titles = sections(guide_text())
    for scenario in ("Start-up fails", "A step fails", "Wrong output", "Why a request waited", "Preemption",
                     "Prefix caching", "Time to first token", "Start-up time", "Per-layer detail",
                     "GPU profiling", "GPU telemetry", "A slow stretch", "Ctrl-C"):
        assert any(title.startswith(scenario) for title in titles), scenario
    assert len(commands(guide_text())) >= 12


def test_every_otvllm_command_of_the_guide_parses_and_its_settings_are_accepted(monkeypatch):
    parser = build_parser()
    for words in commands(guide_text()):
        env, argv = split_command(words)
        for name, value in env.items():
            if name.startswith(("OTVLLM_", "OTEL_")):
                assert name in environment.VARIABLES, f"{name} (in {shlex.join(words)}) is not a variable otvllm reads"
                monkeypatch.setenv(name, value)
                environment.read(name)   # raises ValueError, naming it, for a bad value
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"the CLI refuses a command of the guide: {shlex.join(words)}")
        if args.command not in ("generate", "serve"):
            continue
        if not (args.device or "").startswith("cuda") or torch.cuda.is_available():
            EngineConfig(model=args.model or "synthetic", **{f.name: getattr(args, f.name) for f in option_fields()})


def schema_names() -> set[str]:
    return {value for name, value in vars(S).items() if name.isupper() and isinstance(value, str)}


def cited_names(text: str) -> set[str]:
    """Inline code that is a dotted name in one of the schema's namespaces (file names aside)."""
    namespaces = {name.split(".")[0] for name in schema_names() if "." in name}
    codes = set(re.findall(r"`([^`\n]+)`", prose(text)))
    return {c for c in codes if DOTTED.match(c) and c.split(".")[0] in namespaces and not FILE_NAME.search(c)}


def test_every_span_and_attribute_name_the_guide_cites_is_in_the_schema():
    names = schema_names()
    cited = cited_names(guide_text())
    assert {S.FORWARD, S.ERROR_ADVICE, S.WAITING_REASON, S.PREEMPTED_FOR, S.GPU_UTILIZATION} <= cited
    phases = {"prefill", "decode", "drain", "decode+drain"}
    known = names | {S.step_name(p) for p in phases} | {S.steps_name(p) for p in phases}
    unknown = sorted(c for c in cited if c not in known and not c.startswith((S.SHAPE_PREFIX, S.CONFIG_PREFIX)))
    assert not unknown, f"docs/debugging.md cites names that otvllm/tracing/schema.py does not have: {unknown}"


def test_the_guide_catches_a_name_that_is_not_in_the_schema():
    # The check above is not vacuous: a misspelt attribute is caught.
    assert "otvllm.scheduler.waiting_reasons" in cited_names("see `otvllm.scheduler.waiting_reasons` and `config.json`")
    assert "otvllm.scheduler.waiting_reasons" not in schema_names()


def test_the_pictures_of_the_guide_exist_and_are_small():
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", guide_text())
    assert len(pictures) >= 5
    for picture in pictures:
        path = os.path.join(ROOT, "docs", picture)
        assert os.path.isfile(path), picture
        assert os.path.getsize(path) < 150_000, picture


def summary_line_pattern(line: str) -> re.Pattern:
    """A quoted summary line with its numbers as wildcards (times and counts vary from run to run),
    and the spaces that align them as any run of spaces."""
    parts = re.split(r"(\d[\d.,]*)", line.strip())
    return re.compile("".join(r"\d[\d.,]*" if i % 2 else re.sub(r"(\\ )+", " +", re.escape(p))
                              for i, p in enumerate(parts)))


def test_the_quoted_summary_lines_are_what_the_guides_own_commands_print(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OTVLLM_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path),
           "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", "from otvllm.synthetic import synthetic_model_dir; synthetic_model_dir()"],
                   env=env, check=True, timeout=300)   # written once, before the runs that share it
    guide = sections(guide_text())
    runs, summaries = {}, {}
    for title in RUN_FOR_REAL:
        for words in commands(guide[title], inline=False):
            env_vars, argv = split_command(words)
            assert not env_vars
            if argv[:2] == ["trace", "summary"]:
                summaries.setdefault(title, []).append(argv[2])
                continue
            assert argv[0] == "generate" and "--trace-file" in argv, title
            runs[title] = subprocess.Popen([sys.executable, "-m", "otvllm", *argv, "--no-progress"], env=env,
                                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for title, run in runs.items():
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, (title, stderr)
    for title in RUN_FOR_REAL:
        printed = [line.strip() for f in summaries[title] for line in summarize_file(str(tmp_path / f)).splitlines()]
        quoted = [line for block in blocks(guide[title], "text") for line in block.splitlines() if line.strip()]
        assert quoted and printed, title
        for line in quoted:
            pattern = summary_line_pattern(line)
            assert any(pattern.fullmatch(s) for s in printed), (title, line, printed)
