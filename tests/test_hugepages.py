"""Huge-page buffers: layout, what smaps says, and the K/V buffers that use them."""

from __future__ import annotations

import pytest
import torch

from h2okit import hugepages
from h2okit.cache import KVBuffer
from h2okit.config import ConfigError

needs_madvise = pytest.mark.skipif(not hugepages.available(), reason="no MADV_HUGEPAGE on this platform")


@needs_madvise
def test_empty_bytes_starts_on_a_huge_page_and_outlives_its_mapping_variable():
    buffer = hugepages.empty_bytes(3 * hugepages.HUGE_PAGE + 5)
    assert buffer.numel() == 3 * hugepages.HUGE_PAGE + 5
    assert buffer.data_ptr() % hugepages.HUGE_PAGE == 0
    buffer.fill_(7)  # the mmap object is referenced only through the tensor now
    assert int(buffer[-1]) == 7 and int(buffer.sum()) == 7 * buffer.numel()


def test_pack_copies_each_tensor_onto_its_own_page():
    tensors = [torch.randn(100, 33), torch.arange(7, dtype=torch.int16), torch.randn(5).to(torch.bfloat16)]
    packed = hugepages.pack(tensors)
    for original, copy in zip(tensors, packed):
        assert copy.dtype == original.dtype and copy.shape == original.shape
        assert torch.equal(copy, original) and copy.data_ptr() != original.data_ptr()
        assert copy.data_ptr() % hugepages.ALIGN == 0


SMAPS = """\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
AnonHugePages:      2048 kB
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
Size:               2048 kB
AnonHugePages:      2048 kB
7f0000600000-7f0000800000 rw-p 00000000 00:00 0 [heap]
AnonHugePages:         0 kB
"""


class _At:  # a stand-in tensor at a given address
    def __init__(self, address: int):
        self.address = address

    def data_ptr(self) -> int:
        return self.address

    def numel(self) -> int:
        return 1


def test_huge_bytes_counts_each_mapping_holding_a_tensor_once(tmp_path):
    smaps = tmp_path / "smaps"
    smaps.write_text(SMAPS)
    first, second = 0x7F0000000000, 0x7F0000400000
    assert hugepages.huge_bytes([_At(first + 64), _At(first + 4096)], smaps) == 2048 * 1024
    assert hugepages.huge_bytes([_At(first), _At(second + 8)], smaps) == 2 * 2048 * 1024
    assert hugepages.huge_bytes([_At(0x7F0000700000)], smaps) == 0  # a mapping without huge pages
    assert hugepages.huge_bytes([_At(0x1000)], smaps) == 0  # no mapping holds it
    assert hugepages.huge_bytes([_At(first)], tmp_path / "missing") == 0


def test_whole_pages_rounds_up_to_huge_pages():
    page = hugepages.HUGE_PAGE
    assert [hugepages.whole_pages(n) for n in (0, 1, page, page + 1)] == [0, page, page, 2 * page]


def _rounding(buffer: KVBuffer) -> float:
    pair = buffer.capacity * buffer.bytes_per_token
    return (hugepages.whole_pages(pair) - pair) / pair


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_buffer_keeps_its_tokens_across_growth_into_huge_pages(dtype):
    torch.manual_seed(0)
    buffer = KVBuffer(torch.zeros(1, 3, 0, 64), torch.zeros(1, 3, 0, 64), dtype)
    keys, values = torch.randn(1, 3, 10600, 64), torch.randn(1, 3, 10600, 64)
    ends = [*range(100, 1600, 100), 10600]  # small appends in torch memory, then one that fits huge pages
    for start, end in zip([0, *ends], ends):
        buffer.append(keys[:, :, start:end], values[:, :, start:end])
        k, v = buffer.views()
        assert torch.equal(k, keys[:, :, :end].to(dtype)) and torch.equal(v, values[:, :, :end].to(dtype))
    pair = buffer.capacity * buffer.bytes_per_token
    if hugepages.available():  # the pair fills whole huge pages (to within a token), K first, V right after it
        assert hugepages.whole_pages(pair) - pair < buffer.bytes_per_token and buffer.k.data_ptr() % hugepages.HUGE_PAGE == 0
        assert buffer.v.data_ptr() == buffer.k.data_ptr() + pair // 2
    assert buffer.allocated_bytes == pair


@pytest.mark.parametrize("tokens", [10, 600])
def test_kv_buffers_that_huge_pages_would_inflate_stay_in_torch_memory(tokens):
    buffer = KVBuffer(torch.zeros(1, 3, 0, 64), torch.zeros(1, 3, 0, 64), torch.float32)
    buffer.append(torch.randn(1, 3, tokens, 64), torch.randn(1, 3, tokens, 64))
    assert buffer.capacity == tokens + KVBuffer.HEADROOM  # not rounded up to a huge page
    assert _rounding(buffer) > KVBuffer.HUGE_MAX_ROUNDING


def test_the_environment_turns_huge_pages_off_and_rejects_other_values(monkeypatch):
    monkeypatch.setenv("H2OKIT_HUGE_PAGES", "0")
    assert not hugepages.available()
    buffer = KVBuffer(torch.zeros(1, 3, 0, 64), torch.zeros(1, 3, 0, 64), torch.float32)
    buffer.append(torch.randn(1, 3, 10600, 64), torch.randn(1, 3, 10600, 64))  # would fit huge pages
    assert buffer.capacity == 10600 + KVBuffer.HEADROOM
    monkeypatch.setenv("H2OKIT_HUGE_PAGES", "yes")
    with pytest.raises(ConfigError, match="H2OKIT_HUGE_PAGES='yes' is not allowed; allowed: 0"):
        hugepages.available()
