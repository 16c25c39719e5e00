"""Issue 15 item 7: the training text table is the cache's fp16 file, memory-mapped (shared by the
ranks of a node through the page cache), not a private fp32 buffer per rank."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import compose


def _file_backed_mapping(ptr: int) -> str | None:
    """The file a process mapping containing address ``ptr`` maps (None: anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def test_the_text_table_is_the_memory_mapped_fp16_cache_file(tmp_path, cache_dir):
    from amortized3d.build import build_system

    system, _, _ = build_system(compose(tmp_path, cache_dir))
    table = system.text_table
    assert table.dtype == torch.float16
    mapped = _file_backed_mapping(table.data_ptr())
    assert mapped is not None and mapped.endswith(".npy") and str(cache_dir) in mapped  # not a private copy
    names = {n for n, _ in system.named_buffers()} | set(system.state_dict())
    assert not any("text_table" in n for n in names)  # never broadcast by DDP nor checkpointed
    ids = torch.tensor([2, 0, 1])
    rows = system.model.text_rows(ids)
    assert rows.dtype == torch.float32 and torch.equal(rows, table[ids].float())
    emb, got = system.embed([system.train_prompts[i] for i in ids.tolist()])
    assert torch.equal(emb, rows) and torch.equal(got.cpu(), ids)
