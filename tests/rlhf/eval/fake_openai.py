"""A small OpenAI-compatible chat server for tests (no Ray): as a judge it answers by a rule
or always names the first position, as a policy it answers a fixed text."""

from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf.quality.judges import Judge, JudgeConfig

_PAIR = re.compile(r"\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\nReply with", re.DOTALL)


class FakeOpenAI:
    def __init__(self, mode: str = "concise", answer: str = "A short answer."):
        self.mode = mode  # "concise": the concise rule's choice; "first": always A; "babble": no letter
        self.answer = answer
        self.requests: list[dict] = []
        self.rule = Judge(JudgeConfig(rule="concise"))

    def reply(self, body: dict) -> str:
        self.requests.append(body)
        m = _PAIR.search(body["messages"][-1]["content"])
        if m is None:
            return self.answer
        if self.mode == "first":
            return "A"
        if self.mode == "babble":
            return "Both are fine."
        verdict = self.rule.compare("", m.group(1), m.group(2))
        return {"a": "A", "b": "B", "tie": "Neither"}[verdict]


@contextmanager
def serving(fake: FakeOpenAI):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "test"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = fake.reply(body)
            self._send({"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
