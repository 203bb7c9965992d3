"""Incremental detokenisation on `tokenizers.decoders.DecodeStream`: push token ids, get back the new text.

DecodeStream decodes a short window of ids with the tokenizer's own decoder pipeline and gives out what that
window adds, so whatever the decoder joins or strips (Gemma's "▁" spaces, WordPiece's "##" and the spaces it puts
between words, Metaspace's first-token rule) comes out as `tokenizer.decode` would put it, in linear time.

Two things it cannot take back are held here until they are final:
- a run of byte-fallback pieces (<0x00>..<0xFF>): the ByteFallback decoder decodes a run as one UTF-8 string and
  turns every byte of an invalid run into U+FFFD, so a later byte can change text an earlier one gave (<0x07>
  alone is "\\x07"; followed by <0xC3> and a word, both become U+FFFD). A run is passed to the stream with the
  token that ends it, or at `flush()`;
- special tokens skipped in decoding (and ids past the vocabulary) vanish, so a run looks through them: they are
  held with it.
`flush()` at the end gives whatever is still held (a trailing run, or text the stream kept back because it ended
in an incomplete character), as the difference between `decode(all ids)` and the text given out: the pieces then
add up to `decode(all ids)` exactly. Ids pushed after a flush start a new text, decoded apart from the earlier one.
"""

from __future__ import annotations

import re
from typing import Any

from tokenizers.decoders import DecodeStream

_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


class TextStream:
    """`push(id)` -> the new text (maybe ""); `flush()` -> the rest; `text` is everything given out so far."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        # A transformers fast tokenizer wraps a `tokenizers.Tokenizer`: the stream decodes with that.
        self.backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self._vanish = set(getattr(tokenizer, "all_special_ids", ())) if skip_special_tokens else set()
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self._start = 0  # ids[:_start] were flushed: their text is final
        self._flushed = 0  # characters of the text given out before _start
        self._held: list[int] = []  # ids not yet given to the stream (a byte run and what vanishes inside it)
        self._pieces: list[str] = []
        self._diverged = False  # the stream refused an id (its window no longer agreed): decode at flush only

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        self._held.append(token_id)
        if self._diverged or self._may_join_a_run(token_id):
            return ""
        ids, self._held = self._held, []
        try:
            piece = self._stream.step(self.backend, ids) or ""
        except Exception:  # tokenizers' DecodeStreamError: a decoder whose earlier text changed; stay exact
            self._diverged = True
            return ""
        self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """Everything not given out yet; afterwards the pieces add up to `decode(all ids)`."""
        full, done = self._decode_all(), self.text[self._flushed :]
        rest = full[len(done) :] if full.startswith(done) else ""
        if rest:
            self._pieces.append(rest)
        self._start, self._flushed = len(self.ids), len(self.text)
        self._held, self._diverged = [], False
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        return rest

    def _decode_all(self) -> str:
        """The text of the ids since the last flush, decoded whole (once, at the end: streaming stays linear)."""
        return self.backend.decode(self.ids[self._start :], skip_special_tokens=self.skip_special_tokens)

    def _may_join_a_run(self, token_id: int) -> bool:
        if token_id in self._vanish:
            return True
        piece = self.backend.id_to_token(token_id)
        return piece is None or _BYTE_PIECE.fullmatch(piece) is not None
