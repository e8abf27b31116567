import json

import pytest
import torch

from megatron_scope.data.datasets import (
    DatasetFormatError,
    Prompt,
    PromptDataset,
    build_sft_tensors,
    load_sft_pairs,
    prompt_token_ids,
)
from megatron_scope.data.synthetic import canonical_answer

ROWS = [{"id": f"p{i}", "prompt": f"Q: {i}+1=", "answer": str(i + 1)} for i in range(20)]


def write_jsonl(path, rows_or_lines):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows_or_lines]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loads_the_task_file_with_token_ids(task_files, tokenizer):
    dataset = PromptDataset.from_file(task_files.eval_jsonl, seed=0, tokenizer=tokenizer)
    assert len(dataset) == 200
    first = dataset.prompts[0]
    assert first.id == "eval-1-0" and first.prompt.startswith("Q: ") and first.answer.lstrip("-").isdigit()
    assert list(first.token_ids) == [tokenizer.bos_id] + tokenizer.encode(first.prompt)


BAD_ROWS = [
    ('{"id": "a", "prompt": "Q: 1+1=", "answer": "2"', "line 2: invalid JSON"),
    ('["a", "Q: 1+1=", "2"]', "line 2: expected a JSON object, got list"),
    ('{"id": "a", "answer": "2"}', "line 2: missing key 'prompt'"),
    ('{"id": "a", "prompt": "Q: 1+1="}', "line 2: missing key 'answer'"),
    ('{"prompt": "Q: 1+1=", "answer": "2"}', "line 2: missing key 'id'"),
    ('{"id": "a", "prompt": "   ", "answer": "2"}', "line 2: 'prompt' \\(prompt\\) is empty"),
    ('{"id": "a", "prompt": 7, "answer": "2"}', "line 2: 'prompt' \\(prompt\\) must be a str"),
    ('{"id": "a", "prompt": "Q: 1+1=", "answer": ""}', "line 2: 'answer' \\(answer\\) is empty"),
    ('{"id": "a", "prompt": "Q: 1+1=", "answer": 2.5}', "line 2: 'answer' \\(answer\\) must be a str or an int, got 2.5"),
    ('{"id": true, "prompt": "Q: 1+1=", "answer": "2"}', "line 2: 'id' \\(id\\) must be a str or an int, got True"),
    ('{"id": "p0", "prompt": "Q: 1+1=", "answer": "2"}', "line 2: id 'p0' repeats the id of line 1"),
]


@pytest.mark.parametrize("bad_line, message", BAD_ROWS)
def test_each_bad_row_names_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "prompts.jsonl", [ROWS[0], bad_line, ROWS[1]])
    with pytest.raises(DatasetFormatError, match=f"prompts.jsonl: {message}"):
        PromptDataset.from_file(path)


def test_missing_empty_and_untokenizable_files(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        PromptDataset.from_file(tmp_path / "nothing.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DatasetFormatError, match="blank.jsonl: no rows"):
        PromptDataset.from_file(tmp_path / "blank.jsonl")
    path = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], ROWS[1], {"id": "z", "prompt": "What is 2+2?", "answer": "4"}])
    with pytest.raises(DatasetFormatError, match=r"p.jsonl: line 3: prompt cannot be tokenized.*'W'"):
        PromptDataset.from_file(path, tokenizer=tokenizer)
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], dict(ROWS[1], answer="two")])
    PromptDataset.from_file(path)
    with pytest.raises(DatasetFormatError, match=r"a.jsonl: line 2: bad answer: gold answer .*'two'"):
        PromptDataset.from_file(path, check_answer=lambda answer, source: canonical_answer(answer))
    with pytest.raises(ValueError, match="unknown fields"):
        PromptDataset.from_file(path, keys={"question": "q"})
    with pytest.raises(DatasetFormatError, match="repeats the id"):
        PromptDataset([Prompt("a", "x", "1"), Prompt("a", "y", "2")])


def _other_columns(rows: list[dict]) -> list[dict]:
    """ROWS as a dataset with other column names (DeepMath's layout: question, final_answer) and a source column."""
    return [{"question": r["prompt"], "final_answer": int(r["answer"]), "domain": "even" if i % 2 == 0 else "odd"}
            for i, r in enumerate(rows)]


