"""Hugging Face tokenizer directories behind the trainer's tokenizer interface, vocabulary comparison, and the
prompt formats (template, chat template) that decide the rollout prompt ids. Tokenizers are built here with
the `tokenizers` library (WordLevel, whitespace split) and saved with transformers: no downloads."""

import json
import shutil

import pytest

from megatron_scope.data.datasets import PromptDataset, PromptFormat, prompt_token_ids
from megatron_scope.data.tokenizer import HFTokenizer, Tokenizer, check_same_tokenizer, load_tokenizer

WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "Q:", "1", "+", "2", "=", "?", "Answer", "in",
         "\\boxed{}."]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
IDS = {word: index for index, word in enumerate(WORDS)}


def save_word_tokenizer(directory, words=WORDS, chat_template=CHAT_TEMPLATE, bos="<s>", pad=None) -> str:
    """A WordLevel tokenizer over `words` (split on whitespace) saved as a Hugging Face tokenizer directory;
    <|user|> and <|assistant|> are added special tokens."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = BackendTokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token=bos, eos_token="</s>",
                                        pad_token=pad, additional_special_tokens=["<|user|>", "<|assistant|>"])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_word_tokenizer(tmp_path_factory.mktemp("hf_tokenizer"))


def test_load_tokenizer_picks_the_kind_by_path(hf_dir, tokenizer, tmp_path):
    assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
    assert isinstance(load_tokenizer(tokenizer.source), Tokenizer)
    with pytest.raises(FileNotFoundError, match="nothing.*SentencePiece model file or a Hugging Face tokenizer"):
        load_tokenizer(tmp_path / "nothing")
    with pytest.raises(ValueError, match="pass the Hugging Face tokenizer directory"):
        load_tokenizer(f"{hf_dir}/tokenizer.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is not a Hugging Face tokenizer directory"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken: cannot load the Hugging Face tokenizer"):
        load_tokenizer(tmp_path / "broken")


def test_interface_values(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert tok.source == hf_dir
    assert tok.vocab_size == len(WORDS)  # the added special tokens are counted
    assert (tok.bos_id, tok.eos_id) == (IDS["<s>"], IDS["</s>"])
    assert tok.pad_id == tok.eos_id  # no pad token: falls back to EOS
    ids = tok.encode("Q: 1 + 2 =", add_bos=True, add_eos=True)
    assert ids == [IDS[w] for w in ["<s>", "Q:", "1", "+", "2", "=", "</s>"]]
    assert tok.decode(ids) == "Q: 1 + 2 ="  # special tokens skipped
    with pytest.raises(ValueError, match="unknown token 0"):
        tok.encode("Q: 7")
    with pytest.raises(ValueError, match=f"id {len(WORDS)} at position 1 is outside the vocabulary"):
        tok.decode([IDS["1"], len(WORDS)])
    assert tok.decode([IDS["1"], len(WORDS), IDS["2"]], errors="replace") == "1\ufffd2"


def test_pad_bos_and_the_generation_config_eos(tmp_path):
    directory = save_word_tokenizer(tmp_path / "tok", bos=None, pad="<unk>")
    tok = load_tokenizer(directory)
    assert (tok.bos_id, tok.pad_id) == (None, IDS["<unk>"])
    assert tok.encode("1", add_bos=True) == [IDS["1"]]  # no BOS token: nothing added
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": [IDS["?"], IDS["</s>"]]}))
    assert load_tokenizer(directory).eos_id == IDS["?"]  # the model's stop token wins over the tokenizer's EOS
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": 999}))
    with pytest.raises(ValueError, match="EOS id 999 is outside the tokenizer's vocabulary"):
        load_tokenizer(directory)
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="eos_token_id must be an int or a list of ints, got 'x'"):
        load_tokenizer(directory)


def test_check_same_tokenizer_compares_the_vocabularies(hf_dir, tokenizer, tmp_path):
    copy = shutil.copytree(hf_dir, tmp_path / "copy")
    (copy / "chat_template.jinja").unlink()  # no chat template, same vocabulary
    check_same_tokenizer(load_tokenizer(copy), load_tokenizer(hf_dir))
    swapped = list(WORDS)
    swapped[6], swapped[8] = swapped[8], swapped[6]
    other = save_word_tokenizer(tmp_path / "other", words=swapped)
    assert load_tokenizer(other).fingerprint() != load_tokenizer(hf_dir).fingerprint()
    with pytest.raises(ValueError, match=f"teacher tokenizer {other} .* differs from student tokenizer {hf_dir} .*"
                                         "token '1' is id 8 in the teacher's and 6 in the student's"):
        check_same_tokenizer(load_tokenizer(other), load_tokenizer(hf_dir))
    with pytest.raises(ValueError, match="HFTokenizer.*Tokenizer.*different kinds"):
        check_same_tokenizer(load_tokenizer(hf_dir), tokenizer)


def test_prompt_template_and_chat_template_give_the_rollout_ids(hf_dir):
    tok = load_tokenizer(hf_dir)
    plain = prompt_token_ids(tok, "Q: 1 + 2 =")
    assert plain == [IDS[w] for w in ["<s>", "Q:", "1", "+", "2", "="]]
    templated = PromptFormat("{prompt}\nAnswer in \\boxed{}.")
    assert prompt_token_ids(tok, "Q: 1 + 2 =", templated) == plain + [IDS["Answer"], IDS["in"], IDS["\\boxed{}."]]
    chat = PromptFormat("{prompt} ?", chat=True)
    # the chat template writes the BOS itself: "<s><|user|> Q: 1 + 2 = ? <|assistant|>"
    assert prompt_token_ids(tok, "Q: 1 + 2 =", chat) == [
        IDS[w] for w in ["<s>", "<|user|>", "Q:", "1", "+", "2", "=", "?", "<|assistant|>"]]


def test_the_dataset_holds_exactly_the_formatted_ids(hf_dir, tmp_path):
    tok = load_tokenizer(hf_dir)
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "prompt": p, "answer": "3"})
                              for i, p in enumerate(["Q: 1 + 2 =", "Q: 2 + 1 ="])) + "\n")
    fmt = PromptFormat("{prompt}\nAnswer in \\boxed{}.", chat=True)
    dataset = PromptDataset.from_file(path, tokenizer=tok, prompt_format=fmt)
    for prompt in dataset.prompts:
        assert list(prompt.token_ids) == prompt_token_ids(tok, prompt.prompt, fmt)
        assert prompt.token_ids[:2] == (IDS["<s>"], IDS["<|user|>"]) and prompt.token_ids[-1] == IDS["<|assistant|>"]
    assert dataset.prompts[0].prompt == "Q: 1 + 2 ="  # the row's own text is kept
    unformatted = PromptDataset.from_file(path, tokenizer=tok)
    assert list(unformatted.prompts[0].token_ids) == prompt_token_ids(tok, "Q: 1 + 2 =")


def test_bad_formats_fail_before_reading_rows(hf_dir, tokenizer, tmp_path):
    for template in ("no placeholder", "{prompt} and {prompt}"):
        with pytest.raises(ValueError, match="must contain {prompt} exactly once"):
            PromptFormat(template)
    missing = tmp_path / "missing.jsonl"  # never opened: the format is checked first
    with pytest.raises(ValueError, match="needs a Hugging Face tokenizer directory; .*arith.model is a SentencePiece"):
        PromptDataset.from_file(missing, tokenizer=tokenizer, prompt_format=PromptFormat(chat=True))
    bare = load_tokenizer(save_word_tokenizer(tmp_path / "bare", chat_template=None))
    with pytest.raises(ValueError, match="the tokenizer of .*bare has no chat template"):
        PromptDataset.from_file(missing, tokenizer=bare, prompt_format=PromptFormat(chat=True))
    with pytest.raises(ValueError, match="prompt_format needs a tokenizer"):
        PromptDataset.from_file(missing, prompt_format=PromptFormat())


def test_the_trainer_rejects_a_bad_prompt_template(capsys):
    from megatron_scope.arguments import parse_run_config

    required = ["--student-hf", "s", "--teacher-hf", "t", "--tokenizer", "t", "--train-data", "d"]
    data = parse_run_config(required + ["--prompt-template", "{prompt}\nAnswer in \\boxed{}.",
                                        "--apply-chat-template"]).data
    assert (data.prompt_template, data.apply_chat_template) == ("{prompt}\nAnswer in \\boxed{}.", True)
    assert parse_run_config(required).data.prompt_template == "{prompt}"
    with pytest.raises(SystemExit):
        parse_run_config(required + ["--prompt-template", "Solve it."])
    assert "--prompt-template: prompt template must contain {prompt} exactly once" in capsys.readouterr().err
