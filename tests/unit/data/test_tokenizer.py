import random
import time

import pytest

from megatron_scope.data.synthetic import TASK_ALPHABET, Difficulty, write_task_files
from megatron_scope.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    check_same_tokenizer,
    train_tokenizer,
)


def test_special_ids_and_small_vocab(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert 20 <= tokenizer.vocab_size <= 64
    pieces = tokenizer.pieces()
    assert pieces[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert all(digit in pieces for digit in "0123456789")


def test_round_trip_on_the_corpus(task_files, tokenizer):
    lines = open(task_files.corpus_txt).read().splitlines()
    for line in lines:
        assert tokenizer.decode(tokenizer.encode(line)) == line
    # one piece per digit: a number's tokens are its digits
    assert tokenizer.encode("Q: 1234=")[3:7] == [tokenizer.encode(d)[0] for d in "1234"]


def test_round_trip_on_unseen_digit_strings_and_spacing(tokenizer):
    rng = random.Random(0)
    for length in range(1, 40):
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        for text in (digits, f"Q: {digits}*{digits[::-1]}=", f"A: -{digits}", f"  {digits}  ;;  A:{digits}"):
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bos_eos_and_decode_skips_control_ids(tokenizer):
    ids = tokenizer.encode("7+5=", add_bos=True, add_eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and UNK_ID not in ids
    assert tokenizer.decode(ids + [PAD_ID, PAD_ID]) == "7+5="


def test_unencodable_text_and_out_of_range_ids_raise(tokenizer):
    with pytest.raises(ValueError, match=r"\['x', 'é'\]"):
        tokenizer.encode("Q: 1x2é=")
    with pytest.raises(ValueError, match=f"id {tokenizer.vocab_size} at position 1"):
        tokenizer.decode([5, tokenizer.vocab_size])
    with pytest.raises(ValueError, match="id -1"):
        tokenizer.decode([-1])


def test_byte_fallback_covers_any_text(task_files, tmp_path):
    tokenizer = train_tokenizer(task_files.corpus_txt, tmp_path / "bytes.model", byte_fallback=True)
    text = "héllo\n\tworld ⁇ 12"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_training_is_fast_deterministic_and_save_load_round_trips(task_files, tokenizer, tmp_path):
    start = time.perf_counter()
    again = train_tokenizer(task_files.corpus_txt, tmp_path / "again.model", required_chars=TASK_ALPHABET)
    assert time.perf_counter() - start < 5.0
    assert again.fingerprint() == tokenizer.fingerprint()  # model bytes carry no paths
    assert (tmp_path / "again.model").read_bytes() == open(tokenizer.source, "rb").read()
    again.save(tmp_path / "copy.model")
    loaded = Tokenizer.load(tmp_path / "copy.model")
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.encode("Q: 3*4=") == tokenizer.encode("Q: 3*4=")
    check_same_tokenizer(tokenizer, loaded)


def test_fingerprint_differs_for_a_different_model(task_files, tokenizer, tmp_path):
    other_task = write_task_files(tmp_path / "other", 500, 10, seed=9, difficulty=Difficulty(operations="+"))
    different = [
        train_tokenizer(other_task.corpus_txt, tmp_path / "other.model", required_chars=TASK_ALPHABET),
        train_tokenizer(task_files.corpus_txt, tmp_path / "char.model", model_type="char", required_chars=TASK_ALPHABET),
    ]
    for other in different:
        assert other.fingerprint() != tokenizer.fingerprint()
        with pytest.raises(ValueError, match="differs from student tokenizer"):
            check_same_tokenizer(tokenizer, other)


def test_bad_files_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        Tokenizer.load(tmp_path / "junk.model")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer(tmp_path / "nope.txt", tmp_path / "m.model")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(tmp_path / "empty.txt", tmp_path / "m.model")
    (tmp_path / "c.txt").write_text("Q: 1+2=1+2=3 ; A: 3\n")
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(tmp_path / "c.txt", tmp_path / "m.model", model_type="word")
    assert not (tmp_path / "m.model").exists()


def test_decode_replace_marks_ids_of_a_padded_vocabulary(tokenizer):
    ids = tokenizer.encode("A: 12")
    padded = [ids[0], tokenizer.vocab_size + 5] + ids[1:] + [127, tokenizer.eos_id]
    assert tokenizer.decode(padded, errors="replace") == "A\ufffd: 12\ufffd"
    with pytest.raises(ValueError, match="errors must be"):
        tokenizer.decode(ids, errors="ignore")
