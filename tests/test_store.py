"""The row checksums of ensemble files: zlib's crc32, bit for bit, however computed."""

import zlib

import numpy as np
import pytest

from hpcflow import production, store


def zlib_checksums(rows, r0, m0):
    """The definition, one zlib call per row: crc32 of row (r0 + b, m0 + i)'s little-endian
    bytes with initial value (m 2654435761 + r 40503 + 1) mod 2^32."""
    a = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    B, n = a.shape[:2]
    out = np.zeros((B, n), dtype=np.uint32)
    for b in range(B):
        for i in range(n):
            start = ((m0 + i) * 2654435761 + (r0 + b) * 40503 + 1) & 0xFFFFFFFF
            out[b, i] = zlib.crc32(a[b, i].tobytes(), start)
    return out


WIDE = store.CRC_BATCH_MAX_BYTES // 8 + 1  # float64 rows just wider than the batched ones


@pytest.mark.parametrize("shape, dtype", [
    ((5, 7), "f8"),                      # a scalar record (M, dH): 8 bytes a row
    ((5, 7), "i1"),                      # accepted: 1 byte
    ((3, 4, 9), "f8"),                   # C at L = 16: 72 bytes
    ((3, 4, store.CRC_BATCH_MAX_BYTES // 8), "f8"),  # the widest batched row
    ((3, 4, WIDE), "f8"),                # the narrowest zlib one
    ((2, 1, 6, 6), "f8"),                # a configuration
    ((4, 3, 6), "u8"),                   # stream states
    ((4, 6), ">f8"),                     # big-endian input: its little-endian bytes
    ((0, 3), "f8"), ((3, 0), "f8"),
])
@pytest.mark.parametrize("r0, m0", [(0, 0), (5, 123), (7, 4_000_000_000)])
def test_row_checksums_are_zlib_crc32(shape, dtype, r0, m0):
    g = np.random.default_rng(sum(shape) + r0)
    if np.dtype(dtype).kind == "f":
        rows = g.standard_normal(shape).astype(dtype)
    else:
        rows = g.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    got = store.row_checksums(rows, r0, m0)
    want = zlib_checksums(rows, r0, m0)
    assert got.dtype == np.uint32 and got.shape == shape[:2]
    np.testing.assert_array_equal(got, want)


def test_a_changed_byte_or_a_moved_row_changes_the_checksum():
    rows = np.random.default_rng(1).standard_normal((4, 50))
    crc = store.row_checksums(rows, 0, 0)
    flipped = rows.copy()
    flipped.view(np.uint8)[2, 8 * 17 + 3] ^= 0x10   # one bit of row (2, 17)
    changed = store.row_checksums(flipped, 0, 0) != crc
    assert changed[2, 17] and changed.sum() == 1
    # the same rows one measurement later, or one replica over, all fail
    assert (store.row_checksums(rows, 0, 1) != crc).all()
    assert (store.row_checksums(rows, 1, 0) != crc).all()


def test_consecutive_configurations_are_grouped_into_runs():
    fields = [(3, "a"), (4, "b"), (5, "c"), (9, "d"), (10, "e"), (2, "f")]
    assert production._consecutive(fields) == [(3, ["a", "b", "c"]), (9, ["d", "e"]),
                                                (2, ["f"])]
    assert production._consecutive([]) == []
