"""transformers' own generation and forward: the independent reference for otvllm's outputs."""

import functools

import torch
import transformers


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None   # generate exactly max_new_tokens
    return model


def hf_greedy(model_dir: str, prompt_ids: list[int], max_new_tokens: int, **generate_options) -> list[int]:
    """`generate_options`: more of generate's own, e.g. its repetition_penalty."""
    model = hf_model(model_dir)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, **generate_options)
    return out[0, len(prompt_ids):].tolist()


def hf_greedy_with_penalties(model_dir: str, prompt_ids: list[int], max_new_tokens: int, presence: float = 0.0,
                             frequency: float = 0.0, repetition: float = 1.0) -> list[int]:
    """Greedy over transformers' forward, one token at a time, each step's logits penalised as
    vLLM does: the repetition penalty over the prompt's and the output's tokens (as transformers'
    generate applies it), then OpenAI's frequency and presence penalties over the output's
    (transformers' generate has neither of these)."""
    model, ids, out = hf_model(model_dir), list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            for token in set(ids):
                logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
            for token in set(out):
                logits[token] -= presence + frequency * out.count(token)
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


def hf_logprobs(model_dir: str, token_ids: list[int]) -> torch.Tensor:
    """log-softmax of the logits at every position: [len(token_ids), vocab]."""
    with torch.no_grad():
        logits = hf_model(model_dir)(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)
