"""`otvllm serve`: the OpenAI-compatible HTTP server, tested as a subprocess through the
official `openai` client (and raw HTTP where the client would hide the wire format).

Every greedy output is checked against the offline engine (`otvllm.LLM`) on the same model,
and every token count against the model's own tokenizer (transformers.AutoTokenizer)."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from otvllm.synthetic import SYNTHETIC_NAME, synthetic_model_dir, write_model  # noqa: E402

HOST = "127.0.0.1"
BLOCK_SIZE = 16
MAIN_MAX_MODEL_LEN = 128
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
READY_TIMEOUT_S = 120
QUEUED_TOKENS = 250   # about 1.5 s alone on one CPU core: the burst of 12 arrives well within it


# ---- servers ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post_raw(port: int, path: str, body: bytes, timeout: float = 30.0) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


class Server:
    """`otvllm serve ...` as a subprocess in its own session; stderr goes to a log file."""

    def __init__(self, args: list[str], cache_dir: str, log_dir, name: str):
        self.port = free_port()
        self.log_path = os.path.join(str(log_dir), f"{name}-{self.port}.log")
        env = dict(os.environ)
        env.update({"OTVLLM_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": "1", "OTVLLM_TRACE_LEVEL": "off",
                    "PYTHONUNBUFFERED": "1"})
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otvllm.cli", "serve", "--host", HOST, "--port", str(self.port),
             "--device", "cpu", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=str(log_dir))
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"otvllm serve exited with {self.proc.returncode} before it was ready:\n"
                                   f"{self.log[-4000:]}")
            try:
                if get(self.port, "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"otvllm serve was not ready within {READY_TIMEOUT_S} s:\n{self.log[-4000:]}")

    def client(self, **kwargs) -> "openai.OpenAI":
        kwargs.setdefault("max_retries", 0)   # a retried 503 or 5xx would hide what the server did
        kwargs.setdefault("timeout", 60)
        return openai.OpenAI(base_url=f"http://{HOST}:{self.port}/v1", api_key="unused", **kwargs)

    def engine_pid(self) -> int:
        """The engine process: the server's child started by multiprocessing's spawn."""
        children = []
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            with open(f"/proc/{self.proc.pid}/task/{tid}/children") as f:
                children += [int(p) for p in f.read().split()]
        engines = [pid for pid in children if b"spawn_main" in _cmdline(pid)]
        assert len(engines) == 1, f"engine processes among the server's children: {engines}"
        return engines[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self._log.close()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _running(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("otvllm-cache"))


@pytest.fixture(scope="module")
def synthetic_dir(cache_dir) -> str:
    """The synthetic model, created here once so that the servers find it in the shared cache."""
    old = os.environ.get("OTVLLM_CACHE_DIR")
    os.environ["OTVLLM_CACHE_DIR"] = cache_dir
    try:
        return synthetic_model_dir()
    finally:
        if old is None:
            del os.environ["OTVLLM_CACHE_DIR"]
        else:
            os.environ["OTVLLM_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> str:
    """A small random model whose byte-level tokenizer has a chat template."""
    path = str(tmp_path_factory.mktemp("chat-model") / "tiny-chat-dir")
    write_model(path, seed=3)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["chat_template"] = CHAT_TEMPLATE
    with open(config_path, "w") as f:
        json.dump(config, f)
    return path


def _start(args, cache_dir, tmp_path_factory, name):
    server = Server(args, cache_dir, tmp_path_factory.mktemp(name), name)
    return server


@pytest.fixture(scope="module")
def server(synthetic_dir, cache_dir, tmp_path_factory):
    """The synthetic model (no --model), max_model_len 128, up to 8 running requests."""
    s = _start(["--block-size", str(BLOCK_SIZE), "--max-model-len", str(MAIN_MAX_MODEL_LEN),
                "--max-num-seqs", "8"], cache_dir, tmp_path_factory, "main")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def chat_server(chat_dir, cache_dir, tmp_path_factory):
    s = _start(["--model", chat_dir, "--served-model-name", "tiny-chat", "--block-size", str(BLOCK_SIZE),
                "--max-model-len", "512"], cache_dir, tmp_path_factory, "chat")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def queue_server(synthetic_dir, cache_dir, tmp_path_factory):
    """One running request at a time, at most 2 waiting."""
    s = _start(["--block-size", str(BLOCK_SIZE), "--max-num-seqs", "1", "--max-queue", "2"],
               cache_dir, tmp_path_factory, "queue")
    yield s
    s.stop()


# ---- references -----------------------------------------------------------------------------

class Reference:
    """The offline engine and the tokenizer of one model directory."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        from otvllm import LLM
        self.llm = LLM(model_dir, device="cpu", trace_level="off", kvcache_block_size=BLOCK_SIZE,
                       max_num_seqs=8, max_model_len=2048)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def generate(self, prompt, max_tokens: int, **params):
        """One request alone, greedy unless told otherwise."""
        from otvllm import SamplingParams
        params.setdefault("temperature", 0.0)
        return self.llm.generate([prompt], SamplingParams(max_tokens=max_tokens, **params), use_tqdm=False)[0]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def ref(synthetic_dir) -> Reference:
    return Reference(synthetic_dir)


@pytest.fixture(scope="module")
def chat_ref(chat_dir) -> Reference:
    return Reference(chat_dir)


def assert_error_body(body: dict, status: int | None = None):
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error


def error_of(exc: "openai.APIStatusError") -> dict:
    body = exc.response.json()
    assert_error_body(body)
    return body["error"]


def assert_still_serving(server: Server, ref: Reference | None = None):
    assert get(server.port, "/health")[0] == 200
    if ref is not None:
        expected = ref.generate("still there?", 8, ignore_eos=True)
        got = server.client().completions.create(model=SYNTHETIC_NAME, prompt="still there?", max_tokens=8,
                                                 temperature=0, extra_body={"ignore_eos": True})
        assert got.choices[0].text == expected.text


# ---- startup, health, models ------------------------------------------------------------------

def test_ready_line_health_and_models(server):
    assert f"otvllm: serving {SYNTHETIC_NAME} on http://{HOST}:{server.port}" in server.log
    assert get(server.port, "/health")[0] == 200
    models = server.client().models.list()
    ids = [m.id for m in models.data]
    assert ids == [SYNTHETIC_NAME]
    assert models.data[0].object == "model"
    status, body = get(server.port, "/v1/models")
    assert status == 200
    body = json.loads(body)
    assert body["object"] == "list" and body["data"][0]["id"] == SYNTHETIC_NAME


