"""A small SentencePiece tokenizer for the embedded demo, trained in well under a second.

Special ids are fixed: pad 0, unk 1, bos 2, eos 3. Text is kept exactly as written (identity
normalisation, no dummy prefix, whitespace not collapsed) and every digit is its own piece
(``split_digits``), so ``decode(encode(s)) == s`` for any string over the training alphabet and any digit
string, seen or not. A character outside the alphabet makes `encode` raise ValueError, never a silent
``<unk>``; train with ``byte_fallback=True`` to cover any UTF-8 text (adds 256 byte pieces).

`Tokenizer.fingerprint()` is the SHA-256 of the serialized model (pieces, scores, special ids,
normaliser): the trainer compares the teacher's and the student's before any rollout.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Sequence

import sentencepiece

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """A SentencePiece model with strict encode/decode and fixed special ids."""

    def __init__(self, serialized_model: bytes, source: str = "<bytes>"):
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(serialized_model)
        except Exception as error:  # sentencepiece raises RuntimeError/OSError on a bad proto
            raise ValueError(f"{source}: not a SentencePiece model ({error})") from None
        specials = {
            "pad": processor.pad_id(), "unk": processor.unk_id(), "bos": processor.bos_id(), "eos": processor.eos_id()
        }
        expected = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
        if specials != expected:
            raise ValueError(f"{source}: special ids {specials} differ from the required {expected}")
        self._processor = processor
        self._serialized = bytes(serialized_model)
        self.source = source

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a `.model` file written by `save` or by `train_tokenizer`."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path!r} does not exist")
        with open(path, "rb") as handle:
            return cls(handle.read(), source=path)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model file (atomically: a crash leaves no half-written model)."""
        path = os.fspath(path)
        temporary = path + ".tmp"
        with open(temporary, "wb") as handle:
            handle.write(self._serialized)
        os.replace(temporary, path)

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the serialized model: equal iff the two tokenizers are the same model."""
        return hashlib.sha256(self._serialized).hexdigest()

    def pieces(self) -> list[str]:
        """The vocabulary, piece i at index i."""
        return [self._processor.id_to_piece(i) for i in range(self.vocab_size)]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; ValueError naming the characters the model cannot represent."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        ids = self._processor.encode(text)
        if UNK_ID in ids:
            unknown = sorted({c for c in text if UNK_ID in self._processor.encode(c)})
            raise ValueError(f"{self.source}: cannot encode characters {unknown} of {text[:80]!r}")
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    def decode(self, ids: Sequence[int], errors: str = "strict") -> str:
        """Text of `ids`; pad/bos/eos decode to nothing. An id outside [0, vocab_size) (e.g. sampled from a
        model's padded vocabulary) raises ValueError naming it (errors="strict") or decodes to U+FFFD
        (errors="replace", for grading sampled responses: such a response can still be graded)."""
        if errors not in ("strict", "replace"):
            raise ValueError(f"Tokenizer.decode: errors must be 'strict' or 'replace', got {errors!r}")
        ids = [int(i) for i in ids]
        bad = [position for position, token in enumerate(ids) if not 0 <= token < self.vocab_size]
        if not bad:
            return self._processor.decode(ids)
        if errors == "strict":
            raise ValueError(
                f"Tokenizer.decode: id {ids[bad[0]]} at position {bad[0]} is outside the vocabulary "
                f"[0, {self.vocab_size})"
            )
        pieces, start = [], 0
        for position in bad + [len(ids)]:
            pieces.append(self._processor.decode(ids[start:position]))
            start = position + 1
        return "\ufffd".join(pieces)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint()[:12]})"


def train_tokenizer(
    corpus_path: str | os.PathLike,
    model_path: str | os.PathLike,
    vocab_size: int = 64,
    model_type: str = "bpe",
    required_chars: str = "",
    byte_fallback: bool = False,
) -> Tokenizer:
    """Train a SentencePiece model on the text file `corpus_path` (one sentence a line), write it to
    `model_path` and return it. Deterministic: the same corpus and arguments give the same bytes.

    vocab_size is an upper bound: a small corpus can have fewer distinct pieces (the model keeps what it
    finds). required_chars: characters kept in the vocabulary even if the corpus lacks them (e.g.
    synthetic.TASK_ALPHABET; a space there is ignored: the corpus must contain spaces to get "▁").
    model_type: "bpe", "unigram" or "char".
    """
    corpus_path, model_path = os.fspath(corpus_path), os.fspath(model_path)
    if not os.path.isfile(corpus_path):
        raise FileNotFoundError(f"tokenizer corpus {corpus_path!r} does not exist")
    if os.path.getsize(corpus_path) == 0:
        raise ValueError(f"tokenizer corpus {corpus_path!r} is empty")
    if model_type not in ("bpe", "unigram", "char"):
        raise ValueError(f"model_type must be 'bpe', 'unigram' or 'char', got {model_type!r}")
    if vocab_size < 8:
        raise ValueError(f"vocab_size must be >= 8 (4 special ids and some pieces), got {vocab_size}")
    model_bytes = io.BytesIO()
    # Sentences from an iterator and the model into memory: no paths end up in the model's trainer_spec,
    # so the bytes (and the fingerprint) depend only on the corpus text and the arguments.
    with open(corpus_path, encoding="utf-8") as corpus, open(os.devnull, "w") as quiet:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=(line.rstrip("\n") for line in corpus),
            model_writer=model_bytes,
            vocab_size=vocab_size + (256 if byte_fallback else 0),
            model_type=model_type,
            hard_vocab_limit=False,
            character_coverage=1.0,
            required_chars="".join(sorted(set(required_chars) - {" "})),  # space is the meta piece "▁"
            byte_fallback=byte_fallback,
            split_digits=True,
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=1,
            logstream=quiet,
        )
    tokenizer = Tokenizer(model_bytes.getvalue(), source=model_path)
    tokenizer.save(model_path)
    return tokenizer


def check_same_tokenizer(teacher: Tokenizer, student: Tokenizer) -> None:
    """ValueError naming both models unless the teacher and student tokenizers are the same model."""
    if teacher.fingerprint() != student.fingerprint():
        raise ValueError(
            f"teacher tokenizer {teacher.source} (vocab {teacher.vocab_size}, {teacher.fingerprint()[:12]}) differs "
            f"from student tokenizer {student.source} (vocab {student.vocab_size}, {student.fingerprint()[:12]}): "
            "distillation needs one shared vocabulary"
        )
