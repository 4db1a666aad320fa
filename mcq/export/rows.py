"""Large tensors handled a block of rows at a time.

An exporter reads a weight from the memory-mapped checkpoint (no copy) and converts, quantizes and writes it in
blocks of about `ROW_BLOCK_BYTES` of float32 rows, so the 151,748-row embedding table and lm_head (2.5 GB each in
float32) never exist whole in float32. Every format's encoding treats rows independently (a GGUF block and a
MatMulNBits block lie inside one row, a float cast is per element), so blocks give the same bytes as the whole.
"""

from __future__ import annotations

from collections.abc import Iterator

ROW_BLOCK_BYTES = 64 << 20


def row_ranges(rows: int, row_bytes: int, multiple: int = 1) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive blocks of about ROW_BLOCK_BYTES of rows (a multiple of `multiple` rows each)."""
    step = max(multiple, ROW_BLOCK_BYTES // max(row_bytes, 1) // multiple * multiple)
    for start in range(0, rows, step):
        yield start, min(start + step, rows)
