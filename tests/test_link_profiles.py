"""Link profiles and the device classes of issue 16: every shipped file loads, bad files are refused with a
message naming file and field, and the shipped figures keep the relationships their data sheets state."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

import device_profiles
from device_profiles import LinkSpec, ProfileError, load_profile
from device_profiles.links import LinkProfile, all_links, link_from_dict, list_links, load_link

LINKS = ["4g", "5g", "ethernet-lan", "lte-m", "satellite-geo", "satellite-leo", "wifi"]
NEW_DEVICES = ["cloud-a100-80gb", "cloud-l4", "jetson-orin-nx-16gb", "rtx-3060", "x86-laptop-cpu"]


def _good() -> dict:
    return {
        "name": "test-link",
        "description": "a link for tests",
        "rtt_ms": 20,
        "uplink_mbps": 10,
        "downlink_mbps": 50,
        "jitter_ms": 2,
        "loss": 0.01,
        "tx_j_per_mb": 1.5,
    }


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "uplink.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# -- shipped links -------------------------------------------------------------------------------------


def test_shipped_links_load() -> None:
    assert list_links() == LINKS
    links = all_links()
    assert sorted(links) == LINKS
    for name, link in links.items():
        assert isinstance(link, LinkProfile)
        assert link.name == name  # file name and `name` agree
        assert link.spec == LinkSpec(link.rtt_ms, link.uplink_mbps, link.downlink_mbps)


def test_shipped_links_ship_inside_the_package() -> None:
    root = Path(device_profiles.__file__).parent / "links"
    assert sorted(p.stem for p in root.glob("*.yaml")) == LINKS
    assert "links" not in device_profiles.list_profiles()  # the folder is not taken for a device profile


def test_shipped_links_keep_their_physics() -> None:
    links = all_links()
    # the further the hub and the narrower the radio, the slower: LAN < 5G < 4G < LTE-M, GEO slowest of all
    assert links["ethernet-lan"].rtt_ms < links["5g"].rtt_ms < links["4g"].rtt_ms < links["lte-m"].rtt_ms
    assert links["satellite-geo"].rtt_ms > 4 * 35_786 / 299_792.458 * 1000  # no faster than light
    assert links["satellite-leo"].rtt_ms < links["satellite-geo"].rtt_ms
    assert links["ethernet-lan"].uplink_mbps > links["5g"].uplink_mbps > links["4g"].uplink_mbps
    assert links["lte-m"].uplink_mbps < 1  # Cat-M1 peaks at about 1 Mbps even full duplex
    # a slower radio spends more energy per megabyte sent; wired and satellite links state none
    assert links["lte-m"].tx_j_per_mb > links["4g"].tx_j_per_mb > links["5g"].tx_j_per_mb > links["wifi"].tx_j_per_mb
    assert links["ethernet-lan"].tx_j_per_mb is None and links["satellite-leo"].tx_j_per_mb is None


def test_load_by_path_defaults_and_spec(tmp_path: Path) -> None:
    data = _good()
    for optional in ("jitter_ms", "loss", "tx_j_per_mb"):
        del data[optional]
    link = load_link(_write(tmp_path, data))
    assert link.rtt_ms == 20.0 and isinstance(link.rtt_ms, float)  # ints become floats
    assert (link.jitter_ms, link.loss, link.tx_j_per_mb) == (0.0, 0.0, None)
    assert link.spec == LinkSpec(rtt_ms=20.0, uplink_mbps=10.0, downlink_mbps=50.0)
    assert load_link(str(_write(tmp_path, data))) == link
    assert link_from_dict({**data, "tx_j_per_mb": None}) == link  # YAML null is "not known"


def test_a_link_spec_drops_into_a_device_profile() -> None:
    profile = load_profile("jetson-orin-nano")
    moved = dataclasses.replace(profile, link=load_link("lte-m").spec)
    assert moved.link.uplink_mbps == 0.375


def test_link_is_frozen() -> None:
    link = load_link("wifi")
    with pytest.raises(AttributeError):
        link.rtt_ms = 1.0  # type: ignore[misc]


# -- refused files -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "field", "says"),
    [
        (lambda d: d.update(uplnk_mbps=10), "uplnk_mbps", "unknown key"),  # misspelt
        (lambda d: d.pop("downlink_mbps"), "downlink_mbps", "missing"),
        (lambda d: d.pop("name"), "name", "missing"),
        (lambda d: d.update(uplink_mbps=-5), "uplink_mbps", "must be"),
        (lambda d: d.update(downlink_mbps=0), "downlink_mbps", "must be"),
        (lambda d: d.update(uplink_mbps=math.nan), "uplink_mbps", "must be"),
        (lambda d: d.update(rtt_ms=math.nan), "rtt_ms", "must be"),
        (lambda d: d.update(rtt_ms=-1), "rtt_ms", "must be"),
        (lambda d: d.update(jitter_ms=-0.5), "jitter_ms", "must be"),
        (lambda d: d.update(loss=1.0), "loss", "must be"),
        (lambda d: d.update(loss=math.nan), "loss", "must be"),
        (lambda d: d.update(tx_j_per_mb=0), "tx_j_per_mb", "must be"),
        (lambda d: d.update(tx_j_per_mb=math.inf), "tx_j_per_mb", "must be"),
        (lambda d: d.update(uplink_mbps="fast"), "uplink_mbps", "expected a number"),
        (lambda d: d.update(tx_j_per_mb="2 J"), "tx_j_per_mb", "expected a number"),
        (lambda d: d.update(loss=True), "loss", "expected a number"),
        (lambda d: d.update(name=4), "name", "expected a string"),
        (lambda d: d.update(name=""), "name", "must not be empty"),
    ],
)
def test_bad_link_names_file_and_field(tmp_path: Path, edit, field: str, says: str) -> None:
    data = _good()
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as info:
        load_link(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{field}:" in message or f"{field} " in message
    assert says in message


@pytest.mark.parametrize(("text", "says"), [("rtt_ms: [unclosed", "not valid YAML"), ("- a\n", "expected a mapping")])
def test_unparsable_or_non_mapping_link(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError, match=says) as info:
        load_link(path)
    assert str(path) in str(info.value)


def test_unknown_link_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"unknown link profile 'carrier-pigeon'.*ethernet-lan.*wifi"):
        load_link("carrier-pigeon")
    with pytest.raises(ProfileError, match="unknown link profile 'jetson-orin-nano'"):
        load_link("jetson-orin-nano")  # a device profile is not a link
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ProfileError, match="cannot read link profile") as info:
        load_link(missing)
    assert str(missing) in str(info.value)


# -- the device classes of issue 16 --------------------------------------------------------------------


def test_new_device_profiles_load_with_their_data_sheet_figures() -> None:
    p = {name: load_profile(name) for name in NEW_DEVICES}
    assert [p[n].kind for n in NEW_DEVICES] == ["cloud", "cloud", "edge", "edge", "edge"]
    # memory: data-sheet sizes
    assert (p["jetson-orin-nx-16gb"].memory_gb, p["rtx-3060"].memory_gb) == (16, 12)
    assert (p["cloud-a100-80gb"].memory_gb, p["cloud-l4"].memory_gb) == (80, 24)
    # bandwidth: HBM2e >> GDDR6 at 192 bits (3060, 360 GB/s) > GDDR6 at a 72 W budget (L4, 300 GB/s)
    bw = {n: p[n].memory_bandwidth_gbs for n in NEW_DEVICES}
    assert bw["cloud-a100-80gb"] > bw["rtx-3060"] > bw["cloud-l4"] > bw["jetson-orin-nx-16gb"] > bw["x86-laptop-cpu"]
    assert bw["jetson-orin-nx-16gb"] > load_profile("jetson-orin-nano").memory_bandwidth_gbs  # 102.4 vs 68 GB/s
    assert bw["cloud-a100-80gb"] < load_profile("cloud-h100").memory_bandwidth_gbs  # 2.0 vs 3.35 TB/s
    # compute: the L4's Ada tensor cores outrun the 3060 despite the lower bandwidth; Orin NX sits between
    # the Orin Nano and the AGX Orin; the laptop's CPU is two orders of magnitude behind any GPU
    tf = {n: p[n].compute_tflops for n in NEW_DEVICES}
    assert tf["cloud-a100-80gb"] > tf["cloud-l4"] > tf["rtx-3060"] > tf["jetson-orin-nx-16gb"] > tf["x86-laptop-cpu"]
    nano, agx = load_profile("jetson-orin-nano"), load_profile("jetson-agx-orin")
    assert nano.compute_tflops < tf["jetson-orin-nx-16gb"] < agx.compute_tflops
    assert tf["x86-laptop-cpu"] * 10 < tf["jetson-orin-nx-16gb"]
    # power: the L4 fits a 72 W slot, far under the A100's 400 W
    assert p["cloud-l4"].power_active_w < p["rtx-3060"].power_active_w < p["cloud-a100-80gb"].power_active_w
    assert all(q.power_idle_w < q.power_active_w for q in p.values())


def test_laptop_runs_only_cpu_backends() -> None:
    laptop = load_profile("x86-laptop-cpu")
    assert set(laptop.backends) == {"torch", "onnxruntime"}
    assert not {"cuda", "tensorrt"} & set(laptop.backends)
    for gpu in ("cloud-a100-80gb", "cloud-l4", "jetson-orin-nx-16gb", "rtx-3060"):
        assert {"cuda", "tensorrt"} <= set(load_profile(gpu).backends)
