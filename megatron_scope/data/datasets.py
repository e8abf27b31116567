"""Prompt datasets for on-policy rollouts, and fixed-length SFT tensors for pre-training teacher and student.

Token layout (shared by SFT and rollouts, so the model is sampled in the format it was trained on):
prompt ids = BOS + pieces of the prompt text (`prompt_token_ids`); response ids = pieces of the solution
+ EOS. The rollout engine takes the prompt ids and is stopped by EOS. A `PromptFormat` first places the
text in a template (e.g. "{prompt}\\nPlease reason step by step, ...") and, for chat models, wraps it as one
user turn with the tokenizer's chat template (which then writes its own BOS, if any).

`PromptDataset` reads rows {"id", "prompt", "answer"} and optionally a data source (other keys are ignored; `keys`
maps other column names, e.g. the math benchmarks' {"prompt": "problem"}, as --input-key, --label-key, --id-key and
--data-source-key do) from a JSONL file, a parquet file or a Hugging Face `datasets` directory (`save_to_disk`;
`read_rows`). Every malformed row raises `DatasetFormatError` naming the file and the 1-based line or row, before the
dataset exists. Order: epoch e is a
permutation of the rows drawn from (seed, e) alone; `next_batch` walks it and never crosses an epoch
boundary (a batch that does not fit in the rest of the epoch starts the next one), so a prompt appears at
most once per batch. `state_dict()` holds (epoch, index): a resumed run sees exactly the prompts the
uninterrupted one would have seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from typing import Callable, Iterator, Mapping, Sequence

import torch

from megatron_scope.data.tokenizer import HFTokenizer, Tokenizer

DEFAULT_KEYS = {"id": "id", "prompt": "prompt", "answer": "answer", "data_source": None, "teacher": None}
"""Column of each field in a prompt row (id None: rows are numbered; data_source None: no source; teacher None: no
teacher named per row)."""

PROMPT_PLACEHOLDER = "{prompt}"


class DatasetFormatError(ValueError):
    """A dataset file or one of its rows is malformed (the message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt to roll out."""

    id: str
    """Unique within the dataset."""
    prompt: str
    answer: str
    """The gold answer the verifier compares with."""
    token_ids: tuple[int, ...] | None = None
    """`prompt_token_ids(tokenizer, prompt, prompt_format)` when the dataset was given a tokenizer, else None."""
    data_source: str | None = None
    """The row's data source (its --data-source-key column), e.g. a benchmark or domain; None without one."""
    teacher: str | None = None
    """The teacher the row is routed to (its --teacher-route-key column, a --teacher NAME); None without one."""


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a row's prompt text becomes the text a rollout starts from."""

    template: str = PROMPT_PLACEHOLDER
    """Text with exactly one "{prompt}", replaced literally by the row's prompt (other braces, e.g. the
    \\boxed{} of an instruction, are kept)."""
    chat: bool = False
    """Wrap the templated text as one user turn with the tokenizer's chat template and the assistant's
    generation prompt (Hugging Face tokenizers with a chat template only)."""

    def __post_init__(self):
        if not isinstance(self.template, str) or self.template.count(PROMPT_PLACEHOLDER) != 1:
            raise ValueError(f"prompt template must contain {PROMPT_PLACEHOLDER} exactly once, got {self.template!r}")

    def check(self, tokenizer: Tokenizer | HFTokenizer) -> None:
        """ValueError naming the tokenizer when it cannot apply this format (a chat template it lacks)."""
        if not self.chat:
            return
        if not isinstance(tokenizer, HFTokenizer):
            raise ValueError(f"a chat template needs a Hugging Face tokenizer directory; {tokenizer.source} is a "
                             "SentencePiece model")
        if not tokenizer.has_chat_template:
            raise ValueError(f"the tokenizer of {tokenizer.source} has no chat template")


def prompt_token_ids(tokenizer: Tokenizer | HFTokenizer, prompt: str, prompt_format: PromptFormat | None = None
                     ) -> list[int]:
    """The ids a prompt is rolled out from and trained on: BOS + the pieces of the templated prompt, or,
    with `prompt_format.chat`, the pieces of the chat-templated text (the template writes any BOS)."""
    prompt_format = prompt_format or PromptFormat()
    text = prompt_format.template.replace(PROMPT_PLACEHOLDER, prompt)
    if prompt_format.chat:
        prompt_format.check(tokenizer)
        return tokenizer.encode(tokenizer.apply_chat_template(text))
    return tokenizer.encode(text, add_bos=True)


def read_jsonl_rows(path: str | os.PathLike, error: type[ValueError] = None) -> Iterator[tuple[int, dict]]:
    """(1-based line number, JSON object) per non-blank line; `error` (default DatasetFormatError) naming
    file and line for invalid JSON or a non-object row."""
    error = error or DatasetFormatError
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as decode_error:
                raise error(f"{path}: line {line_number}: invalid JSON ({decode_error.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}: line {line_number}: expected a JSON object, got {type(row).__name__}")
            yield line_number, row


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, str, dict]]:
    """(where, row name, row) per row of a JSONL file, a parquet file (.parquet) or a Hugging Face `datasets`
    directory (`Dataset.save_to_disk`; a `DatasetDict`'s split is its subdirectory): where names the file and the
    1-based line ("<path>: line 3") or row ("<path>: row 3"), the row name is "line-3" or "row-3"."""
    path = os.fspath(path)
    if os.path.isdir(path):
        import datasets

        try:
            table = datasets.load_from_disk(path)
        except FileNotFoundError as error:
            raise DatasetFormatError(f"{path}: not a Hugging Face datasets directory ({error})") from None
        if isinstance(table, datasets.DatasetDict):
            raise DatasetFormatError(f"{path}: a DatasetDict with splits {sorted(table)}: give one split's directory, "
                                     f"e.g. {os.path.join(path, sorted(table)[0])}")
        rows = iter(table)
    elif path.endswith(".parquet"):
        import pyarrow.parquet

        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset file {path!r} does not exist")
        rows = iter(pyarrow.parquet.read_table(path).to_pylist())
    else:
        for line_number, row in read_jsonl_rows(path):
            yield f"{path}: line {line_number}", f"line-{line_number}", row
        return
    for number, row in enumerate(rows, start=1):
        yield f"{path}: row {number}", f"row-{number}", row


