"""Tokenizers behind one small interface (vocab_size, pad_id, eos_id, bos_id, encode, decode, fingerprint,
source): a SentencePiece model file (`Tokenizer`, the embedded demo's) or a Hugging Face tokenizer directory
(`HFTokenizer`, the paper's models). `load_tokenizer(path)` picks by the path.

`Tokenizer`: a small SentencePiece model trained in well under a second. Special ids are fixed: pad 0,
unk 1, bos 2, eos 3. Text is kept exactly as written (identity normalisation, no dummy prefix, whitespace
not collapsed) and every digit is its own piece (``split_digits``), so ``decode(encode(s)) == s`` for any
string over the training alphabet and any digit string, seen or not. A character outside the alphabet
makes `encode` raise ValueError, never a silent ``<unk>``; train with ``byte_fallback=True`` to cover any
UTF-8 text (adds 256 byte pieces).

`fingerprint()` identifies the vocabulary: the SHA-256 of the serialized SentencePiece model (pieces,
scores, special ids, normaliser), or of a Hugging Face tokenizer's token -> id map. The trainer compares
the teacher's and the student's (`check_same_tokenizer`) before any rollout.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Callable, Sequence

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
        return _checked_decode(self._processor.decode, ids, self.vocab_size, errors, "Tokenizer.decode")

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


class HFTokenizer:
    """A Hugging Face tokenizer directory (tokenizer.json / tokenizer_config.json, loaded with
    `transformers.AutoTokenizer`) behind the interface of `Tokenizer`.

    - vocab_size = len(tokenizer): the base vocabulary plus added special tokens (151665 for Qwen2.5 and
      DeepSeek-R1-Distill-Qwen, fewer than the 151936 / 152064 embedding rows of their checkpoints).
    - eos_id: the model's stop token: the first `eos_token_id` of the directory's generation_config.json
      when it has one, else the tokenizer's EOS token (ValueError when neither exists).
    - pad_id: the tokenizer's pad token, or eos_id when it has none (padding is masked out of every loss).
    - bos_id: the tokenizer's BOS token, or None (Qwen2/Qwen3 have none); `encode(add_bos=True)` adds it
      when it exists.
    - encode never adds the tokenizer's own special tokens; decode skips special tokens.
    """

    def __init__(self, hf_tokenizer, source: str, generation_eos_id: int | None = None):
        self._tokenizer = hf_tokenizer
        self._vocab_size = len(hf_tokenizer)
        self.source = source
        eos_id = hf_tokenizer.eos_token_id if generation_eos_id is None else generation_eos_id
        if eos_id is None:
            raise ValueError(f"{source}: the tokenizer has no EOS token and there is no generation_config.json "
                             "eos_token_id: responses could not stop")
        if not 0 <= eos_id < self.vocab_size:
            raise ValueError(f"{source}: EOS id {eos_id} is outside the tokenizer's vocabulary [0, {self.vocab_size})")
        self._eos_id = int(eos_id)
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HFTokenizer":
        """Load the tokenizer of `directory` (local files only), with generation_config.json's EOS if present."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist")
        if not any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            raise ValueError(f"{directory} is not a Hugging Face tokenizer directory: it has neither "
                             "tokenizer.json nor tokenizer_config.json")
        from transformers import AutoTokenizer

        try:
            hf_tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as error:  # transformers raises OSError, ValueError, KeyError, ... on bad files
            raise ValueError(f"{directory}: cannot load the Hugging Face tokenizer ({error})") from None
        generation_eos_id = None
        generation_config = os.path.join(directory, "generation_config.json")
        if os.path.isfile(generation_config):
            with open(generation_config) as handle:
                eos = json.load(handle).get("eos_token_id")
            eos = eos[0] if isinstance(eos, list) and eos else eos
            if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int)):
                raise ValueError(f"{generation_config}: eos_token_id must be an int or a list of ints, got {eos!r}")
            generation_eos_id = eos
        return cls(hf_tokenizer, source=directory, generation_eos_id=generation_eos_id)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        pad = self._tokenizer.pad_token_id
        return self._eos_id if pad is None else int(pad)

    @property
    def bos_id(self) -> int | None:
        return self._tokenizer.bos_token_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        return self._tokenizer.get_vocab()

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the token -> id map: equal iff every id names the same token in both."""
        if self._fingerprint is None:
            text = json.dumps(sorted(self.vocab().items()), ensure_ascii=False)
            self._fingerprint = hashlib.sha256(text.encode()).hexdigest()
        return self._fingerprint

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    def apply_chat_template(self, text: str) -> str:
        """`text` as one user turn followed by the assistant's generation prompt, in the tokenizer's chat
        template (which writes its own BOS, if any); ValueError when the tokenizer has no chat template."""
        if not self.has_chat_template:
            raise ValueError(f"the tokenizer of {self.source} has no chat template")
        return self._tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` (special tokens written in it, e.g. by a chat template, become their ids);
        ValueError when the tokenizer maps part of it to its unknown token."""
        if not isinstance(text, str):
            raise TypeError(f"HFTokenizer.encode expects a str, got {type(text).__name__}")
        ids = list(self._tokenizer.encode(text, add_special_tokens=False))
        unk = self._tokenizer.unk_token_id
        if unk is not None and unk in ids:
            raise ValueError(f"{self.source}: part of {text[:80]!r} encodes to the unknown token {unk}")
        bos = [self.bos_id] if add_bos and self.bos_id is not None else []
        return bos + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], errors: str = "strict") -> str:
        """Text of `ids` without special tokens; ids outside [0, vocab_size) as in `Tokenizer.decode`."""
        return _checked_decode(lambda chunk: self._tokenizer.decode(chunk, skip_special_tokens=True), ids,
                               self.vocab_size, errors, "HFTokenizer.decode")

    def __repr__(self) -> str:
        return (f"HFTokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
                f"fingerprint={self.fingerprint()[:12]})")


