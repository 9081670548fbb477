"""The model directory's tokenizer, through transformers; None when the directory has none
(then prompts must be token ids and outputs carry no text)."""

import glob
import os


def load_tokenizer(model_dir: str):
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any(glob.glob(os.path.join(model_dir, n)) for n in names):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load the tokenizer of {model_dir!r}: {e}") from e


def tokenize(tokenizer, prompt: str | list[int]) -> list[int]:
    """A prompt's token ids (a string through `tokenizer`); ValueError if it cannot be."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("empty prompt: a prompt needs at least one token")
        if tokenizer is None:
            raise ValueError("the model directory has no tokenizer: pass prompts as lists of token ids")
        return tokenizer.encode(prompt)
    return list(prompt)
