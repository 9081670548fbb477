"""transformers' own generation and forward: the independent reference for otvllm's outputs."""

import functools

import torch
import transformers


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None   # generate exactly max_new_tokens
    return model


def hf_greedy(model_dir: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model = hf_model(model_dir)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def hf_logprobs(model_dir: str, token_ids: list[int]) -> torch.Tensor:
    """log-softmax of the logits at every position: [len(token_ids), vocab]."""
    with torch.no_grad():
        logits = hf_model(model_dir)(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)