def _string_field(row: dict, key: str, field: str, where: str, allow_int: bool) -> str:
    if key not in row:
        raise DatasetFormatError(f"{where}: missing key {key!r} ({field}); the row has {sorted(row)}")
    value = row[key]
    if value is None:  # a column of a parquet file or datasets directory without a value in this row
        raise DatasetFormatError(f"{where}: {key!r} ({field}) is null")
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        kinds = "a str or an int" if allow_int else "a str"
        raise DatasetFormatError(f"{where}: {key!r} ({field}) must be {kinds}, got {value!r}")
    if not value.strip():
        raise DatasetFormatError(f"{where}: {key!r} ({field}) is empty")
    return value


class PromptDataset:
    """Prompts from a JSONL file, served in a seeded, resumable order."""

    def __init__(self, prompts: Sequence[Prompt], seed: int = 0, source: str = "<memory>"):
        if not prompts:
            raise DatasetFormatError(f"{source}: no prompts")
        seen: dict[str, int] = {}
        for index, prompt in enumerate(prompts):
            if prompt.id in seen:
                raise DatasetFormatError(
                    f"{source}: prompt {index} repeats the id {prompt.id!r} of prompt {seen[prompt.id]}"
                )
            seen[prompt.id] = index
        self.prompts = tuple(prompts)
        self.seed = int(seed)
        self.source = source
        self.epoch = 0
        self.index = 0
        digest = hashlib.sha256()
        for prompt in self.prompts:
            fields = [prompt.id, prompt.prompt, prompt.answer]
            if prompt.data_source is not None:
                fields.append(prompt.data_source)
            if prompt.teacher is not None:
                fields.append({"teacher": prompt.teacher})
            digest.update(json.dumps(fields).encode())
        self.content_digest = digest.hexdigest()
        """SHA-256 of the ids, prompts, answers, data sources and teachers in file order (a resume must find the same
        data)."""
        self._order_epoch = -1
        self._order: list[int] = []

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        seed: int = 0,
        tokenizer: Tokenizer | HFTokenizer | None = None,
        keys: Mapping[str, str | None] | None = None,
        check_answer: Callable[[str, str | None], object] | None = None,
        prompt_format: PromptFormat | None = None,
    ) -> "PromptDataset":
        """Load `path` (`read_rows`: JSONL, parquet or a `datasets` directory). keys: {"id", "prompt", "answer",
        "data_source", "teacher"} -> column name, merged over DEFAULT_KEYS; an id column of None numbers the rows ("line-<n>",
        "row-<n>"). With a tokenizer, each prompt is encoded here (`prompt_token_ids` with `prompt_format`), and
        one it cannot encode is a DatasetFormatError naming the row. check_answer(answer, data_source) (e.g. a
        wrapper of synthetic.canonical_answer) is called on each row; its ValueError names the row too. `Prompt.prompt`
        keeps the row's own text."""
        path = os.fspath(path)
        keys = {**DEFAULT_KEYS, **(keys or {})}
        unknown = set(keys) - set(DEFAULT_KEYS)
        if unknown:
            raise ValueError(f"keys: unknown fields {sorted(unknown)}; expected some of {sorted(DEFAULT_KEYS)}")
        if prompt_format is not None:
            if tokenizer is None:
                raise ValueError("prompt_format needs a tokenizer: it only shapes the prompts' token ids")
            prompt_format.check(tokenizer)
        prompts: list[Prompt] = []
        id_rows: dict[str, str] = {}
        for where, row_name, row in read_rows(path):
            if keys["id"] is None:
                prompt_id = row_name
            else:
                prompt_id = _string_field(row, keys["id"], "id", where, allow_int=True).strip()
            text = _string_field(row, keys["prompt"], "prompt", where, allow_int=False)
            answer = _string_field(row, keys["answer"], "answer", where, allow_int=True).strip()
            source = None
            if keys["data_source"] is not None:
                source = _string_field(row, keys["data_source"], "data source", where, allow_int=False).strip()
            teacher = None
            if keys["teacher"] is not None:
                teacher = _string_field(row, keys["teacher"], "teacher", where, allow_int=False).strip()
            if check_answer is not None:
                try:
                    check_answer(answer, source)
                except ValueError as error:
                    raise DatasetFormatError(f"{where}: bad answer: {error}") from None
            if prompt_id in id_rows:
                raise DatasetFormatError(f"{where}: id {prompt_id!r} repeats the id of {id_rows[prompt_id]}")
            id_rows[prompt_id] = where.rpartition(": ")[2]
            token_ids = None
            if tokenizer is not None:
                try:
                    token_ids = tuple(prompt_token_ids(tokenizer, text, prompt_format))
                except ValueError as error:
                    raise DatasetFormatError(f"{where}: prompt cannot be tokenized: {error}") from None
            prompts.append(Prompt(prompt_id, text, answer, token_ids, source, teacher))
        if not prompts:
            raise DatasetFormatError(f"{path}: no rows")
        return cls(prompts, seed=seed, source=path)

    def __len__(self) -> int:
        return len(self.prompts)

    def epoch_order(self, epoch: int) -> list[int]:
        """Row indices in the order of `epoch`: a permutation that depends only on (seed, epoch)."""
        if epoch != self._order_epoch:
            order = list(range(len(self.prompts)))
            random.Random(f"prompt-dataset-{self.seed}-{epoch}").shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def next_batch(self, num_prompts: int) -> list[Prompt]:
        """The next `num_prompts` prompts (all distinct); starts a new epoch when the current one has too few."""
        if not 1 <= num_prompts <= len(self.prompts):
            raise ValueError(f"num_prompts must be in [1, {len(self.prompts)}] (the dataset size), got {num_prompts}")
        if self.index + num_prompts > len(self.prompts):
            self.epoch, self.index = self.epoch + 1, 0
        order = self.epoch_order(self.epoch)
        batch = [self.prompts[i] for i in order[self.index:self.index + num_prompts]]
        self.index += num_prompts
        return batch

    def state_dict(self) -> dict:
        """The position (epoch, index) and what it is a position in (seed, size, content digest)."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_prompts": len(self.prompts),
            "content_digest": self.content_digest,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume at `state`'s position; ValueError (and no change) if it was saved for other data or seed."""
        missing = {"epoch", "index", "seed", "num_prompts", "content_digest"} - set(state)
        if missing:
            raise ValueError(f"PromptDataset state lacks {sorted(missing)}: {dict(state)}")
        expected = {"seed": self.seed, "num_prompts": len(self.prompts), "content_digest": self.content_digest}
        for key, mine in expected.items():
            if state[key] != mine:
                raise ValueError(
                    f"PromptDataset state was saved with {key}={state[key]!r}, this dataset ({self.source}) has {mine!r}"
                )
        epoch, index = state["epoch"], state["index"]
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(index, int) and 0 <= index <= len(self.prompts)):
            raise ValueError(f"PromptDataset state has an invalid position epoch={epoch!r}, index={index!r}")
        self.epoch, self.index = epoch, index