def test_parquet_and_datasets_directories_read_through_the_key_flags(tmp_path):
    """A parquet file and a Hugging Face `datasets` directory with other column names, no id column and a data
    source column give JSONL's prompts (rows numbered "row-<n>"); bad rows name the file, the row and the key."""
    import datasets
    import pyarrow
    import pyarrow.parquet

    keys = {"id": None, "prompt": "question", "answer": "final_answer", "data_source": "domain"}
    rows = _other_columns(ROWS)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "train.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "train_hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "splits"))
    expected = [Prompt(f"row-{i + 1}", r["prompt"], r["answer"], None, "even" if i % 2 == 0 else "odd")
                for i, r in enumerate(ROWS)]
    for path in (tmp_path / "train.parquet", tmp_path / "train_hf", tmp_path / "splits" / "train"):
        dataset = PromptDataset.from_file(path, keys=keys)
        assert list(dataset.prompts) == expected, path
    assert PromptDataset.from_file(tmp_path / "train_hf", keys=keys).content_digest != \
        PromptDataset.from_file(tmp_path / "train_hf", keys=dict(keys, data_source=None)).content_digest
    with pytest.raises(DatasetFormatError, match=r"splits: a DatasetDict with splits \['train'\]: give one split's "
                                                 r"directory, e.g. .*splits/train"):
        PromptDataset.from_file(tmp_path / "splits", keys=keys)
    bad = rows[:2] + [{"question": "Q: 9+1=", "domain": "odd"}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DatasetFormatError, match=r"bad.parquet: row 3: 'final_answer' \(answer\) is null"):
        PromptDataset.from_file(tmp_path / "bad.parquet", keys=keys)
    with pytest.raises(DatasetFormatError, match=r"train.parquet: row 1: missing key 'source' \(data source\)"):
        PromptDataset.from_file(tmp_path / "train.parquet", keys=dict(keys, data_source="source"))