# ---- completions --------------------------------------------------------------------------------

def test_greedy_completion_matches_the_offline_engine(server, ref):
    client = server.client()
    prompt = "hello world"
    expected = ref.generate(prompt, 24)
    out = client.completions.create(model=SYNTHETIC_NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert out.object == "text_completion" and out.model == SYNTHETIC_NAME
    assert len(out.choices) == 1 and out.choices[0].index == 0
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == ref.count(prompt) == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = client.completions.create(model=SYNTHETIC_NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert again.choices[0].text == out.choices[0].text


def test_max_tokens_defaults_to_16(server, ref):
    out = server.client().completions.create(model=SYNTHETIC_NAME, prompt="default length", temperature=0,
                                             extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].text == ref.generate("default length", 16, ignore_eos=True).text


def test_a_list_of_prompts_gives_one_choice_per_prompt_in_order(server, ref):
    prompts = ["first prompt", "the second, longer prompt", "3"]
    out = server.client().completions.create(model=SYNTHETIC_NAME, prompt=prompts, max_tokens=12, temperature=0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    by_index = {c.index: c for c in out.choices}
    total_completion = 0
    for i, p in enumerate(prompts):
        expected = ref.generate(p, 12)
        assert by_index[i].text == expected.text, f"prompt {i}"
        assert by_index[i].finish_reason == expected.finish_reason
        total_completion += len(expected.token_ids)
    assert out.usage.prompt_tokens == sum(ref.count(p) for p in prompts)
    assert out.usage.completion_tokens == total_completion
    assert out.usage.total_tokens == out.usage.prompt_tokens + total_completion


def test_token_id_prompts_decode_byte_level_and_honour_ignore_eos(server, ref):
    client = server.client()
    ids = ref.tokenizer.encode("token ids in", add_special_tokens=False)
    k = 20
    expected = ref.generate(ids, k, ignore_eos=True)
    out = client.completions.create(model=SYNTHETIC_NAME, prompt=ids, max_tokens=k, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert len(out.choices) == 1
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == k
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].text == ref.decode(expected.token_ids) == expected.text

    other = [5, 200, 17, 99, 255, 0, 42]
    expected_other = ref.generate(other, k, ignore_eos=True)
    both = client.completions.create(model=SYNTHETIC_NAME, prompt=[ids, other], max_tokens=k, temperature=0,
                                     extra_body={"ignore_eos": True})
    by_index = {c.index: c for c in both.choices}
    assert sorted(by_index) == [0, 1]
    assert by_index[0].text == expected.text
    assert by_index[1].text == ref.decode(expected_other.token_ids)
    assert all(c.finish_reason == "length" for c in both.choices)
    assert both.usage.prompt_tokens == len(ids) + len(other)
    assert both.usage.completion_tokens == 2 * k


def test_streaming_concatenation_equals_the_non_streamed_text(server, ref):
    client = server.client()
    prompt = "stream me"   # the noise model emits partial UTF-8 sequences: the stream must hold them back
    kwargs = dict(model=SYNTHETIC_NAME, prompt=prompt, max_tokens=64, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    assert whole.choices[0].text == ref.generate(prompt, 64, ignore_eos=True).text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1, "a stream of 64 tokens came in one chunk"
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    finish = [c.choices[0].finish_reason for c in text_chunks if c.choices[0].finish_reason]
    assert finish == ["length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == ref.count(prompt)
    assert last.usage.completion_tokens == 64
    assert last.usage.total_tokens == last.usage.prompt_tokens + 64
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_streaming_a_list_of_prompts_keeps_the_choices_apart(server, ref):
    prompts = ["one stream", "another stream"]
    kwargs = dict(model=SYNTHETIC_NAME, prompt=prompts, max_tokens=20, temperature=0,
                  extra_body={"ignore_eos": True})
    chunks = list(server.client().completions.create(stream=True, **kwargs))
    texts = {0: "", 1: ""}
    finish = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    for i, p in enumerate(prompts):
        assert texts[i] == ref.generate(p, 20, ignore_eos=True).text, f"prompt {i}"
    assert finish == {0: "length", 1: "length"}


def test_stream_without_include_usage_has_no_usage_chunk(server):
    chunks = list(server.client().completions.create(model=SYNTHETIC_NAME, prompt="abc", max_tokens=5,
                                                     temperature=0, stream=True,
                                                     extra_body={"ignore_eos": True}))
    assert chunks and all(c.choices for c in chunks)
    assert all(getattr(c, "usage", None) is None for c in chunks)


def test_raw_stream_is_server_sent_events_ending_with_done(server, ref):
    body = json.dumps({"model": SYNTHETIC_NAME, "prompt": "raw", "max_tokens": 6, "temperature": 0,
                       "stream": True, "ignore_eos": True}).encode()
    status, headers, raw = post_raw(server.port, "/v1/completions", body)
    assert status == 200
    assert headers.get("content-type", headers.get("Content-Type", "")).startswith("text/event-stream")
    events = [line for line in raw.decode().split("\n") if line.strip()]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(p["choices"][0]["text"] for p in payloads if p["choices"]) == \
        ref.generate("raw", 6, ignore_eos=True).text


def _stop_candidates(text: str, start: int = 6) -> list[str]:
    """2-character substrings of `text` (from `start` on, no replacement character): the first
    that is plain printable ASCII, the first of all, and the first that ends in a multi-byte
    character (whose first bytes arrive as an incomplete character)."""
    pairs = [text[i:i + 2] for i in range(start, len(text) - 2)]
    pairs = [p for p in pairs if "\ufffd" not in p and p.strip()]
    picks = [[p for p in pairs if p.isascii() and p.isprintable()][:1],
             pairs[:1],
             [p for p in pairs if ord(p[1]) >= 0x80][:1]]
    found = list(dict.fromkeys(p for pick in picks for p in pick))
    assert found, f"no usable stop string in {text!r}"
    return found


def test_stop_strings_cut_the_text_before_them(server, ref):
    client = server.client()
    prompt = "stop here"
    full = ref.generate(prompt, 48, ignore_eos=True).text
    kwargs = dict(model=SYNTHETIC_NAME, prompt=prompt, max_tokens=48, temperature=0,
                  extra_body={"ignore_eos": True})
    for stop in _stop_candidates(full):
        cut = full[:full.index(stop)]
        for stop_param in (stop, [stop], ["\x00never-there\x00", stop]):
            out = client.completions.create(stop=stop_param, **kwargs)
            assert out.choices[0].text == cut, f"stop={stop_param!r}"
            assert out.choices[0].finish_reason == "stop"
            assert out.usage.completion_tokens < 48
        streamed = list(client.completions.create(stop=[stop], stream=True, **kwargs))
        assert "".join(c.choices[0].text for c in streamed if c.choices) == cut, f"streamed, stop={stop!r}"
        assert [c.choices[0].finish_reason for c in streamed
                if c.choices and c.choices[0].finish_reason] == ["stop"]
    absent = client.completions.create(stop=["\x00never-there\x00"], **kwargs)
    assert absent.choices[0].text == full and absent.choices[0].finish_reason == "length"


def test_completion_logprobs(server, ref):
    prompt = "log probabilities"
    n, k = 3, 8
    expected = ref.generate(prompt, k, ignore_eos=True, logprobs=n)
    out = server.client().completions.create(model=SYNTHETIC_NAME, prompt=prompt, max_tokens=k, temperature=0,
                                             logprobs=n, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text == expected.text
    lp = choice.logprobs
    assert lp is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == k
    assert all(isinstance(t, str) for t in lp.tokens)
    assert all(b >= a for a, b in zip(lp.text_offset, lp.text_offset[1:]))
    full_rows = 0
    for i, (chosen, top, ref_entry, ref_id) in enumerate(zip(lp.token_logprobs, lp.top_logprobs,
                                                            expected.logprobs, expected.token_ids)):
        assert chosen <= 0
        assert chosen == pytest.approx(ref_entry[ref_id], abs=1e-3), f"token {i}"
        # Keyed by token text, so distinct byte tokens that decode alike ("\ufffd") may share a key.
        ref_top = sorted(ref_entry.values(), reverse=True)[:n]
        assert 1 <= len(top) <= n, f"token {i}: {top}"
        for value in top.values():
            assert any(value == pytest.approx(r, abs=1e-3) for r in ref_top), f"token {i}: {top} vs {ref_top}"
        assert max(top.values()) <= chosen + 1e-4   # greedy: nothing is more likely than the chosen token
        full_rows += len(top) == n
    assert full_rows > 0, "no token had its top-N logprobs"


def test_no_logprobs_unless_asked(server):
    out = server.client().completions.create(model=SYNTHETIC_NAME, prompt="x", max_tokens=3, temperature=0)
    assert out.choices[0].logprobs is None


def test_sampling_parameters_reach_the_sampler(server, ref):
    client = server.client()
    prompt = "sampling"
    greedy = ref.generate(prompt, 24, ignore_eos=True).text
    kwargs = dict(model=SYNTHETIC_NAME, prompt=prompt, max_tokens=24)

    def text(**params):
        extra = {"ignore_eos": True}
        extra.update(params.pop("extra", {}))
        return client.completions.create(extra_body=extra, **kwargs, **params).choices[0].text

    seeded = text(temperature=1.0, seed=1234)
    assert text(temperature=1.0, seed=1234) == seeded                 # a seed makes sampling reproducible
    assert text(temperature=1.0, seed=4321) != seeded                 # ... and it is used
    assert seeded != greedy                                           # temperature 1 is not greedy
    assert text(temperature=1.0, seed=7, extra={"top_k": 1}) == greedy    # top_k reaches the sampler
    assert text(temperature=1.0, seed=7, top_p=1e-6) == greedy            # and so does top_p
    assert text(temperature=1.0, seed=7, extra={"min_p": 1.0}) == greedy  # and min_p


def test_parameters_at_their_neutral_values_are_accepted_and_change_nothing(server, ref):
    expected = ref.generate("neutral", 12).text
    out = server.client().completions.create(
        model=SYNTHETIC_NAME, prompt="neutral", max_tokens=12, temperature=0, presence_penalty=0,
        frequency_penalty=0.0, logit_bias={}, best_of=1, user="someone",
        extra_body={"repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0, "some_future_field": 7})
    assert out.choices[0].text == expected


def test_penalties_reach_the_sampler_as_offline(server, ref):
    penalties = dict(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3)
    expected = ref.generate("penalised", 16, ignore_eos=True, **penalties)
    assert expected.token_ids != ref.generate("penalised", 16, ignore_eos=True).token_ids
    out = server.client().completions.create(
        model=SYNTHETIC_NAME, prompt="penalised", max_tokens=16, temperature=0,
        presence_penalty=penalties["presence_penalty"], frequency_penalty=penalties["frequency_penalty"],
        extra_body={"ignore_eos": True, "repetition_penalty": penalties["repetition_penalty"]})
    assert out.choices[0].text == expected.text


def test_stop_token_ids_end_the_completion_as_offline(server, ref):
    free = ref.generate("stop here", 16, ignore_eos=True)
    stop = free.token_ids[5]
    expected = ref.generate("stop here", 16, ignore_eos=True, stop_token_ids=[stop])
    assert expected.token_ids == free.token_ids[:free.token_ids.index(stop) + 1]
    out = server.client().completions.create(model=SYNTHETIC_NAME, prompt="stop here", max_tokens=16, temperature=0,
                                             extra_body={"ignore_eos": True, "stop_token_ids": [stop]})
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason == "stop"
    assert out.usage.completion_tokens == len(expected.token_ids)


def test_logit_bias_reaches_the_sampler_as_offline(server, ref):
    plain = ref.generate("bias me", 12, ignore_eos=True)
    bias = {plain.token_ids[0]: -100.0, plain.token_ids[3]: 5.5}
    expected = ref.generate("bias me", 12, ignore_eos=True, logit_bias=bias)
    assert expected.token_ids != plain.token_ids
    out = server.client().completions.create(model=SYNTHETIC_NAME, prompt="bias me", max_tokens=12, temperature=0,
                                             logit_bias={str(t): v for t, v in bias.items()},
                                             extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected.text
    assert out.usage.completion_tokens == len(expected.token_ids)


def test_min_tokens_holds_back_stop_strings_and_stop_token_ids(server, ref):
    """A stop string (or stop token id) met before min_tokens does not end the completion."""
    full = ref.generate("stop here", 24, ignore_eos=True)
    stop = _stop_candidates(full.text, start=0)[0]
    cut_at = next(i for i in range(1, 25) if stop in ref.decode(full.token_ids[:i]))   # tokens until it shows
    assert cut_at < 24
    client = server.client()
    kwargs = dict(model=SYNTHETIC_NAME, prompt="stop here", max_tokens=24, temperature=0, stop=[stop])
    early = client.completions.create(extra_body={"ignore_eos": True}, **kwargs)
    assert early.choices[0].finish_reason == "stop" and early.usage.completion_tokens == cut_at
    assert full.text.count(stop) == 1
    late = client.completions.create(extra_body={"ignore_eos": True, "min_tokens": cut_at + 1}, **kwargs)
    assert late.choices[0].text == full.text and late.choices[0].finish_reason == "length"
    streamed = list(client.completions.create(stream=True, extra_body={"ignore_eos": True, "min_tokens": cut_at + 1},
                                              **kwargs))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full.text
    token = full.token_ids[2]
    expected = ref.generate("stop here", 24, ignore_eos=True, stop_token_ids=[token], min_tokens=6)
    assert len(expected.token_ids) > 6   # not cut at its third token
    out = client.completions.create(model=SYNTHETIC_NAME, prompt="stop here", max_tokens=24, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [token], "min_tokens": 6})
    assert out.choices[0].text == expected.text and out.usage.completion_tokens == len(expected.token_ids)


def test_n_choices_per_prompt_each_sample_with_their_own_seed(server, ref):
    """Choice j of prompt i has index i * n + j and samples as the offline engine does with
    seed + j (vLLM's parallel sampling); usage counts each prompt once."""
    prompts = ["several answers", "and another prompt"]
    out = server.client().completions.create(model=SYNTHETIC_NAME, prompt=prompts, n=3, max_tokens=10, best_of=3,
                                             temperature=1.0, seed=40, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == list(range(6))
    expected = [ref.generate(p, 10, temperature=1.0, seed=40 + j, ignore_eos=True) for p in prompts for j in range(3)]
    assert [c.text for c in out.choices] == [e.text for e in expected]
    assert len({e.text for e in expected}) == 6   # the seeds made them differ
    assert out.usage.prompt_tokens == sum(len(ref.tokenizer.encode(p, add_special_tokens=False)) for p in prompts)
    assert out.usage.completion_tokens == 60
    greedy = server.client().completions.create(model=SYNTHETIC_NAME, prompt=prompts[0], n=2, max_tokens=10,
                                                temperature=0)
    assert [c.text for c in greedy.choices] == [ref.generate(prompts[0], 10).text] * 2


def test_n_streamed_chat_choices_concatenate_to_the_non_streamed_ones(chat_server):
    client = chat_server.client()
    kwargs = dict(model="tiny-chat", messages=MESSAGES, n=3, max_tokens=12, temperature=0.8, seed=7,
                  extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert len({c.message.content for c in whole.choices}) == 3
    texts, roles = ["", "", ""], set()
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.delta.role:
                roles.add(c.index)
    assert texts == [c.message.content for c in whole.choices]
    assert roles == {0, 1, 2}   # each choice opens with its role


def test_a_request_larger_than_the_queue_is_a_400_not_a_retry_later(queue_server):
    with pytest.raises(openai.BadRequestError) as info:
        queue_server.client().completions.create(model=SYNTHETIC_NAME, prompt="many", n=3, max_tokens=2)
    assert "3 sequences" in error_of(info.value)["message"] and "--max-queue 2" in error_of(info.value)["message"]


def test_echo_puts_the_prompt_and_its_logprobs_before_the_completion(server, ref):
    """As lm-evaluation-harness asks for a loglikelihood: echo, logprobs=1, max_tokens=1; the
    prompt tokens' log-probabilities as the offline engine's prompt_logprobs (the first None)."""
    from otvllm import SamplingParams
    prompt = "the quick brown fox"
    offline = ref.llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, logprobs=1, prompt_logprobs=1),
                               use_tqdm=False)[0]
    client = server.client()
    plain = client.completions.create(model=SYNTHETIC_NAME, prompt=prompt, max_tokens=1, temperature=0, echo=True)
    assert plain.choices[0].text == prompt + offline.text and plain.choices[0].logprobs is None
    kwargs = dict(model=SYNTHETIC_NAME, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1)
    out = client.completions.create(**kwargs)
    choice = out.choices[0]
    ids = offline.prompt_token_ids + offline.token_ids
    assert choice.text == prompt + offline.text
    assert choice.logprobs.tokens == [ref.tokenizer.decode([t]) for t in ids]
    expected = [None] + [e[t] for t, e in zip(ids[1:], offline.prompt_logprobs[1:] + offline.logprobs)]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-5)
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])
    assert out.usage.prompt_tokens == len(offline.prompt_token_ids) and out.usage.completion_tokens == 1
    streamed = list(client.completions.create(stream=True, **kwargs))
    parts = [c.choices[0] for c in streamed if c.choices]
    assert "".join(p.text for p in parts) == choice.text
    assert [lp for p in parts for lp in p.logprobs.token_logprobs] == choice.logprobs.token_logprobs
    token_prompt = client.completions.create(model=SYNTHETIC_NAME, prompt=offline.prompt_token_ids, max_tokens=1,
                                             temperature=0, echo=True)
    assert token_prompt.choices[0].text == ref.tokenizer.decode(offline.prompt_token_ids) + offline.text


def expected_prompt_logprobs(reference: Reference, out, n: int) -> list:
    """vLLM's prompt_logprobs, from the offline engine's: the n likeliest (ranks 1..n) and the token."""
    expected = [None]
    for token, logprobs, rank in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], out.prompt_token_ranks[1:]):
        entry = {str(t): {"logprob": v, "rank": i + 1, "decoded_token": reference.tokenizer.decode([t])}
                 for i, (t, v) in enumerate(list(logprobs.items())[:n])}
        entry[str(token)] = {"logprob": logprobs[token], "rank": rank,
                             "decoded_token": reference.tokenizer.decode([token])}
        expected.append(entry)
    return expected


def test_prompt_logprobs_in_vllm_format(server, ref, chat_server, chat_ref):
    from otvllm import SamplingParams
    prompt = "rank my prompt"
    offline = ref.llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2),
                               use_tqdm=False)[0]
    expected = expected_prompt_logprobs(ref, offline, 2)
    kwargs = dict(model=SYNTHETIC_NAME, prompt=prompt, max_tokens=3, temperature=0, extra_body={"prompt_logprobs": 2})
    out = server.client().completions.create(**kwargs)
    assert out.choices[0].model_extra["prompt_logprobs"] == expected
    assert out.choices[0].text == offline.text and out.choices[0].logprobs is None
    chunks = [c.choices[0] for c in server.client().completions.create(stream=True, **kwargs) if c.choices]
    sent = [c.model_extra["prompt_logprobs"] for c in chunks if c.model_extra.get("prompt_logprobs") is not None]
    assert sent == [expected]   # once, in the choice's first chunk
    ids = chat_prompt_ids(chat_ref, MESSAGES)
    chat_offline = chat_ref.llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=1),
                                         use_tqdm=False)[0]
    chat = chat_server.client().chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=3,
                                                        temperature=0, extra_body={"prompt_logprobs": 1})
    assert chat.model_extra["prompt_logprobs"] == expected_prompt_logprobs(chat_ref, chat_offline, 1)


