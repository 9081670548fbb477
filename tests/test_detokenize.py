"""The server's streaming text (serving/detokenize.TextStream) against the tokenizer's decode of
the whole completion: the deltas add up to it, never split a character, stop at the first stop
string, and decoding stays linear in the completion's length."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from otvllm.serving.detokenize import TextStream
from otvllm.synthetic import byte_level_tokenizer

TEXT = "Grüße, señor! Ça va? 東京 🚀 done — naïve café. "


def metaspace_tokenizer():
    """A sentencepiece-style tokenizer (a '▁' marks a word's leading space, dropped at the start
    of a decode), as Llama 2 and Mistral have."""
    words = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", ".", "▁a", "!", "<unk>", "</s>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def stream(tokenizer, ids, stop=(), seed=0):
    """The deltas of `ids` fed in random chunks of 1-3 tokens, the last one final."""
    rng = random.Random(seed)
    text, deltas, at = TextStream(tokenizer, list(stop)), [], 0
    while at < len(ids):
        n = rng.randint(1, 3)
        deltas.append(text.add(ids[at:at + n], final=at + n >= len(ids)))
        at += n
        if text.stopped:
            break
    return text, deltas


@pytest.mark.parametrize("make, sample", [(byte_level_tokenizer, TEXT * 3),
                                          (metaspace_tokenizer, "the cat sat on a mat. the cat sat!" * 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deltas_add_up_to_the_decode_of_the_whole_completion(make, sample, seed):
    tokenizer = make()
    ids = tokenizer.encode(sample)
    text, deltas = stream(tokenizer, ids, seed=seed)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == whole == text.text
    assert not any("\ufffd" in d for d in deltas)   # a character's bytes are held until all arrived


def test_an_incomplete_character_at_the_end_is_flushed_by_the_final_delta():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode("ok 🚀")[:-1]   # the rocket's last byte never comes
    text, deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) and deltas[-1].endswith("\ufffd")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_stop_string_ends_the_text_where_it_begins_at_the_token_that_completes_it(seed):
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode(TEXT * 2)
    whole = tokenizer.decode(ids)
    stops = ["東京", "va?"]
    text, deltas = stream(tokenizer, ids, stop=stops, seed=seed)
    first = min(whole.find(s) for s in stops)
    assert text.stopped and "".join(deltas) == text.text == whole[:first]
    # the token that completed the stop string was the last one taken
    completed = next(n for n in range(1, len(ids) + 1) if "va?" in tokenizer.decode(ids[:n]))
    assert text.num_tokens == completed


def test_decoding_is_linear_in_the_completion_length():
    tokenizer = byte_level_tokenizer()
    decoded = []
    decode = tokenizer.decode

    def counting(ids, **kwargs):
        decoded.append(len(ids))
        return decode(ids, **kwargs)

    tokenizer.decode = counting
    ids = tokenizer.encode(TEXT * 40)   # about 2,500 tokens, one at a time as streaming sends them
    text = TextStream(tokenizer, [])
    out = "".join(text.add([t], final=i == len(ids) - 1) for i, t in enumerate(ids))
    assert out == decode(ids)
    assert sum(decoded) < 10 * len(ids)   # the whole prefix at every token would be ~len(ids)**2 / 2
