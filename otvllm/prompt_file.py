"""Prompts from a file (`otvllm generate --prompts-file FILE`, `-` for standard input).

Two formats, told apart by the first line that is not blank:
- plain text: each line is one prompt (its line break removed, nothing else);
- JSON Lines, when that line starts with `{`: each line is an object with a "prompt" (a
  string, or a list of token ids) and, optionally, SamplingParams fields for that prompt
  alone ("max_tokens", "temperature", "stop_token_ids", ...), which override the options.
Blank lines are skipped. Every line is checked when the file is read, before any work
starts, and the first bad one is named by its line number."""

import json
import sys
from dataclasses import dataclass, fields

from otvllm.sampling_params import SamplingParams

PARAMETERS = tuple(f.name for f in fields(SamplingParams))


@dataclass
class FilePrompt:
    line: int
    prompt: str | list[int]
    params: SamplingParams


def read_prompt_file(path: str, defaults: dict) -> list[FilePrompt]:
    """Every prompt of the file, with its sampling parameters (`defaults`, the options, updated
    by the line's own); ValueError naming the file and the line for anything wrong."""
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise ValueError(f"--prompts-file {path}: {e.strerror or e}") from None
    lines = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{name} line {number}: not UTF-8 text") from None
        if text.strip():
            lines.append((number, text))
    if not lines:
        raise ValueError(f"--prompts-file {name} holds no prompts")
    if not lines[0][1].lstrip().startswith("{"):
        return [FilePrompt(number, text, SamplingParams(**defaults)) for number, text in lines]
    prompts = []
    for number, text in lines:
        try:
            prompts.append(_json_line(number, text, defaults))
        except ValueError as e:
            raise ValueError(f"{name} line {number}: {e}") from None
    return prompts


def _json_line(number: int, text: str, defaults: dict) -> FilePrompt:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno}); in a JSON Lines file (its first "
                         f"line starts with '{{') every line is a JSON object") from None
    if not isinstance(entry, dict):
        raise ValueError(f'expected a JSON object with a "prompt", got {type(entry).__name__}')
    if "prompt" not in entry:
        raise ValueError('no "prompt"')
    unknown = sorted(set(entry) - {"prompt", *PARAMETERS})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; valid: prompt, {', '.join(PARAMETERS)}")
    prompt = entry.pop("prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("empty prompt")
    elif not (isinstance(prompt, list) and prompt
              and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)):
        raise ValueError(f'"prompt" must be a string or a non-empty list of token ids (integers >= 0), '
                         f"got {json.dumps(prompt)[:60]}")
    return FilePrompt(number, prompt, SamplingParams(**{**defaults, **entry}))
