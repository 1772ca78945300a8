"""models.pages: handing back the resident pages of memory-mapped weights never changes a value,
and never touches memory that is not a clean file mapping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from models import pages
from models.quant import QuantLinear, pack_for_kernels

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps (Linux)")


def _resident_kb(t: torch.Tensor) -> int:
    """Resident kB of the mapping holding t (its smaps entry)."""
    ptr, current = t.data_ptr(), None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:
            lo, hi = (int(v, 16) for v in head[0].split("-"))
            current = lo <= ptr < hi
        elif current and head[0] == "Rss:":
            return int(head[1])
    raise AssertionError("no mapping holds the tensor")


def _mapped(tmp_path: Path, n: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    want = torch.arange(n, dtype=torch.int32) * 7  # 16 MB of known values
    torch.save({"w": want}, tmp_path / "w.pt")
    return torch.load(tmp_path / "w.pt", mmap=True, weights_only=True)["w"], want


def test_release_drops_clean_mapped_pages_and_keeps_values(tmp_path: Path) -> None:
    mapped, want = _mapped(tmp_path)
    assert torch.equal(mapped, want)  # reads every page in
    before = _resident_kb(mapped)
    released = pages.release(mapped, pages.clean_file_mappings())
    assert released > 15 * 2**20
    assert _resident_kb(mapped) < before - 15 * 1024
    assert torch.equal(mapped, want)  # read again from the file


def test_release_leaves_anonymous_and_written_memory_alone(tmp_path: Path) -> None:
    anonymous = torch.arange(1 << 20, dtype=torch.int32)
    assert pages.release(anonymous, pages.clean_file_mappings()) == 0
    assert torch.equal(anonymous, torch.arange(1 << 20, dtype=torch.int32))
    mapped, want = _mapped(tmp_path)
    mapped[5] = -1  # a private copy of one page: the file no longer holds this tensor's values
    assert pages.release(mapped, pages.clean_file_mappings()) == 0
    assert int(mapped[5]) == -1 and torch.equal(mapped[6:], want[6:])


def test_pack_for_kernels_hands_back_mapped_sources(tmp_path: Path) -> None:
    """A quantized layer loaded from a mapped file runs the same after its sources' pages go."""
    layer = QuantLinear(torch.randn(512, 1024) * 0.05, 4, 32)
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    loaded = QuantLinear.empty(512, 1024, 4, 32)
    loaded.load_state_dict(torch.load(tmp_path / "layer.pt", mmap=True, weights_only=True), assign=True)
    x = torch.randn(3, 1024)
    released = pack_for_kernels(loaded)
    if loaded.kernel_view() is None:
        assert released == 0
        return
    assert released > 200_000  # most of the 256 kB of codes (whole pages only)
    torch.testing.assert_close(loaded(x), layer(x), atol=0, rtol=0)
    assert torch.equal(loaded.q, layer.q) and torch.equal(loaded.scale, layer.scale)


def test_pack_for_kernels_moves_small_mapped_tensors_out_of_the_file(tmp_path: Path) -> None:
    """A norm read every forward would map its file folio (and the weights beside it) back in:
    in a quantized model it is copied out, with its values; an fp32 model is left as it is."""
    quantized = torch.nn.Module()
    quantized.layer = QuantLinear(torch.randn(256, 512) * 0.05, 4, 32)
    quantized.norm = torch.nn.LayerNorm(512)
    dense = torch.nn.Linear(512, 256)
    for name, module in (("q", quantized), ("d", dense)):
        torch.save(module.state_dict(), tmp_path / f"{name}.pt")
        module.load_state_dict(torch.load(tmp_path / f"{name}.pt", mmap=True, weights_only=True), assign=True)
    want = quantized.norm.weight.detach().clone()
    pack_for_kernels(quantized)
    pack_for_kernels(dense)
    spans = pages.clean_file_mappings()
    assert not pages.mapped(quantized.norm.weight, spans) and torch.equal(quantized.norm.weight, want)
    assert pages.mapped(dense.weight, spans)  # an fp32 model's weights are never copied