def test_tokenize_and_detokenize_as_the_tokenizer_does(server, ref, chat_server, chat_ref):
    def post(srv, path, body):
        status, _, raw = post_raw(srv.port, path, json.dumps(body).encode())
        return status, json.loads(raw)

    text = "tokens, please: é"
    status, out = post(server, "/tokenize", {"model": SYNTHETIC_NAME, "prompt": text})
    expected = ref.tokenizer.encode(text)
    assert status == 200 and out == {"count": len(expected), "max_model_len": MAIN_MAX_MODEL_LEN, "tokens": expected}
    status, out = post(server, "/detokenize", {"model": SYNTHETIC_NAME, "tokens": expected})
    assert status == 200 and out == {"prompt": ref.tokenizer.decode(expected)}
    # chat messages: the ids the chat endpoint sends the engine
    status, out = post(chat_server, "/tokenize", {"model": "tiny-chat", "messages": MESSAGES})
    assert status == 200 and out["tokens"] == chat_prompt_ids(chat_ref, MESSAGES)
    for srv, path, body, words in [
        (server, "/detokenize", {"model": SYNTHETIC_NAME, "tokens": [3, 99999]}, "99999"),
        (server, "/tokenize", {"model": SYNTHETIC_NAME}, "either a prompt or messages"),
        (server, "/tokenize", {"model": "nope", "prompt": "x"}, "nope"),
        (server, "/tokenize", {"model": SYNTHETIC_NAME, "messages": MESSAGES}, "chat template"),
    ]:
        status, out = post(srv, path, body)
        assert status in (400, 404) and words in out["error"]["message"], (path, body, out)


