"""TextStream: the streamed text is `tokenizer.decode(all ids)` for every prefix of an output, whatever the decoder.

Four decoders: the synthetic Gemma tokenizer (Replace "▁", ByteFallback, Fuse: byte runs and skipped specials), and
WordLevel vocabularies with a WordPiece decoder (it puts spaces between words, joins "##" pieces), a Metaspace
decoder (strips the first token's space) and a ByteLevel decoder (bytes split across tokens). A stream that just
joins per-token pieces loses WordPiece's spaces (streamed `w187w99w14`, decoded `w187 w99 w14`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from lowmem_paligemma.model.processor import Processor
from lowmem_paligemma.model.text_stream import TextStream

BYTE0 = 109  # <0x00> in the synthetic Gemma vocabulary (synth.tokenizer_vocab)


def _byte(b: int) -> int:
    return BYTE0 + b


def _streamed(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    stream = TextStream(tokenizer, skip_special_tokens)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == stream.text
    return stream.text


def _every_prefix(tokenizer, ids: list[int], skip: bool = True) -> None:
    """One stream over all ids, checked against decode() after every push (flushed on a copy of its state)."""
    for k in range(1, len(ids) + 1):
        assert _streamed(tokenizer, ids[:k], skip) == tokenizer.decode(ids[:k], skip_special_tokens=skip), ids[:k]


@pytest.fixture(scope="module")
def gemma(tiny_pg1_dir: Path):
    return Processor.from_pretrained(tiny_pg1_dir).tokenizer


def test_gemma_byte_runs_specials_and_loc_tokens(gemma) -> None:
    base = 512  # TINY_BASE_VOCAB: <loc0000>; <seg000> at base + 1024
    cases = {
        # <0x07> alone decodes to "\x07", but followed by <0xC3> the run is invalid and both become U+FFFD: a stream
        # that gave "\x07" out at once could not take it back.
        "a valid byte then an invalid one": [300, _byte(0x07), _byte(0xC3), _byte(0x07), 300, 301],
        "a multi-byte character": [300, _byte(0xE6), _byte(0x97), _byte(0xA5), 301],  # 日
        "bytes around a skipped special token": [_byte(0xC3), 1, _byte(0xA9), 2, 302],  # é: <eos> vanishes
        "a byte run at the very end": [300, 301, _byte(0xF0), _byte(0x9F)],
        "loc and seg tokens": [base + 1, base + 1023, base + 1024 + 7, 400, _byte(0x41), base + 2, 1],
        "out-of-vocabulary ids": [300, 1700, _byte(0xC3), 1727, _byte(0xA9), 1700],
        "only specials": [2, 1, 0, 1664],
    }
    for name, ids in cases.items():
        for skip in (True, False):
            assert _streamed(gemma, ids, skip) == gemma.decode(ids, skip_special_tokens=skip), (name, skip)


def test_gemma_random_outputs_every_prefix(gemma) -> None:
    rng = np.random.default_rng(0)
    specials = [0, 1, 2, 3, 4, 106, 107, 108, 1664]
    for trial in range(6):
        kinds = rng.integers(0, 4, 80)  # any id (1728 rows: past the vocabulary too), a byte, a special, UTF-8 lead
        ids = [
            int(rng.integers(0, 1728)) if k == 0 else _byte(int(rng.integers(0, 256))) if k == 1
            else int(rng.choice(specials)) if k == 2 else _byte(int(rng.choice([0xC3, 0xE6, 0xF0, 0x80, 0xA9])))
            for k in kinds
        ]  # fmt: skip
        _every_prefix(gemma, ids, skip=bool(trial % 2))


def _word_level(decoder, vocab: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   clean_up_tokenization_spaces=False)  # fmt: skip


WORDS = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(200)] + [f"##s{i}" for i in range(20)] + [".", ",", "é", "日本"]
METASPACE_WORDS = ["[UNK]", "[PAD]"] + [f"▁w{i}" for i in range(200)] + ["x", "▁", "▁▁y"]
BYTE_WORDS = ["[UNK]", "[PAD]"] + [chr(c) for c in range(0x100, 0x1A0)] + list("abcdĠĊ")  # byte-level characters
DECODERS = {
    "wordpiece": (decoders.WordPiece(prefix="##"), WORDS),
    "metaspace": (decoders.Metaspace(replacement="▁", prepend_scheme="first"), METASPACE_WORDS),
    "bytelevel": (decoders.ByteLevel(), BYTE_WORDS),
}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_other_decoders_every_prefix_of_long_outputs(name) -> None:
    decoder, vocab = DECODERS[name]
    tok = _word_level(decoder, vocab)
    rng = np.random.default_rng(1)
    for trial in range(3):
        ids = [int(i) for i in rng.integers(0, len(vocab), 150)]
        _every_prefix(tok, ids, skip=bool(trial % 2))


def test_wordpiece_keeps_the_spaces_decode_puts_between_words() -> None:
    tok = _word_level(*DECODERS["wordpiece"])
    ids = [tok.convert_tokens_to_ids(w) for w in ("w187", "w99", "##s3", "w14", ".")]
    assert tok.decode(ids) == "w187 w99s3 w14."  # the decoder's cleanup takes the space before "." back
    assert _streamed(tok, ids) == "w187 w99s3 w14."


def test_the_whole_text_is_decoded_once_at_the_end(gemma, monkeypatch) -> None:
    """Each push gives the stream only the new ids (tokenizers' DecodeStream windows them); the whole output is
    decoded once, by flush(): streaming is linear in the output's length."""
    rng = np.random.default_rng(2)
    ids = [int(i) if rng.random() < 0.8 else _byte(int(rng.integers(0, 256))) for i in rng.integers(300, 1600, 2000)]
    calls = []
    original = TextStream._decode_all
    monkeypatch.setattr(TextStream, "_decode_all", lambda self: calls.append(len(self.ids)) or original(self))
    assert _streamed(gemma, ids) == gemma.decode(ids, skip_special_tokens=True)
    assert calls == [len(ids)]


def test_pushing_after_a_flush_goes_on_from_there(gemma) -> None:
    stream = TextStream(gemma)
    first, second = [300, 301, _byte(0xC3)], [_byte(0xA9), 302, 303]
    text = "".join(stream.push(i) for i in first) + stream.flush()
    text += "".join(stream.push(i) for i in second) + stream.flush()
    assert text == stream.text
    # The run cut by the first flush is not joined again: the two parts decode apart, each as decode() gives it.
    assert text == gemma.decode(first, skip_special_tokens=True) + gemma.decode(second, skip_special_tokens=True)
