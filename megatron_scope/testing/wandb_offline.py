"""Read back a W&B run written in offline mode (WANDB_MODE=offline), for tests: its name, project and config, and
each `run.log` call's scalars.

The run's `run-<id>.wandb` file is a LevelDB-style log (W&B's transaction log): after a 7-byte header (":W&B", a
2-byte magic, a version byte) come 32 KiB blocks of records, each a 7-byte header (CRC32, 2-byte length, type:
1 full, 2 first, 3 middle, 4 last fragment) and its bytes; a record is a `wandb_internal_pb2.Record` protobuf."""

from __future__ import annotations

import glob
import json
import os
import struct

BLOCK = 32 * 1024
HEADER = 7  # the file's, and each record fragment's


def _records(path: str) -> list[bytes]:
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log (starts {data[:4]!r})")
    records, pending, position = [], b"", HEADER
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        if kind == 0 and length == 0:  # zero padding to the block's end
            position += left_in_block
            continue
        pending += data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            records.append(pending)
            pending = b""
    return records


def read_offline_run(save_dir: str) -> dict:
    """{"project", "name", "config", "history": [{key: value} per logged step, with "_step"]} of the one offline
    run under `save_dir` (W&B's `dir`)."""
    from wandb.proto import wandb_internal_pb2

    paths = glob.glob(os.path.join(save_dir, "wandb", "offline-run-*", "run-*.wandb"))
    if len(paths) != 1:
        raise ValueError(f"expected one offline W&B run under {save_dir}, found {paths}")
    run, history = None, []
    for raw in _records(paths[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    if run is None:
        raise ValueError(f"{paths[0]} holds no run record")
    config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    return {"project": run.project, "name": run.display_name, "config": config, "history": history}
