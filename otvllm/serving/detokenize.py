"""Text of a growing completion, for streaming: deltas that never split a character, and
stop strings found as soon as they appear (text is held back while it could still become
the start of one).

New tokens are decoded incrementally, in a window: the tokens since the last complete
character plus those before them back to the previous one, as context for the tokenizer's
decoder (a leading-space marker, a byte sequence); the new text is what the window decodes
to beyond its context. Decoding the whole completion at every step instead costs time
quadratic in its length, which at one chunk a step was the server's main cost when
streaming long completions."""


class TextStream:
    def __init__(self, tokenizer, stop: list[str], min_tokens: int = 0):
        """A stop string ends the text only where it appears in the text of the tokens from
        number `min_tokens` on (or reaches into it), as vLLM has it."""
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.min_tokens = min_tokens
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""          # the text so far (cut at a stop string once found)
        self.emitted = 0        # characters of `text` handed out
        self.stopped = False    # a stop string was found: the completion ends here
        self.num_tokens = 0     # tokens that made the text (those after a stop string do not count)
        # token_ids[:read] are in `text`; token_ids[context:read] are the window's context
        self.context = 0
        self.read = 0

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Take new tokens; returns the text that is safe to hand out now."""
        if self.stopped:
            return ""
        for token in token_ids:   # one at a time: a stop string ends the completion at its token
            self.token_ids.append(token)
            self.num_tokens += 1
            if self.stop:
                searched = len(self.text)
                self._decode_new()
                if self.num_tokens >= self.min_tokens and self._find_stop(searched):
                    return self._delta(final=True)
        if not self.stop:
            self._decode_new()
        if final:   # the last bytes, even of an incomplete character
            searched = len(self.text)
            self._decode_new(flush=True)
            if self.stop and self.num_tokens >= self.min_tokens:
                self._find_stop(searched)
        return self._delta(final)

    def _decode_new(self, flush: bool = False) -> None:
        """Append the text of the tokens not yet in `text`, once it ends in a whole character
        (with `flush`, whatever it is)."""
        if self.tokenizer is None or self.read == len(self.token_ids):
            return
        window = self.token_ids[self.context:]
        context = self.tokenizer.decode(window[:self.read - self.context], skip_special_tokens=True)
        text = self.tokenizer.decode(window, skip_special_tokens=True)
        if flush or (len(text) > len(context) and not text.endswith("\ufffd")):
            self.text += text[len(context):]
            self.context, self.read = self.read, len(self.token_ids)

    def _find_stop(self, searched: int) -> bool:
        """Whether a stop string now appears in `text` (it was searched up to `searched`
        characters before); if so, `text` ends where it begins."""
        start = max(0, searched - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i != -1]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def _delta(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end = max(self.emitted, end - self.hold)   # text that may still begin a stop string
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta
