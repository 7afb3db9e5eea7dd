"""The contract ProxyHandler inherits from BaseHTTPRequestHandler (issue 13, item 8).

read_request_head() replaces the stock request parsing, so requestline/command/headers are
never set; CPython's send_error() needs them. The proxy's send_error() must answer the CPython
way of calling it with the proxy's JSON error instead of an AttributeError and a dropped socket.
"""

import json
import ssl
import unittest

from support import ca_file, https, proxy, start_proxy

APP = "https://studio.example"


class CallsSendErrorTheCPythonWay(proxy.ProxyHandler):
    """A handler whose routes call send_error() as CPython's own handlers do."""

    def route(self, head):
        path = head.target.split("?", 1)[0]
        if path == "/code-only":
            self.send_error(404)
        elif path.startswith("/with-explain"):      # the SDK adds /models
            self.send_error(413, "Payload Too Large", "the body is over the limit")
        elif path == "/no-body":
            self.send_error(304)
        else:
            super().route(head)


class SendErrorTests(unittest.TestCase):

    def setUp(self):
        self.server = start_proxy(self, allowed_origins=(APP,))
        self.server.RequestHandlerClass = CallsSendErrorTheCPythonWay

    def request(self, method, path):
        conn = https(self.server)
        self.addCleanup(conn.close)
        conn.request(method, path, headers={"Origin": APP})
        response = conn.getresponse()
        return response, response.read()

    def test_code_only_gives_the_reason_as_a_json_error(self):
        response, body = self.request("GET", "/code-only")
        self.assertEqual(response.status, 404)
        self.assertEqual(response.getheader("Content-Type"), "application/json")
        self.assertEqual(int(response.getheader("Content-Length")), len(body))
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), APP)
        self.assertEqual(response.getheader("Connection"), "close")
        self.assertEqual(json.loads(body), {"type": "error", "error": {
            "type": "invalid_request", "message": "Not Found"}})

    def test_message_and_explain_both_reach_the_client(self):
        response, body = self.request("POST", "/with-explain")
        self.assertEqual(response.status, 413)
        self.assertEqual(json.loads(body)["error"]["message"],
                         "Payload Too Large: the body is over the limit")

    def test_head_and_bodiless_statuses_carry_no_body(self):
        response, body = self.request("HEAD", "/code-only")
        self.assertEqual((response.status, body), (404, b""))
        response, body = self.request("GET", "/no-body")
        self.assertEqual((response.status, body), (304, b""))

    def test_an_sdk_reads_the_message(self):
        try:
            import openai
        except ImportError:  # pragma: no cover - depends on the machine
            self.skipTest("the openai SDK is not installed")
        context = ssl.create_default_context(cafile=ca_file())
        client = openai.OpenAI(base_url="https://localhost:%d/with-explain"
                               % self.server.server_address[1], api_key="x", max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=context, timeout=10))
        self.addCleanup(client.close)
        with self.assertRaises(openai.APIStatusError) as raised:
            client.models.list()
        self.assertEqual(raised.exception.status_code, 413)
        self.assertIn("the body is over the limit", str(raised.exception))


if __name__ == "__main__":
    unittest.main()