def test_each_row_names_its_teacher_and_an_unknown_one_fails_before_any_engine(tmp_path):
    """--teacher-route-key reads each row's teacher (here the data-source column itself, as verl's teacher_key:
    data_source); the digest a resume compares covers it; `check_teacher_routes` names the first row whose teacher
    the run lacks."""
    import pyarrow
    import pyarrow.parquet

    from megatron_scope.testing.tiny import tiny_run_config
    from megatron_scope.train import check_teacher_routes

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(_other_columns(ROWS)), tmp_path / "train.parquet")
    keys = {"id": None, "prompt": "question", "answer": "final_answer", "data_source": "domain"}
    dataset = PromptDataset.from_file(tmp_path / "train.parquet", keys=dict(keys, teacher="domain"))
    assert [p.teacher for p in dataset.prompts] == [p.data_source for p in dataset.prompts] == ["even", "odd"] * (
        len(ROWS) // 2) + ["even"] * (len(ROWS) % 2)
    assert dataset.content_digest != PromptDataset.from_file(tmp_path / "train.parquet", keys=keys).content_digest
    routed = dict(models=dict(teacher_hf=None, teachers=(("even", "/e"), ("odd", "/o"))),
                  data=dict(teacher_route_key="domain"))
    check_teacher_routes(dataset, tiny_run_config(**routed))
    routed["models"]["teachers"] = (("even", "/e"), ("other", "/o"))
    with pytest.raises(ValueError, match=r"prompt 'row-2' \(.*train.parquet\) routes to teacher 'odd' \(its "
                                         r"--teacher-route-key 'domain' column\), which no --teacher names: the "
                                         r"teachers are \['even', 'other'\]"):
        check_teacher_routes(dataset, tiny_run_config(**routed))


def test_math_benchmark_rows_through_a_key_mapping():
    aime = PromptDataset.from_file("tests/data/eval/aime24.jsonl", keys={"prompt": "problem"})
    assert aime.prompts[0] == Prompt("60", "Find the remainder when $7^{2024}$ is divided by $100$.", "001")
    no_ids = PromptDataset.from_file("tests/data/eval/aime25_opencompass.jsonl", keys={"id": None, "prompt": "question"})
    assert no_ids.prompts[0] == Prompt("line-1", "Compute $25^2 - 24^2$.", "49")


def test_order_is_a_seeded_permutation_per_epoch_and_batches_stay_in_an_epoch():
    dataset = PromptDataset([Prompt(r["id"], r["prompt"], r["answer"]) for r in ROWS], seed=1)
    batches = [dataset.next_batch(7) for _ in range(6)]  # 2 batches per epoch, 6 prompts skipped each epoch
    assert [len(b) for b in batches] == [7] * 6 and dataset.epoch == 2
    epoch_orders = [dataset.epoch_order(e) for e in range(3)]
    for epoch, order in enumerate(epoch_orders):
        assert sorted(order) == list(range(20))
        ids = [p.id for b in batches[2 * epoch:2 * epoch + 2] for p in b]
        assert ids == [f"p{i}" for i in order[:14]] and len(set(ids)) == 14
    assert epoch_orders[0] != epoch_orders[1]
    other_seed = PromptDataset(dataset.prompts, seed=2)
    assert other_seed.epoch_order(0) != epoch_orders[0]
    with pytest.raises(ValueError, match="num_prompts must be in \\[1, 20\\]"):
        dataset.next_batch(21)


def test_resume_sees_exactly_the_uninterrupted_prompts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    sizes = [3, 7, 7, 5, 8, 2, 9, 4, 6, 7, 1, 20]
    uninterrupted = PromptDataset.from_file(path, seed=11)
    expected = [[p.id for p in uninterrupted.next_batch(n)] for n in sizes]
    for stop in range(len(sizes)):
        first = PromptDataset.from_file(path, seed=11)
        seen = [[p.id for p in first.next_batch(n)] for n in sizes[:stop]]
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        resumed = PromptDataset.from_file(path, seed=11)
        resumed.load_state_dict(state)
        seen += [[p.id for p in resumed.next_batch(n)] for n in sizes[stop:]]
        assert seen == expected, stop


def test_state_for_other_data_is_rejected_without_changing_position(tmp_path):
    dataset = PromptDataset.from_file(write_jsonl(tmp_path / "p.jsonl", ROWS), seed=3)
    dataset.next_batch(5)
    state = dataset.state_dict()
    changed = PromptDataset.from_file(write_jsonl(tmp_path / "q.jsonl", ROWS[:-1] + [dict(ROWS[-1], answer="0")]), seed=3)
    for target, bad, match in [
        (changed, state, "content_digest"),
        (PromptDataset.from_file(tmp_path / "p.jsonl", seed=4), state, "seed=3"),
        (PromptDataset.from_file(tmp_path / "p.jsonl", seed=3), dict(state, index=21), "index=21"),
        (PromptDataset.from_file(tmp_path / "p.jsonl", seed=3), {"epoch": 1}, "lacks"),
    ]:
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(bad)
        assert (target.epoch, target.index) == (0, 0)


def test_sft_tensors_mask_exactly_the_solution_and_eos(tokenizer):
    pairs = [("Q: 7+5-3=", "7+5=12 ; 12-3=9 ; A: 9"), ("Q: 2*3=", "2*3=6 ; A: 6")]
    batch = build_sft_tensors(pairs, tokenizer, seq_length=32)
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert all(t.shape == (2, 32) for t in batch.values())
    assert batch["loss_mask"].dtype == torch.float and batch["tokens"].dtype == torch.long
    for row, (prompt, solution) in enumerate(pairs):
        sequence = prompt_token_ids(tokenizer, prompt) + tokenizer.encode(solution) + [tokenizer.eos_id]
        length = len(sequence) - 1
        tokens, labels, mask = batch["tokens"][row], batch["labels"][row], batch["loss_mask"][row]
        assert tokens[:length].tolist() == sequence[:-1] and labels[:length].tolist() == sequence[1:]
        assert tokens[0] == tokenizer.bos_id
        assert (tokens[length:] == tokenizer.pad_id).all() and (labels[length:] == tokenizer.pad_id).all()
        trained = labels[mask.bool()].tolist()
        assert trained[-1] == tokenizer.eos_id and tokenizer.decode(trained) == solution
        assert mask.sum() == len(tokenizer.encode(solution)) + 1
        # the first trained position predicts the solution's first token from the prompt's last token
        first = int(mask.nonzero()[0])
        assert tokens[first] == tokenizer.encode(prompt)[-1]
    assert batch["position_ids"][1].tolist() == list(range(32))


def test_sft_tensors_refuse_to_truncate(tokenizer):
    pair = ("Q: 7+5-3=", "7+5=12 ; 12-3=9 ; A: 9")
    needed = len(prompt_token_ids(tokenizer, pair[0])) + len(tokenizer.encode(pair[1]))  # + EOS - 1
    build_sft_tensors([pair], tokenizer, seq_length=needed)
    with pytest.raises(ValueError, match=f"pair 1 .*needs {needed} positions > seq_length {needed - 1}"):
        build_sft_tensors([("Q: 1=", "A: 1"), pair], tokenizer, seq_length=needed - 1)
    with pytest.raises(ValueError, match="empty solution"):
        build_sft_tensors([("Q: 1=", "")], tokenizer, seq_length=16)


def test_sft_pairs_from_the_task_file(task_files, tokenizer, tmp_path):
    pairs = load_sft_pairs(task_files.train_jsonl)
    assert len(pairs) == 3000 and pairs[0][1].endswith("A: " + json.loads(open(task_files.train_jsonl).readline())["answer"])
    batch = build_sft_tensors(pairs, tokenizer, seq_length=64)
    assert batch["tokens"].shape == (3000, 64)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q: 1+1=", "solution": "1+1=2 ; A: 2"}, {"prompt": "Q: 1+2="}])
    with pytest.raises(DatasetFormatError, match="sft.jsonl: line 2: missing key 'solution'"):
        load_sft_pairs(path)
