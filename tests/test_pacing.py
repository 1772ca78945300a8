"""One cost rule: an emulated agent paces to exactly what the hub's router predicts for it.

The agent builds its pacer from what it serves (`partitioner.cost.served_model_cost` over the
weight bytes it advertises); the hub builds each candidate's cost from the same advertised
ModelInfo with the same function. For an int4 bundle both must cost about 5 bits a weight, where
the agent once paced at fp32 speed while the router predicted int4.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest

from cloud_hub.calibrations import Calibrations
from cloud_hub.fleet import AgentSession, Fleet
from cloud_hub.placements import Placements, SourceContext, make_sources
from cloud_hub.router import Budget, BudgetRouter
from cloud_hub.store import DeviceRecord
from device_profiles import Calibration, load_profile
from edge_agent.pacing import profile_pacer
from edge_agent.runner import build_agent
from models.bundle import save_bundle
from models.loaded import LoadedModel
from models.quant import quantize_model
from models.sampling import SamplingParams
from partitioner.cost import ModelCost, served_model_cost
from partitioner.predict import compute_ms
from tandem.v1 import tandem_pb2 as pb
from tests.test_cost import SMOLLM2

PROFILE = "raspberry-pi-5"


@pytest.fixture
def int4_bundle(tiny: LoadedModel, tmp_path: Path) -> Path:
    model = quantize_model(copy.deepcopy(tiny.model), 4)
    return save_bundle(LoadedModel(model, tiny.tokenizer, tiny.path), tmp_path / "int4", "tiny")


def test_an_emulated_int4_agent_paces_to_the_routers_prediction(int4_bundle: Path, tmp_path: Path) -> None:
    agent = build_agent("127.0.0.1:1", PROFILE, str(int4_bundle), tmp_path / "state", emulate=True)
    served = agent.engine
    info = pb.ModelInfo(**served.info)
    assert info.quant == "int4"
    assert info.calibration_json  # it calibrated itself, unpaced, at start-up
    # The hub's view: this agent online with what it advertises, costed by the placement layer. Without
    # calibrations, the router predicts exactly what the agent paces to; with its calibration, the
    # slower of that and the host's measured speed (pacing cannot make the host faster).
    for calibrate in (False, True):
        fleet = Fleet(calibrations=Calibrations(enabled=calibrate))
        fleet.attach(AgentSession(DeviceRecord("dev-a", "a", PROFILE, "x", emulated=True), (info,)))
        placements = Placements(make_sources(("edge",), SourceContext(fleet)))
        (candidate,) = placements.candidates(info.name, chat=False)
        assert 4.5 <= candidate.cost.bits_per_weight <= 8.5  # int4 layers with scales, int8 table: never fp32
        host = Calibration.from_json(info.calibration_json)
        for prompt_tokens, max_tokens in ((7, 5), (100, 32), (1000, 128)):
            est = BudgetRouter().choose([candidate], prompt_tokens, max_tokens, Budget()).estimate
            pace = served.pacer(prompt_tokens, max_tokens)
            if not calibrate:
                assert (pace.ttft_ms, pace.tpot_ms) == (est.prefill_ms, est.decode_ms)  # exactly, not approximately
                continue
            p_host, d_host = compute_ms(
                candidate.profile, candidate.cost, host, prompt_tokens, prompt_tokens + max_tokens / 2
            )
            assert est.prefill_ms == pytest.approx(max(pace.ttft_ms, p_host))
            assert est.decode_ms == pytest.approx(max(pace.tpot_ms, d_host))
    # The old rule (fp32 pacing for every model) would have paced the same agent otherwise.
    fp32 = profile_pacer(load_profile(PROFILE), ModelCost.from_config(served.loaded.config, bits_per_weight=32.0))
    assert fp32(100, 32).tpot_ms > served.pacer(100, 32).tpot_ms


def test_paced_tokens_arrive_no_sooner_than_predicted(int4_bundle: Path, tmp_path: Path) -> None:
    agent = build_agent("127.0.0.1:1", PROFILE, str(int4_bundle), tmp_path / "state", emulate=True, pace_tpot_ms=20)
    served = agent.engine
    ids = served.encode("the cat sat on the mat")
    pace = served.pacer(len(ids), 6)
    start = time.perf_counter()
    stamps = [time.perf_counter() - start for _ in served.stream(ids, SamplingParams(max_tokens=6), threading.Event())]
    assert len(stamps) >= 2
    for i, t in enumerate(stamps):
        assert t * 1000 >= pace.ttft_ms + i * pace.tpot_ms - 1.0  # the floor holds for every token (1 ms slack)


def test_the_served_cost_rule_checks_its_input() -> None:
    fp32 = served_model_cost(SMOLLM2, 0)
    assert fp32.bits_per_weight == 32.0 and fp32.kv_bits == 32.0
    half = served_model_cost(SMOLLM2, int(fp32.weight_bytes // 2))
    assert half.bits_per_weight == pytest.approx(16.0, rel=1e-6) and half.kv_bits == 16.0
    with pytest.raises(ValueError, match="weight_bytes"):
        served_model_cost(SMOLLM2, -1)