def test_concurrent_requests_each_match_the_request_sent_alone(server, ref):
    prompts = [f"concurrent request number {i} " + "x" * (3 * i) for i in range(8)]
    expected = [ref.generate(p, 24) for p in prompts]
    client = server.client()

    def one(p):
        return client.completions.create(model=SYNTHETIC_NAME, prompt=p, max_tokens=24, temperature=0)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, prompts))
    for i, (out, exp) in enumerate(zip(results, expected)):
        assert out.choices[0].text == exp.text, f"request {i}"
        assert out.choices[0].finish_reason == exp.finish_reason, f"request {i}"
        assert out.usage.completion_tokens == len(exp.token_ids), f"request {i}"


# ---- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc_type, status, words", [
    (dict(model="no-such-model"), "NotFoundError", 404, ["no-such-model"]),
    (dict(prompt="p" * 300), "BadRequestError", 400, [str(MAIN_MAX_MODEL_LEN)]),
    (dict(max_tokens=0), "BadRequestError", 400, ["max_tokens"]),
    (dict(max_tokens=-5), "BadRequestError", 400, ["max_tokens"]),
    (dict(n=0), "BadRequestError", 400, ["n must be in [1, 128]"]),
    (dict(n=129), "BadRequestError", 400, ["n must be in [1, 128]", "129"]),
    (dict(temperature=-1), "BadRequestError", 400, ["temperature"]),
    (dict(prompt=[3, 99999]), "BadRequestError", 400, ["99999"]),
    (dict(prompt=""), "BadRequestError", 400, []),
    (dict(logprobs=21), "BadRequestError", 400, ["logprobs", "20"]),
    (dict(presence_penalty=2.5), "BadRequestError", 400, ["presence_penalty", "[-2, 2]"]),
    (dict(frequency_penalty=-3.0), "BadRequestError", 400, ["frequency_penalty"]),
    (dict(extra_body={"repetition_penalty": 0}), "BadRequestError", 400, ["repetition_penalty"]),
    (dict(logit_bias={"99999": 10}), "BadRequestError", 400, ["logit_bias", "99999", "vocabulary"]),
    (dict(logit_bias={"five": 10}), "BadRequestError", 400, ["logit_bias", "'five'"]),
    (dict(logit_bias={"5": 101}), "BadRequestError", 400, ["logit_bias", "[-100, 100]"]),
    (dict(best_of=3), "BadRequestError", 400, ["best_of"]),
    (dict(extra_body={"min_p": 1.5}), "BadRequestError", 400, ["min_p", "[0, 1]"]),
    (dict(extra_body={"min_tokens": 5}), "BadRequestError", 400, ["min_tokens=5", "max_tokens=4"]),
    (dict(extra_body={"stop_token_ids": [-1]}), "BadRequestError", 400, ["stop_token_ids"]),
], ids=["unknown-model", "prompt-too-long", "max-tokens-0", "max-tokens-negative", "n-0", "n-129",
        "temperature-negative",
        "token-id-outside-vocab", "empty-prompt", "logprobs-over-limit", "presence-penalty-range",
        "frequency-penalty-range", "repetition-penalty-zero", "logit-bias-outside-vocab", "logit-bias-key",
        "logit-bias-range", "best-of", "min-p-range", "min-tokens-over-max-tokens", "negative-stop-token-id"])
