"""The hub's error edge: a bug becomes INTERNAL / 500 with a request id, logged with its traceback;
inputs the hub refuses name the field; our own errors keep their status codes.

A bug is planted by making the placement layer raise; the hub must not crash, must not show the
caller a traceback, and must log the traceback under the id the caller was given.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import httpx
import pytest

from tandem import AsyncClient
from tandem.errors import TandemError, Unauthenticated
from tests.hubkit import running_hub, tiny_llama

PLANTED = "planted bug 7f3a"


def _plant(hub) -> None:
    def broken(model: str, chat: bool):
        raise RuntimeError(PLANTED)

    hub.service.placements.candidates = broken


def _logged_ids(caplog: pytest.LogCaptureFixture) -> dict[str, logging.LogRecord]:
    out = {}
    for r in caplog.records:
        m = re.search(r"request id (\w+)", r.getMessage())
        if m and r.exc_info and PLANTED in str(r.exc_info[1]):
            out[m.group(1)] = r
    return out


async def test_a_bug_in_a_grpc_call_is_internal_with_a_request_id(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="tandem.hub")
    async with running_hub(tmp_path / "hub", cloud_model=str(tiny_llama(tmp_path)), mqtt="none") as hub:
        key = hub.registry.create_api_key("t")
        async with AsyncClient(hub.address, api_key=key, timeout=30) as client:
            assert (await client.generate("the cat", max_tokens=2)).text  # healthy before the bug
            _plant(hub)
            with pytest.raises(TandemError) as err:
                await client.generate("the cat", max_tokens=2)
            async with AsyncClient(hub.address, api_key="wrong", timeout=30) as bad:
                with pytest.raises(Unauthenticated):  # our own errors keep their codes
                    await bad.generate("the cat", max_tokens=2)
    assert err.value.code == "INTERNAL"
    message = str(err.value)
    assert PLANTED not in message and "Traceback" not in message
    rid = re.search(r"request id (\w+)", message).group(1)
    assert rid in _logged_ids(caplog)  # the operator finds the traceback by the id the caller saw


async def test_a_bug_in_an_http_call_is_a_500_with_a_request_id(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="tandem.hub")
    model = str(tiny_llama(tmp_path))
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as hub:
        key = hub.registry.create_api_key("t")
        async with httpx.AsyncClient(base_url=f"http://{hub.http_address}", timeout=30) as http:
            auth = {"authorization": f"Bearer {key}"}
            body = {"model": model, "prompt": "the cat", "max_tokens": 2}
            assert (await http.post("/v1/completions", json=body, headers=auth)).status_code == 200
            _plant(hub)
            r = await http.post("/v1/completions", json=body, headers=auth)
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal"
    assert PLANTED not in r.text and "Traceback" not in r.text
    assert r.headers["x-tandem-request-id"] in _logged_ids(caplog)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [{"role": "user", "content": "x\ud800y"}]}, "messages[0].content"),
        ({"prompt": [1000000000, -1]}, "prompt"),
        ({"prompt": "x\udfffy"}, "prompt"),
    ],
)
async def test_hostile_prompts_are_400s_naming_the_field(tmp_path: Path, body: dict, field: str) -> None:
    model = str(tiny_llama(tmp_path))
    async with running_hub(tmp_path / "hub", cloud_model=model, mqtt="none", http_listen="127.0.0.1:0") as hub:
        key = hub.registry.create_api_key("t")
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        # json.dumps writes a lone surrogate as the escape \ud800, which JSON allows and Python decodes
        async with httpx.AsyncClient(base_url=f"http://{hub.http_address}", timeout=30) as http:
            headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
            r = await http.post(path, content=json.dumps({"model": model, **body}), headers=headers)
            healthy = await http.post(
                "/v1/completions",
                json={"model": model, "prompt": "the cat", "max_tokens": 2},
                headers={"authorization": f"Bearer {key}"},
            )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(field + ":")
    assert healthy.status_code == 200  # and the hub serves on
