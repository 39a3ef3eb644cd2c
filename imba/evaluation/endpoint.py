"""A judge that asks a vision-language model behind an OpenAI-compatible chat endpoint.

It sends ``POST {base_url}/chat/completions`` with the question and the image as a base64
PNG data URL, the layout that OpenAI, vLLM, SGLang and llama.cpp servers accept. The API key
comes from an environment variable and is only ever placed in the ``Authorization`` header:
it never appears in logs, errors or cache files.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from imba.evaluation.judge import AnswerCache, Judge, Question

logger = logging.getLogger(__name__)

# HTTP statuses worth retrying: rate limited, or a server-side failure that may pass.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})

SYSTEM_PROMPT = "You judge images. Answer the question with a single word: yes or no."


@dataclass
class EndpointConfig:
    """Connection settings for :class:`EndpointJudge`."""

    base_url: str  # for example http://127.0.0.1:8000/v1; "/chat/completions" is appended
    model: str  # model name the server expects
    api_key_env: str | None = "OPENAI_API_KEY"  # variable holding the key; None sends no key
    timeout_s: float = 60.0  # per request, connect and read together
    max_retries: int = 3  # further attempts after the first failure
    backoff_s: float = 1.0  # first wait; doubles each retry
    max_backoff_s: float = 30.0  # cap on one wait
    concurrency: int = 4  # requests in flight at once
    max_tokens: int = 8  # a one-word reply needs only a few tokens
    temperature: float = 0.0


class EndpointError(RuntimeError):
    """A request failed for good (a non-retryable status, or retries used up)."""


def image_data_url(image: Image.Image) -> str:
    """Encode an image as a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class EndpointJudge(Judge):
    """Asks each question in its own chat request; several requests run at once."""

    name = "endpoint"

    def __init__(self, config: EndpointConfig, cache: AnswerCache | None = None) -> None:
        super().__init__(cache)
        if not config.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {config.base_url!r} must start with http:// or https://")
        if config.concurrency < 1 or config.max_retries < 0 or config.timeout_s <= 0:
            raise ValueError(
                "concurrency must be >= 1, max_retries >= 0 and timeout_s > 0; got "
                f"{config.concurrency}, {config.max_retries}, {config.timeout_s}"
            )
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._api_key = self._read_key(config.api_key_env)

    @staticmethod
    def _read_key(variable: str | None) -> str | None:
        if variable is None:
            return None
        key = os.environ.get(variable)
        if not key:
            raise ValueError(
                f"environment variable {variable} is not set; export the endpoint's API key "
                "there, or pass api_key_env=None for a server that needs no key"
            )
        return key

    @property
    def cache_id(self) -> str:
        return f"{self.name}:{self.config.model}"

    def __repr__(self) -> str:  # never shows the key
        return f"EndpointJudge(url={self.url!r}, model={self.config.model!r})"

    def answer_batch(
        self, images: Sequence[Image.Image], questions: Sequence[Question]
    ) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            return list(pool.map(self.request_one, images, questions))

    def _payload(self, image: Image.Image, question: Question) -> bytes:
        body = {
            "model": self.config.model,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": question.text},
                        {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                    ],
                },
            ],
        }
        return json.dumps(body).encode()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def request_one(self, image: Image.Image, question: Question) -> str:
        """Send one question, retrying timeouts, connection errors and retryable statuses."""
        payload = self._payload(image, question)
        attempts = self.config.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._post(payload)
            except _RetryableError as error:
                if attempt == attempts:
                    raise EndpointError(
                        f"{self.url}: request failed after {attempts} attempts ({error}); "
                        "check that the server is up, or raise timeout_s / max_retries"
                    ) from None
                wait = min(self.config.backoff_s * 2 ** (attempt - 1), self.config.max_backoff_s)
                logger.warning(
                    "%s: attempt %d of %d failed (%s); retrying in %.1f s",
                    self.url,
                    attempt,
                    attempts,
                    error,
                    wait,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _post(self, payload: bytes) -> str:
        request = urllib.request.Request(self.url, data=payload, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            status = error.code
            error.close()
            if status in RETRY_STATUSES:
                raise _RetryableError(f"HTTP {status}") from None
            raise EndpointError(
                f"{self.url}: HTTP {status} {error.reason}; check base_url, model and the key "
                f"in {self.config.api_key_env}"
            ) from None
        except TimeoutError as error:
            raise _RetryableError(f"timed out after {self.config.timeout_s} s") from error
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError | socket.timeout):
                raise _RetryableError(f"timed out after {self.config.timeout_s} s") from None
            raise _RetryableError(f"connection failed: {error.reason}") from None
        return self._reply_text(body)

    def _reply_text(self, body: bytes) -> str:
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
            raise EndpointError(
                f"{self.url}: reply is not a chat completion ({type(error).__name__}): "
                f"{body[:200]!r}"
            ) from None
        if isinstance(content, list):  # content parts
            content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content or "")


class _RetryableError(Exception):
    """A failure that another attempt may not repeat."""
