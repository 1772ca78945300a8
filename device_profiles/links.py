"""Link profiles: one YAML file per kind of network between an edge device and the hub, and a strict loader.

A link profile states what the cost model needs to price moving bytes over the network: round-trip time,
throughput each way, how much the round trip varies and how many packets are lost, and (where a source
gives one) the energy the edge device's radio spends per megabyte it sends.

    link = load_link("4g")                      # a shipped link (device_profiles/links/4g.yaml), by name
    link = load_link("site/my-uplink.yaml")     # or any file
    spec = link.spec                            # the LinkSpec a DeviceProfile carries, for partitioner.cost

Strict like the device profiles: an unknown key, a missing key, a wrong type, a non-finite number, a
negative round trip or jitter, a bandwidth that is not positive, or a loss outside [0, 1) raises
`ProfileError` naming the file and the field. Units: milliseconds; Mbps = 10**6 bits per second;
MB = 10**6 bytes; joules.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from device_profiles import LinkSpec, ProfileError, _build, _parse, _path_of, _read, _require, _shipped

__all__ = ["LinkProfile", "all_links", "link_from_dict", "list_links", "load_link"]

FOLDER = "links"
"""Subfolder of the device_profiles package that holds the shipped link profiles."""


@dataclass(frozen=True)
class LinkProfile:
    """One kind of network between an edge device and the hub, as the cost model sees it."""

    name: str
    """Link name; a shipped link's name equals its file name without `.yaml`."""
    description: str
    """One line saying which network, and where the hub sits, the numbers describe."""
    rtt_ms: float
    """Median round-trip time between the edge device and the hub, milliseconds (>= 0)."""
    uplink_mbps: float
    """Device-to-hub throughput a transfer reaches, megabits per second (> 0)."""
    downlink_mbps: float
    """Hub-to-device throughput a transfer reaches, megabits per second (> 0)."""
    jitter_ms: float = 0.0
    """Typical variation of the round-trip time (about one standard deviation), milliseconds (>= 0)."""
    loss: float = 0.0
    """Fraction of packets lost, in [0, 1): TCP resends them, so loss costs time, not correctness."""
    tx_j_per_mb: float | None = None
    """Energy the edge device's radio spends to send one megabyte at `uplink_mbps`, joules (> 0); None
    where no source gives one, or where the terminal's draw does not depend on what it sends."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ProfileError("name must not be empty")
        _ = self.spec  # LinkSpec's own checks: rtt_ms >= 0, bandwidths > 0, all finite
        _require(self, ">= 0", "jitter_ms")
        if not (math.isfinite(self.loss) and 0.0 <= self.loss < 1.0):
            raise ProfileError(f"loss must be finite and in [0, 1), got {self.loss!r}")
        if self.tx_j_per_mb is not None:
            _require(self, "> 0", "tx_j_per_mb")

    @property
    def spec(self) -> LinkSpec:
        """The round trip and bandwidths as the LinkSpec that DeviceProfile.link and partitioner.cost use."""
        return LinkSpec(rtt_ms=self.rtt_ms, uplink_mbps=self.uplink_mbps, downlink_mbps=self.downlink_mbps)


def link_from_dict(data: Mapping[str, Any]) -> LinkProfile:
    """Build a LinkProfile from plain data with the loader's checks. Raises ProfileError."""
    return _build(LinkProfile, data)


def load_link(name_or_path: str | os.PathLike[str]) -> LinkProfile:
    """Load a shipped link by name (e.g. "wifi") or any link file by path.

    Names and paths are told apart as by `device_profiles.load_profile`. Raises ProfileError for an unknown
    name, a file that cannot be read, or contents that break the schema; the message names the file and
    the field.
    """
    path = _path_of(name_or_path)
    if path is not None:
        return _parse(_read(path, "link profile"), str(path), link_from_dict)
    return _load_shipped(os.fspath(name_or_path))


@functools.lru_cache(maxsize=64)
def _load_shipped(name: str) -> LinkProfile:
    """Shipped links are package data and never change at run time: parse each once. Links are frozen."""
    shipped = _shipped(FOLDER)
    if name not in shipped:
        raise ProfileError(f"unknown link profile {name!r}; shipped links: {', '.join(sorted(shipped))}")
    text = shipped[name].read_text(encoding="utf-8")
    return _parse(text, f"device_profiles/{FOLDER}/{name}.yaml", link_from_dict)


def list_links() -> list[str]:
    """Names of the shipped link profiles, sorted."""
    return sorted(_shipped(FOLDER))


def all_links() -> dict[str, LinkProfile]:
    """Every shipped link profile by name. Raises ProfileError if any of them is invalid."""
    return {name: load_link(name) for name in list_links()}
