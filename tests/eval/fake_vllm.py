"""A stand-in for vLLM's OpenAI-compatible server, for testing our client and engine without vLLM: ``/health``,
``/version``, ``/v1/models`` and ``/v1/completions`` (streamed text pieces from a script, or prompt logprobs).

Every completion request is recorded; a streamed one whose script holds :data:`HOLD` stops there until the client
closes the connection (then the request is recorded as aborted) or 10 s pass (then it sends the rest).

As a program (``python fake_vllm.py -m vllm.entrypoints.openai.api_server --model DIR --port P ...``, what
``gptqlora.eval.vllm.VLLMServer`` runs) it serves DIR as ``base`` and any ``--lora-modules NAME=PATH``, after writing
its pid and arguments to ``$FAKE_VLLM_RECORD``; ``$FAKE_VLLM_FAIL=start`` makes it exit with an error instead.
"""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOLD = object()  # in a script: wait here for the client to close the stream


class FakeVLLM:
    def __init__(self, models: list[dict], script: Callable[[dict], list], *,
                 logprob: Callable[[int, int], float] = lambda position, token: -1.0, version: str = "0.0.0-fake",
                 port: int = 0):
        self.models, self.script, self.logprob, self.version = models, script, logprob, version
        self.requests: list[dict] = []
        self.aborted: list[bool] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def _json(self, value, status=200):
                body = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health":
                    self._json({})
                elif self.path == "/version":
                    self._json({"version": fake.version})
                elif self.path == "/v1/models":
                    self._json({"object": "list", "data": fake.models})
                else:
                    self._json({"error": {"message": "not found"}}, 404)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append(body)
                if body.get("max_tokens", 1) + len(body["prompt"]) > 10_000:
                    self._json({"error": {"message": "This model's maximum context length is 10000 tokens"}}, 400)
                    return
                if body.get("prompt_logprobs") is not None:
                    ids = body["prompt"]
                    out = [None] + [{str(t): {"logprob": fake.logprob(i, t), "rank": 1}} for i, t in enumerate(ids)
                                    if i > 0]
                    self._json({"choices": [{"index": 0, "text": "", "prompt_logprobs": out}]})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                aborted = False
                for piece in fake.script(body):
                    if piece is HOLD:
                        aborted = _closed_within(self.connection, 10.0)
                        if aborted:
                            break
                        continue
                    event = {"choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                    self.wfile.flush()
                if not aborted:
                    self.wfile.write(b"data: [DONE]\n\n")
                with fake._lock:
                    fake.aborted.append(aborted)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeVLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _closed_within(conn: socket.socket, seconds: float) -> bool:
    """Whether the peer closes ``conn`` within ``seconds`` (its end reads as EOF)."""
    ready, _, _ = select.select([conn], [], [], seconds)
    if not ready:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def main(argv: list[str]) -> None:
    import os
    import sys

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    with open(os.environ["FAKE_VLLM_RECORD"], "w") as f:
        json.dump({"pid": os.getpid(), "argv": argv}, f)
    if os.environ.get("FAKE_VLLM_FAIL") == "start":
        print("ValueError: the fake server was told to fail", file=sys.stderr)
        sys.exit(1)
    models = [{"id": "base", "root": value("--model"), "parent": None}]
    if "--lora-modules" in argv:
        name, path = value("--lora-modules").split("=", 1)
        models.append({"id": name, "root": path, "parent": "base"})
    script = lambda body: [" So", "\n#### 42\n", HOLD, "rest"]  # noqa: E731
    with FakeVLLM(models, script, port=int(value("--port"))):
        threading.Event().wait()


if __name__ == "__main__":
    import sys

    main(sys.argv[3:])  # after -m MODULE