def test_bad_completion_requests_get_openai_errors(server, kwargs, exc_type, status, words):
    request = dict(model=SYNTHETIC_NAME, prompt="hello", max_tokens=4)
    request.update(kwargs)
    with pytest.raises(getattr(openai, exc_type)) as info:
        server.client().completions.create(**request)
    assert info.value.status_code == status
    message = error_of(info.value)["message"]
    for word in words:
        assert word in message, message
    assert_still_serving(server)


def test_bad_streamed_request_is_an_error_not_a_broken_stream(server):
    with pytest.raises(openai.BadRequestError) as info:
        list(server.client().completions.create(model=SYNTHETIC_NAME, prompt="hello", max_tokens=0, stream=True))
    assert info.value.status_code == 400
    error_of(info.value)


def test_unknown_path_is_a_404_with_an_openai_error_body(server):
    status, raw = get(server.port, "/v1/nothing")
    assert status == 404, raw
    body = json.loads(raw)
    assert_error_body(body)
    assert "/v1/nothing" in body["error"]["message"]


@pytest.mark.parametrize("body", [b'{"model": "x", "prompt": ', b"not json at all", b""],
                         ids=["truncated", "garbage", "empty"])
def test_malformed_json_is_a_400_with_an_openai_error_body(server, ref, body):
    status, _, raw = post_raw(server.port, "/v1/completions", body)
    assert status == 400, raw
    assert_error_body(json.loads(raw))
    assert_still_serving(server, ref)


