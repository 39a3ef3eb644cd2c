"""EndpointJudge against a stub OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from imba.evaluation import pair_questions
from imba.evaluation.endpoint import EndpointConfig, EndpointError, EndpointJudge

SECRET = "sk-test-0123456789abcdef"


class StubState:
    """Behaviour and record of the stub server."""

    def __init__(self) -> None:
        self.fail_first = 0  # answer the first n requests with HTTP 503
        self.delay_s = 0.0  # sleep before answering
        self.status = 200
        self.reply = "Yes."
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0


def make_handler(state: StubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def do_POST(self):  # noqa: N802 (http.server naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(body)
                state.headers.append(dict(self.headers))
                number = len(state.requests)
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                time.sleep(state.delay_s)
                if number <= state.fail_first or state.status != 200:
                    self.send_response(503 if number <= state.fail_first else state.status)
                    self.end_headers()
                    return
                reply = {"choices": [{"message": {"role": "assistant", "content": state.reply}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            finally:
                with state.lock:
                    state.in_flight -= 1

    return Handler


@pytest.fixture
def stub():
    state = StubState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("IMBA_TEST_KEY", SECRET)
    return "IMBA_TEST_KEY"


def _judge(stub, api_key, **options) -> EndpointJudge:
    defaults = {"timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.01, "concurrency": 2}
    return EndpointJudge(EndpointConfig(stub.url, "stub-vlm", api_key, **{**defaults, **options}))


def _image(value: int = 0) -> np.ndarray:
    image = np.zeros((8, 8, 3), np.uint8)
    image[0, 0] = value
    return image


def test_request_layout_and_answer(stub, api_key):
    judge = _judge(stub, api_key)
    question = pair_questions("a red cat", "a blue cow", "a red cat left of a blue cow")[0]
    answer = judge.ask(_image(), question)
    assert answer.answer == "yes"
    assert answer.raw == "Yes."
    body = stub.requests[0]
    assert body["model"] == "stub-vlm"
    content = body["messages"][-1]["content"]
    assert content[0]["text"] == "Is a red cat present in the image?"
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert stub.headers[0]["Authorization"] == f"Bearer {SECRET}"


def test_retry_after_one_failure(stub, api_key, caplog):
    stub.fail_first = 1
    judge = _judge(stub, api_key)
    with caplog.at_level(logging.WARNING, logger="imba.evaluation.endpoint"):
        answer = judge.ask(_image(), pair_questions("a", "b", "a b")[0])
    assert answer.answer == "yes"
    assert len(stub.requests) == 2
    assert "attempt 1 of 3 failed (HTTP 503)" in caplog.text


def test_retries_are_bounded(stub, api_key):
    stub.fail_first = 10
    judge = _judge(stub, api_key, max_retries=2)
    with pytest.raises(EndpointError, match="failed after 3 attempts"):
        judge.ask(_image(), pair_questions("a", "b", "a b")[0])
    assert len(stub.requests) == 3


def test_timeout_is_retried_then_reported(stub, api_key):
    stub.delay_s = 0.5
    judge = _judge(stub, api_key, timeout_s=0.1, max_retries=1)
    start = time.perf_counter()
    with pytest.raises(EndpointError, match="timed out after 0.1 s"):
        judge.ask(_image(), pair_questions("a", "b", "a b")[0])
    assert time.perf_counter() - start < 2.0
    assert len(stub.requests) == 2


def test_client_error_is_not_retried(stub, api_key):
    stub.status = 401
    judge = _judge(stub, api_key)
    with pytest.raises(EndpointError, match="HTTP 401") as info:
        judge.ask(_image(), pair_questions("a", "b", "a b")[0])
    assert len(stub.requests) == 1
    assert SECRET not in str(info.value)


def test_key_absent_from_logs_errors_and_cache(stub, api_key, caplog, tmp_path):
    from imba.evaluation import AnswerCache

    stub.fail_first = 1
    cache_file = tmp_path / "cache.jsonl"
    judge = EndpointJudge(
        EndpointConfig(stub.url, "stub-vlm", api_key, timeout_s=2, backoff_s=0.01),
        AnswerCache(cache_file),
    )
    with caplog.at_level(logging.DEBUG):
        judge.ask(_image(), pair_questions("a", "b", "a b")[0])
        stub.status = 500
        stub.fail_first = 0
        with pytest.raises(EndpointError) as info:
            judge.ask(_image(1), pair_questions("a", "b", "a b")[0])
    assert caplog.records
    assert SECRET not in caplog.text
    assert SECRET not in str(info.value)
    assert SECRET not in repr(judge)
    assert SECRET not in cache_file.read_text()


def test_missing_key_variable(monkeypatch, stub):
    monkeypatch.delenv("IMBA_ABSENT_KEY", raising=False)
    with pytest.raises(ValueError, match="IMBA_ABSENT_KEY is not set"):
        EndpointJudge(EndpointConfig(stub.url, "m", "IMBA_ABSENT_KEY"))


def test_concurrency_limit(stub, api_key):
    stub.delay_s = 0.1
    judge = _judge(stub, api_key, concurrency=2)
    images = [_image(k) for k in range(6)]
    questions = [pair_questions("a", "b", "a b")[0]] * 6
    answers = judge.ask_many(images, questions)
    assert [a.answer for a in answers] == ["yes"] * 6
    assert stub.max_in_flight == 2


def test_cache_avoids_second_request(stub, api_key):
    judge = _judge(stub, api_key)
    question = pair_questions("a", "b", "a b")[0]
    judge.ask(_image(), question)
    again = judge.ask(_image(), question)
    assert again.cached
    assert len(stub.requests) == 1


def test_unparseable_reply_is_counted(stub, api_key):
    stub.reply = "I cannot tell"
    judge = _judge(stub, api_key)
    answer = judge.ask(_image(), pair_questions("a", "b", "a b")[0])
    assert answer.answer is None
    assert judge.stats() == {"asked": 1, "unparseable": 1}
