"""Device profiles: every shipped file loads, and each kind of bad file is refused with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from device_profiles import DeviceProfile, Efficiency, ProfileError, all_profiles, list_profiles, load_profile

SHIPPED = [
    "cloud-a100-80gb",
    "cloud-cpu-2core",
    "cloud-h100",
    "cloud-l4",
    "cpu-2core",
    "jetson-agx-orin",
    "jetson-orin-nano",
    "jetson-orin-nx-16gb",
    "raspberry-pi-5",
    "rtx-3060",
    "rtx-4090-desktop",
    "x86-laptop-cpu",
]


def _good() -> dict:
    return {
        "name": "test-board",
        "description": "a board for tests",
        "kind": "edge",
        "memory_gb": 4,
        "memory_bandwidth_gbs": 10.5,
        "compute_tflops": 0.1,
        "power_active_w": 5,
        "power_idle_w": 1,
        "backends": ["torch"],
        "link": {"rtt_ms": 20, "uplink_mbps": 10, "downlink_mbps": 50},
    }


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_shipped_profiles_load() -> None:
    assert list_profiles() == SHIPPED
    profiles = all_profiles()
    assert sorted(profiles) == SHIPPED
    for name, profile in profiles.items():
        assert isinstance(profile, DeviceProfile)
        assert profile.name == name  # file name and `name` agree
    assert profiles["cloud-h100"].kind == "cloud"
    assert all(p.kind == ("cloud" if n.startswith("cloud-") else "edge") for n, p in profiles.items())


def test_shipped_yaml_ships_inside_the_package() -> None:
    import device_profiles

    root = Path(device_profiles.__file__).parent
    assert sorted(p.stem for p in root.glob("*.yaml")) == SHIPPED


def test_load_by_path_and_defaults(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, _good()))
    assert profile.memory_gb == 4.0 and isinstance(profile.memory_gb, float)  # ints become floats
    assert profile.backends == ("torch",)
    assert profile.efficiency == Efficiency()  # optional: defaults
    assert load_profile(str(_write(tmp_path, _good()))) == profile


def test_profile_is_frozen() -> None:
    profile = load_profile("cpu-2core")
    with pytest.raises(AttributeError):
        profile.memory_gb = 1.0  # type: ignore[misc]


def _set(data: dict, dotted: str, value: object) -> dict:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


def _drop(data: dict, dotted: str) -> dict:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    del node[last]
    return data


@pytest.mark.parametrize(
    ("edit", "field", "says"),
    [
        (lambda d: _set(d, "colour", "red"), "colour", "unknown key"),
        (lambda d: _set(d, "link.jitter_ms", 3), "link.jitter_ms", "unknown key"),
        (lambda d: _drop(d, "memory_gb"), "memory_gb", "missing"),
        (lambda d: _drop(d, "link.rtt_ms"), "link.rtt_ms", "missing"),
        (lambda d: _set(d, "memory_gb", "eight"), "memory_gb", "expected a number"),
        (lambda d: _set(d, "power_idle_w", True), "power_idle_w", "expected a number"),
        (lambda d: _set(d, "name", 5), "name", "expected a string"),
        (lambda d: _set(d, "backends", "torch"), "backends", "expected a list"),
        (lambda d: _set(d, "backends", ["torch", 3]), "backends[1]", "expected a string"),
        (lambda d: _set(d, "backends", ["torch", "tpu"]), "backends", "unknown"),
        (lambda d: _set(d, "kind", "fog"), "kind", "expected one of"),
        (lambda d: _set(d, "link", [1, 2]), "link", "expected a mapping"),
        (lambda d: _set(d, "compute_tflops", -1.0), "compute_tflops", "must be"),
        (lambda d: _set(d, "power_idle_w", -0.5), "power_idle_w", "must be"),
        (lambda d: _set(d, "memory_bandwidth_gbs", float("inf")), "memory_bandwidth_gbs", "must be"),
        (lambda d: _set(d, "link.rtt_ms", -3), "link.rtt_ms", "must be"),
        (lambda d: _set(d, "link.uplink_mbps", 0), "link.uplink_mbps", "must be"),
        (lambda d: _set(d, "efficiency", {"prefill": 1.5}), "efficiency.prefill", "must be in"),
        (lambda d: _set(d, "efficiency", {"decode": -0.1}), "efficiency.decode", "must be in"),
    ],
)
def test_bad_profile_names_file_and_field(tmp_path: Path, edit, field: str, says: str) -> None:
    path = _write(tmp_path, edit(_good()))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{field}:" in message or f"{field} " in message
    assert says in message


@pytest.mark.parametrize(
    ("text", "says"), [("name: [unclosed", "not valid YAML"), ("- a\n- b\n", "expected a mapping")]
)
def test_unparsable_or_non_mapping_file(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError, match=says) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_unknown_name_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"unknown device profile 'toaster'.*cpu-2core"):
        load_profile("toaster")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ProfileError, match="cannot read") as info:
        load_profile(missing)
    assert str(missing) in str(info.value)
    assert issubclass(ProfileError, ValueError)