def test_chat_without_a_chat_template_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=SYNTHETIC_NAME, max_tokens=4,
                                                messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in error_of(info.value)["message"]
    assert_still_serving(server)


# ---- chat -----------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


def chat_prompt_ids(chat_ref: Reference, messages) -> list[int]:
    text = chat_ref.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return chat_ref.tokenizer.encode(text, add_special_tokens=False)


def test_served_model_name(chat_server, chat_dir):
    assert [m.id for m in chat_server.client().models.list().data] == ["tiny-chat"]
    assert f"otvllm: serving tiny-chat on http://{HOST}:{chat_server.port}" in chat_server.log
    with pytest.raises(openai.NotFoundError):
        chat_server.client().completions.create(model=os.path.basename(chat_dir), prompt="hi", max_tokens=2)


def test_chat_completion_goes_through_the_chat_template(chat_server, chat_ref):
    ids = chat_prompt_ids(chat_ref, MESSAGES)
    expected = chat_ref.generate(ids, 20)
    out = chat_server.client().chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=20,
                                                       temperature=0)
    assert out.object == "chat.completion" and out.model == "tiny-chat"
    assert len(out.choices) == 1
    message = out.choices[0].message
    assert message.role == "assistant"
    assert message.content == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.total_tokens == len(ids) + len(expected.token_ids)


def test_chat_max_completion_tokens(chat_server, chat_ref):
    client = chat_server.client()
    for key in ("max_completion_tokens", "max_tokens"):
        out = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, temperature=0,
                                             extra_body={"ignore_eos": True}, **{key: 7})
        assert out.usage.completion_tokens == 7, key
        assert out.choices[0].finish_reason == "length", key
        assert out.choices[0].message.content == chat_ref.generate(chat_prompt_ids(chat_ref, MESSAGES), 7,
                                                                   ignore_eos=True).text


def test_chat_stream_deltas_concatenate_to_the_non_streamed_message(chat_server, chat_ref):
    client = chat_server.client()
    kwargs = dict(model="tiny-chat", messages=MESSAGES, max_tokens=40, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert len(deltas) > 1
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    assert {d.role for d in deltas if d.role} <= {"assistant"}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == len(chat_prompt_ids(chat_ref, MESSAGES))


def test_chat_logprobs(chat_server, chat_ref):
    k, n = 6, 2
    expected = chat_ref.generate(chat_prompt_ids(chat_ref, MESSAGES), k, ignore_eos=True, logprobs=n)
    out = chat_server.client().chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=k,
                                                       temperature=0, logprobs=True, top_logprobs=n,
                                                       extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == k
    for i, (entry, ref_entry, ref_id) in enumerate(zip(content, expected.logprobs, expected.token_ids)):
        assert entry.logprob == pytest.approx(ref_entry[ref_id], abs=1e-3), f"token {i}"
        assert len(entry.top_logprobs) == n
        assert max(t.logprob for t in entry.top_logprobs) == pytest.approx(entry.logprob, abs=1e-4)
    plain = chat_server.client().chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2,
                                                         temperature=0)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("kwargs, exc_type, word", [
    (dict(messages=[]), "BadRequestError", "messages"),
    (dict(n=0), "BadRequestError", "n must be"),
    (dict(temperature=-1), "BadRequestError", "temperature"),
    (dict(max_tokens=0), "BadRequestError", "max_tokens"),
    (dict(model="synthetic-qwen3-v1"), "NotFoundError", "synthetic-qwen3-v1"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
     "BadRequestError", "tools"),
    (dict(response_format={"type": "json_object"}), "BadRequestError", "response_format"),
], ids=["empty-messages", "n-0", "temperature-negative", "max-tokens-0", "unknown-model", "tools",
        "response-format-json"])
def test_bad_chat_requests(chat_server, kwargs, exc_type, word):
    request = dict(model="tiny-chat", messages=MESSAGES, max_tokens=4)
    request.update(kwargs)
    with pytest.raises(getattr(openai, exc_type)) as info:
        chat_server.client().chat.completions.create(**request)
    assert word in error_of(info.value)["message"]
    assert get(chat_server.port, "/health")[0] == 200


def test_malformed_chat_json(chat_server):
    status, _, raw = post_raw(chat_server.port, "/v1/chat/completions", b'{"messages": [')
    assert status == 400
    assert_error_body(json.loads(raw))


# ---- queue limit and client disconnects (one running request at a time) ------------------------------

def _read_sse_events(resp, count: int) -> list[str]:
    events = []
    while len(events) < count:
        line = resp.readline()
        if not line:
            break
        line = line.decode().strip()
        if line.startswith("data: "):
            events.append(line)
    return events