def _checked_decode(decode: Callable[[list[int]], str], ids: Sequence[int], vocab_size: int, errors: str,
                    caller: str) -> str:
    """`decode(ids)` after checking every id is in [0, vocab_size): errors="strict" raises ValueError naming
    the first one outside, errors="replace" decodes each of them to U+FFFD."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"{caller}: errors must be 'strict' or 'replace', got {errors!r}")
    ids = [int(i) for i in ids]
    bad = [position for position, token in enumerate(ids) if not 0 <= token < vocab_size]
    if not bad:
        return decode(ids)
    if errors == "strict":
        raise ValueError(f"{caller}: id {ids[bad[0]]} at position {bad[0]} is outside the vocabulary [0, {vocab_size})")
    pieces, start = [], 0
    for position in bad + [len(ids)]:
        pieces.append(decode(ids[start:position]))
        start = position + 1
    return "\ufffd".join(pieces)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """A SentencePiece model file (`Tokenizer`) or a Hugging Face tokenizer directory (`HFTokenizer`)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return HFTokenizer.load(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {path!r} does not exist: expected a SentencePiece model file or a "
                                "Hugging Face tokenizer directory")
    if path.endswith(".json"):
        raise ValueError(f"tokenizer {path!r}: pass the Hugging Face tokenizer directory that holds it, not the file")
    return Tokenizer.load(path)


def _first_difference(teacher: HFTokenizer, student: HFTokenizer) -> str:
    """The lowest-id token whose id differs between two (different) token -> id maps."""
    teacher_vocab, student_vocab = teacher.vocab(), student.vocab()
    token, _ = min(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda pair: (pair[1], pair[0]))
    return (f"token {token!r} is id {teacher_vocab.get(token)} in the teacher's and {student_vocab.get(token)} "
            "in the student's")


def check_same_tokenizer(teacher: Tokenizer | HFTokenizer, student: Tokenizer | HFTokenizer) -> None:
    """ValueError naming both tokenizers unless they have the same vocabulary: the same SentencePiece model,
    or the same Hugging Face token -> id map (a SentencePiece model never equals a Hugging Face tokenizer)."""
    if type(teacher) is not type(student):
        raise ValueError(
            f"teacher tokenizer {teacher.source} ({type(teacher).__name__}) and student tokenizer {student.source} "
            f"({type(student).__name__}) are of different kinds: distillation needs one shared vocabulary")
    if teacher.fingerprint() != student.fingerprint():
        detail = f"; {_first_difference(teacher, student)}" if isinstance(teacher, HFTokenizer) else ""
        raise ValueError(
            f"teacher tokenizer {teacher.source} (vocab {teacher.vocab_size}, {teacher.fingerprint()[:12]}) differs "
            f"from student tokenizer {student.source} (vocab {student.vocab_size}, {student.fingerprint()[:12]}"
            f"{detail}): distillation needs one shared vocabulary"
        )
