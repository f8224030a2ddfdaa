"""The CLI's client runs on whichever HTTP client it is handed: httpx's, or httpx2's (Starlette's
TestClient and huggingface_hub use httpx2, and both packages are installed side by side)."""

import importlib

import pytest

from tuneq.client import Client, TuneqError

SSE = (
    b": ping\n\n"
    b'data: {"id": "ev-1", "message": "started"}\n\n'
    b'data: {"id": "ev-2", "message": "done"}\n\n'
    b"event: end\ndata: \n\n"
)


@pytest.fixture(params=["httpx", "httpx2"])
def module(request):
    return pytest.importorskip(request.param)


def client_on(module, handler) -> Client:
    http = module.Client(base_url="http://tuneq.test", transport=module.MockTransport(handler))
    return Client("http://tuneq.test", http=http, api_key="k")


def test_stream_events_passes_a_timeout_either_client_takes(module):
    seen = {}

    def handler(request):
        seen["timeout"] = request.extensions["timeout"]
        return module.Response(200, headers={"content-type": "text/event-stream"}, content=SSE)

    events = list(client_on(module, handler).stream_events("ftjob-1"))
    assert [e["id"] for e in events] == ["ev-1", "ev-2"]
    # The stream waits longer for a read than for anything else: pings come every 15 s.
    assert seen["timeout"] == {"connect": 10.0, "read": 60.0, "write": 10.0, "pool": 10.0}


@pytest.mark.parametrize("call", ["list_jobs", "stream", "download"])
def test_a_network_error_of_either_client_reads_as_one_line(module, call, tmp_path):
    def handler(request):
        raise module.ConnectError("refused", request=request)

    c = client_on(module, handler)
    with pytest.raises(TuneqError, match="tuneq.test"):
        if call == "list_jobs":
            c.list_jobs()
        elif call == "stream":
            list(c.stream_events("ftjob-1"))
        else:
            c.download_artifact("ftjob-1", {"id": "a", "name": "adapter"}, tmp_path / "out")


def test_both_clients_are_installed():
    # The lock holds both (openai and huggingface_hub need httpx2); were one to go, the
    # parametrised tests above would skip it silently.
    for name in ("httpx", "httpx2"):
        importlib.import_module(name)