def test_client_disconnect_aborts_the_request(queue_server, ref):
    # 3000 tokens would hold the one running slot for many seconds; dropping the client must free it.
    body = json.dumps({"model": SYNTHETIC_NAME, "prompt": "a very long story", "max_tokens": 3000,
                       "temperature": 0, "stream": True, "ignore_eos": True}).encode()
    conn = http.client.HTTPConnection(HOST, queue_server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = _read_sse_events(resp, 3)
    assert len(events) == 3 and "[DONE]" not in events[-1]
    resp.close()
    conn.sock and conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    expected = ref.generate("after the disconnect", 16, ignore_eos=True)
    start = time.monotonic()
    out = queue_server.client(timeout=20).completions.create(
        model=SYNTHETIC_NAME, prompt="after the disconnect", max_tokens=16, temperature=0,
        extra_body={"ignore_eos": True})
    elapsed = time.monotonic() - start
    assert out.choices[0].text == expected.text
    assert out.usage.completion_tokens == 16
    assert elapsed < 10, f"the next request waited {elapsed:.1f} s: the disconnected one kept running"


def test_queue_limit_rejects_with_503(queue_server, ref):
    client = queue_server.client(timeout=60)

    def one(i):
        try:
            return client.completions.create(model=SYNTHETIC_NAME, prompt=f"queued {i}", max_tokens=QUEUED_TOKENS,
                                             temperature=0, extra_body={"ignore_eos": True})
        except openai.APIStatusError as e:
            return e

    start = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    assert time.monotonic() - start < 60
    rejected = [r for r in results if isinstance(r, openai.APIStatusError)]
    done = [r for r in results if not isinstance(r, openai.APIStatusError)]
    assert all(r.status_code == 503 for r in rejected), [(r.status_code, r.message) for r in rejected]
    assert isinstance(rejected[0], openai.InternalServerError) if rejected else True
    for r in rejected:
        error_of(r)
    # 1 running + 2 waiting take the burst (it arrives within a fraction of the time one request runs).
    assert len(rejected) >= 8, f"{len(rejected)} of 12 rejected"
    assert 2 <= len(done) <= 4, f"{len(done)} of 12 completed"
    for r in done:
        assert r.usage.completion_tokens == QUEUED_TOKENS and r.choices[0].finish_reason == "length"
    first_done = next(i for i, r in enumerate(results) if not isinstance(r, openai.APIStatusError))
    assert done[0].choices[0].text == ref.generate(f"queued {first_done}", QUEUED_TOKENS, ignore_eos=True).text
    assert_still_serving(queue_server, ref)


# ---- SIGTERM: drain, refuse, exit 0 --------------------------------------------------------------------

def _stream_in_background(server: Server, prompt: str, k: int) -> tuple[threading.Thread, dict]:
    """A greedy stream of `k` tokens read by a thread, returned once 3 chunks have come; the
    dict gets the stream's "chunks" when it ends, or its "error"."""
    started, result = threading.Event(), {}

    def stream():
        try:
            chunks = []
            for c in server.client(timeout=60).completions.create(
                    model=SYNTHETIC_NAME, prompt=prompt, max_tokens=k, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                chunks.append(c)
                if len(chunks) >= 3:
                    started.set()
            result["chunks"] = chunks
        except BaseException as e:   # reported by the main thread
            result["error"] = e
        finally:
            started.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert started.wait(30), "the stream never started"
    assert "error" not in result, result.get("error")
    return reader, result


def test_sigterm_drains_the_in_flight_stream_then_exits_0(synthetic_dir, cache_dir, tmp_path_factory, ref):
    server = _start(["--block-size", str(BLOCK_SIZE)], cache_dir, tmp_path_factory, "sigterm")
    try:
        k = 600
        prompt = "drain me"
        reader, result = _stream_in_background(server, prompt, k)
        engine = server.engine_pid()
        os.kill(server.proc.pid, signal.SIGTERM)
        sent = time.monotonic()

        # New connections are refused once shutdown has begun (give it a moment to close the socket).
        refused, in_flight_when_refused = False, False
        while time.monotonic() - sent < 5 and not refused:
            try:
                socket.create_connection((HOST, server.port), timeout=1).close()
                time.sleep(0.1)
            except (ConnectionRefusedError, ConnectionResetError):
                refused = True
                in_flight_when_refused = reader.is_alive()
        assert refused, "the server still accepted connections 5 s after SIGTERM"
        assert in_flight_when_refused, "the stream ended before the listening socket closed: nothing drained"

        reader.join(60)
        assert not reader.is_alive(), "the in-flight stream did not finish"
        assert "error" not in result, f"the in-flight stream broke: {result.get('error')!r}"
        chunks = result["chunks"]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == k
        assert text == ref.generate(prompt, k, ignore_eos=True).text
        code = server.proc.wait(timeout=max(1.0, 30 - (time.monotonic() - sent)))
        assert code == 0, f"exit code {code}:\n{server.log[-3000:]}"
        assert _wait_gone(engine, 10), "the engine process outlived the drained server"
    finally:
        server.stop()


# ---- the engine in a process of its own ----------------------------------------------------------

def test_a_dead_engine_process_is_reported_not_hung_on(synthetic_dir, cache_dir, tmp_path_factory, ref):
    """The engine runs in its own process; when it dies, /health says so, requests get an
    OpenAI error at once, and the server still stops cleanly on SIGTERM."""
    server = _start([], cache_dir, tmp_path_factory, "dead-engine")
    try:
        engine = server.engine_pid()
        assert engine != server.proc.pid
        out = server.client().completions.create(model=SYNTHETIC_NAME, prompt="alive", max_tokens=4, temperature=0)
        assert out.choices[0].text == ref.generate("alive", 4).text

        os.kill(engine, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while get(server.port, "/health")[0] != 503:
            assert time.monotonic() < deadline, "/health still answers 200 after the engine died"
            time.sleep(0.1)
        status, body = get(server.port, "/health")
        assert "engine" in json.loads(body)["error"]["message"]
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as failed:
            server.client(timeout=20).completions.create(model=SYNTHETIC_NAME, prompt="dead", max_tokens=4)
        assert failed.value.status_code == 503 and time.monotonic() - start < 10
        assert "engine" in error_of(failed.value)["message"]

        os.kill(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, server.log[-3000:]
    finally:
        server.stop()


def _serve_traced(tmp_path, cache_dir, files: dict[str, str], port: int | None = None
                  ) -> tuple[subprocess.Popen, str, str]:
    """`otvllm serve`, traced to a file, with `files` (path: source) put first on its Python path;
    returns the process (in its own session), its log and its trace file."""
    inject = tmp_path / "inject"
    for path, source in files.items():
        (inject / path).parent.mkdir(parents=True, exist_ok=True)
        (inject / path).write_text(source)
    log, trace = str(tmp_path / "serve.log"), str(tmp_path / "trace.json")
    env = dict(os.environ, OTVLLM_CACHE_DIR=cache_dir, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")])))
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    command = [sys.executable, "-m", "otvllm.cli", "serve", "--host", HOST, "--port", str(port or free_port()),
               "--device", "cpu", "--trace-level", "step", "--trace-file", trace]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=str(tmp_path))
    return proc, log, trace


def _ended(proc: subprocess.Popen, log: str, timeout: float) -> tuple[int | None, str]:
    """The exit code (None: still running after `timeout`, then killed with its session) and the log."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    with open(log) as f:
        return code, f.read()


def _left_in_session(sid: int) -> list[int]:
    """Live processes of session `sid` (a subprocess started with start_new_session has its pid)."""
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            left.append(int(pid))
    return left


def _assert_session_ends(sid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _left_in_session(sid):
        assert time.monotonic() < deadline, f"left running after the server exited: {_left_in_session(sid)}"
        time.sleep(0.1)


def _span_names(trace_file: str) -> set[str]:
    with open(trace_file) as f:
        return {span["operationName"] for trace in json.load(f)["data"] for span in trace["spans"]}


def test_a_broken_http_instrumentation_is_named_before_the_engine_starts(synthetic_dir, cache_dir, tmp_path):
    """A traced server needs OpenTelemetry's FastAPI instrumentation; when it cannot be imported
    (here its asgiref dependency fails), serve says so and exits 1 before loading any model."""
    proc, log, trace = _serve_traced(tmp_path, cache_dir, {
        "asgiref/__init__.py": "raise ModuleNotFoundError(\"No module named 'asgiref'\")\n"})
    code, out = _ended(proc, log, 60)
    assert code == 1, out
    assert "opentelemetry-instrumentation-fastapi" in out and "asgiref" in out and "Traceback" not in out, out
    names = _span_names(trace)
    assert "otvllm.run" in names and "engine.init" not in names, names


def test_a_port_in_use_is_named_before_the_engine_starts(synthetic_dir, cache_dir, tmp_path):
    with socket.create_server((HOST, 0)) as taken:
        port = taken.getsockname()[1]
        proc, log, trace = _serve_traced(tmp_path, cache_dir, {}, port=port)
        code, out = _ended(proc, log, 60)
    assert code == 1, out
    assert f"otvllm: error: cannot listen on {HOST}:{port}" in out, out
    assert "in use" in out and "Traceback" not in out, out
    names = _span_names(trace)
    assert "otvllm.run" in names and "engine.init" not in names, names


def test_a_failure_after_the_engine_started_ends_the_engine_and_the_server(synthetic_dir, cache_dir, tmp_path):
    """Whatever fails between the engine's start and serving (here the HTTP instrumentation,
    made to raise), the server exits instead of waiting on its engine process, leaves no
    process behind and writes the trace of its start-up."""
    proc, log, trace = _serve_traced(tmp_path, cache_dir, {"sitecustomize.py": (
        "from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor\n"
        "def instrument_app(*args, **kwargs):\n"
        "    raise RuntimeError('injected: the app cannot be instrumented')\n"
        "FastAPIInstrumentor.instrument_app = staticmethod(instrument_app)\n")})
    code, out = _ended(proc, log, 120)
    assert code not in (0, None), out   # None: it hung on its engine
    assert "injected: the app cannot be instrumented" in out, out
    _assert_session_ends(proc.pid, 10)
    assert {"otvllm.run", "engine.init", "model.load"} <= _span_names(trace)


def test_ctrl_c_while_the_engine_loads_keeps_its_start_up_in_the_trace(synthetic_dir, cache_dir, tmp_path):
    """Ctrl-C to the process group while the engine process loads the model (made to take a
    minute here): the server exits 130 at once, leaves no process behind, and its trace shows
    where start-up was: engine.init and model.load, ended by the interrupt."""
    loading = tmp_path / "loading"
    proc, log, trace = _serve_traced(tmp_path, cache_dir, {"sitecustomize.py": (
        "import time\n"
        "import otvllm.core.model_runner as model_runner\n"
        "def load_model(self):\n"
        f"    open({str(loading)!r}, 'w').close()\n"
        "    time.sleep(60)\n"
        "model_runner.ModelRunner.load_model = load_model\n")})
    deadline = time.monotonic() + 60
    while not loading.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the engine never began to load the model"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    code, out = _ended(proc, log, 40)
    assert code == 130, out
    assert "Traceback" not in out, out
    _assert_session_ends(proc.pid, 10)
    with open(trace) as f:
        spans = {span["operationName"]: {t["key"]: t["value"] for t in span["tags"]}
                 for t_ in json.load(f)["data"] for span in t_["spans"]}
    for name in ("otvllm.run", "engine.init", "model.load"):
        assert spans[name].get("error.type") == "KeyboardInterrupt", (name, spans.get(name))
    assert "kv_cache.allocate" not in spans   # start-up ended at the model's load


def test_an_engine_process_killed_while_it_starts_leaves_its_start_up_in_the_trace(synthetic_dir, cache_dir,
                                                                                 tmp_path):
    """The engine process dies (SIGKILL, as the kernel's OOM killer does) while it loads the
    model: the server says so and exits 1, and the trace keeps what start-up had done, its
    phases as they ended and engine.init ended by the export side as interrupted."""
    proc, log, trace = _serve_traced(tmp_path, cache_dir, {"sitecustomize.py": (
        "import os, signal\n"
        "import otvllm.core.model_runner as model_runner\n"
        "def load_model(self):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "model_runner.ModelRunner.load_model = load_model\n")})
    code, out = _ended(proc, log, 60)
    assert code == 1, out
    assert "otvllm: error: the engine process exited with -9 during start" in out, out
    _assert_session_ends(proc.pid, 10)
    with open(trace) as f:
        spans = {span["operationName"]: {t["key"]: t["value"] for t in span["tags"]}
                 for t_ in json.load(f)["data"] for span in t_["spans"]}
    assert {"config.load", "tokenizer.load"} <= spans.keys(), sorted(spans)
    assert spans["engine.init"].get("otvllm.interrupted") is True, spans["engine.init"]
    assert "model.load" not in spans   # it never ended


def test_the_engine_process_ends_with_the_server_even_when_the_server_is_killed(synthetic_dir, cache_dir,
                                                                               tmp_path_factory):
    server = _start([], cache_dir, tmp_path_factory, "killed-server")
    try:
        engine = server.engine_pid()
        os.kill(server.proc.pid, signal.SIGKILL)   # no drain, no goodbye: the engine sees its pipe close
        server.proc.wait(timeout=30)
        assert _wait_gone(engine, 30), "the engine process outlived the server by 30 s"
    finally:
        server.stop()


def test_ctrl_c_to_the_process_group_drains_and_leaves_no_engine(synthetic_dir, cache_dir, tmp_path_factory, ref):
    """Ctrl-C in a terminal signals the whole process group, the engine process included: the
    engine ignores it and keeps computing, the front end drains the running request (it ends
    whole), then stops the engine."""
    server = _start(["--block-size", str(BLOCK_SIZE)], cache_dir, tmp_path_factory, "ctrl-c")
    try:
        engine = server.engine_pid()
        k = 300
        reader, result = _stream_in_background(server, "interrupted", k)
        os.killpg(server.proc.pid, signal.SIGINT)
        reader.join(60)
        assert "error" not in result, f"the running request broke: {result.get('error')!r}"
        chunks = result["chunks"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == \
            ref.generate("interrupted", k, ignore_eos=True).text
        assert server.proc.wait(timeout=30) == 0, server.log[-3000:]
        assert _wait_gone(engine, 10), "the engine process outlived the server"
        assert "Traceback" not in server.log, server.log[-3000:]
    finally:
        server.stop()