def load_sft_pairs(
    path: str | os.PathLike, prompt_key: str = "prompt", solution_key: str = "solution"
) -> list[tuple[str, str]]:
    """(prompt, solution) pairs of a JSONL file such as synthetic.write_task_files' train.jsonl."""
    pairs = []
    for line_number, row in read_jsonl_rows(path):
        where = f"{os.fspath(path)}: line {line_number}"
        pairs.append((
            _string_field(row, prompt_key, "prompt", where, allow_int=False),
            _string_field(row, solution_key, "solution", where, allow_int=False),
        ))
    if not pairs:
        raise DatasetFormatError(f"{os.fspath(path)}: no rows")
    return pairs


def build_sft_tensors(
    pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, seq_length: int
) -> dict[str, torch.Tensor]:
    """Fixed-length SFT tensors [N, seq_length] in the layout of Megatron's GPT batches.

    Row i is the sequence BOS + prompt + solution + EOS, shifted: tokens = sequence[:-1], labels =
    sequence[1:], both padded with pad_id. loss_mask (float) is 1 exactly where the label is a solution
    token or the EOS. position_ids = 0..seq_length-1. A sequence longer than seq_length + 1 raises
    ValueError naming the pair (never truncated).
    """
    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2, got {seq_length}")
    if not pairs:
        raise ValueError("build_sft_tensors: no (prompt, solution) pairs")
    count = len(pairs)
    tokens = torch.full((count, seq_length), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((count, seq_length), tokenizer.pad_id, dtype=torch.long)
    loss_mask = torch.zeros((count, seq_length), dtype=torch.float)
    for row, (prompt, solution) in enumerate(pairs):
        prompt_ids = prompt_token_ids(tokenizer, prompt)
        response_ids = tokenizer.encode(solution, add_eos=True)
        if len(response_ids) < 2:
            raise ValueError(f"build_sft_tensors: pair {row} has an empty solution ({prompt!r}, {solution!r})")
        sequence = prompt_ids + response_ids
        if len(sequence) - 1 > seq_length:
            raise ValueError(
                f"build_sft_tensors: pair {row} ({prompt!r}) needs {len(sequence) - 1} positions "
                f"> seq_length {seq_length}"
            )
        length = len(sequence) - 1
        tokens[row, :length] = torch.tensor(sequence[:-1])
        labels[row, :length] = torch.tensor(sequence[1:])
        # labels[j] = sequence[j + 1]: the solution starts at sequence index len(prompt_ids).
        loss_mask[row, len(prompt_ids) - 1:length] = 1.0
    position_ids = torch.arange(seq_length).expand(count, -1).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
