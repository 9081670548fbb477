"""Text of a growing completion, for streaming: deltas that never split a character, and
stop strings found as soon as they appear (text is held back while it could still become
the start of one)."""


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""          # the text so far (cut at a stop string once found)
        self.emitted = 0        # characters of `text` handed out
        self.stopped = False    # a stop string was found: the completion ends here
        self.num_tokens = 0     # tokens that made the text (those after a stop string do not count)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Take new tokens; returns the text that is safe to hand out now."""
        if self.stopped:
            return ""
        for token in token_ids:   # one at a time: a stop string ends the completion at its token
            self.token_ids.append(token)
            self.num_tokens += 1
            if self.stop and self._find_stop():
                return self._delta(final=True)
        if self.tokenizer is not None and token_ids and not self.stop:
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return self._delta(final)

    def _find_stop(self) -> bool:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        start = max(0, len(self.text) - self.hold - 1)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i != -1]
        self.text = text
        if hits:
            self.text = text[:min(hits)]
            self.stopped = True
        return self.stopped

    def _delta(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end = len(self.text.rstrip("\ufffd"))   # a character whose bytes have not all arrived
            end = max(self.emitted, end - self.hold)   # text that may still begin a stop string
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta
