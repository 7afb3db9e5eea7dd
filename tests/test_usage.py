"""Tests for the usage-extraction section of proxy.py (classify, inspect, inject, UsageTap).

Every wire format is pinned by a sample shaped like the real API (PROTOCOLS.md "Token usage by
API"), fed whole, byte by byte and in 50 seeded random splits: the usage must be the same each time
and the client must receive exactly the upstream bytes (the very same objects, unless stripping).

Run: python3 tests/run.py test_usage
Benchmark (not a test): cd tests && python3 -c "import test_usage; test_usage.bench_tap()"
"""

import gzip
import json
import random
import time
import unittest
import zlib

from support import proxy

SEED = 1729
RANDOM_SPLITS = 50


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def dumps(obj):
    """Compact JSON as the APIs send it in streams."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def sse(data, event=None):
    """One SSE event, LF line endings."""
    head = "event: %s\n" % event if event else ""
    return (head + "data: " + (data if isinstance(data, str) else dumps(data)) + "\n\n").encode("utf-8")


def random_pieces(data, rng):
    """Cut ``data`` at random places (1 to 60 pieces, sometimes very small)."""
    if len(data) < 2:
        return [data]
    count = rng.randint(1, min(60, len(data) - 1))
    cuts = sorted(rng.sample(range(1, len(data)), count))
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


class StrippingTap:
    """What the relay loop does for a request the proxy injected include_usage into: the
    backend's bytes go through an InjectedUsageStripper (when the body can be stripped) to the
    client, and through the UsageTap as they came."""

    def __init__(self, kind, info, content_type, encoding, max_line=proxy.USAGE_MAX_LINE,
                 **kwargs):
        self.tap = proxy.UsageTap(kind, info, content_type, encoding, injected=True,
                                  max_line=max_line, **kwargs)
        self.stripper = (proxy.InjectedUsageStripper(max_line)
                         if proxy.InjectedUsageStripper.wanted(True, content_type, encoding)
                         else None)

    def feed(self, data):
        self.tap.feed(data)
        return self.stripper.feed(data) if self.stripper is not None else data

    def finish(self, complete=True):
        leftover = self.stripper.finish() if self.stripper is not None else b""
        return leftover, self.tap.finish(complete)[1]

    @property
    def held_bytes(self):
        return self.stripper.held_bytes if self.stripper is not None else self.tap.held_bytes


def run_tap(kind, pieces, content_type=None, encoding=None, info=None, strip=False,
            complete=True, **kwargs):
    """Feed ``pieces`` through a new tap; return (bytes sent to the client, usage, tap)."""
    tap = (StrippingTap(kind, info, content_type, encoding, **kwargs) if strip
           else proxy.UsageTap(kind, info, content_type, encoding, **kwargs))
    out = []
    for piece in pieces:
        result = tap.feed(piece)
        if not strip:
            assert result is piece, "feed must return the very same object when not stripping"
        out.append(result)
    leftover, usage = tap.finish(complete)
    out.append(leftover)
    return b"".join(out), usage, tap


def usage_dict(model, prompt, completion, cache_read=0, cache_write=0, reasoning=0,
               source="reported", error=None):
    return {"model": model, "prompt": prompt, "completion": completion,
            "total": prompt + completion, "cacheRead": cache_read, "cacheWrite": cache_write,
            "reasoning": reasoning, "source": source, "error": error}


class TapCase(unittest.TestCase):
    maxDiff = None

    def assertStable(self, kind, body, content_type, expected, encoding=None, info=None,
                     **kwargs):
        """Whole, byte by byte and 50 random splits: same usage, bytes passed on untouched."""
        rng = random.Random(SEED)
        ways = [("whole", [body]), ("bytewise", [body[i:i + 1] for i in range(len(body))])]
        ways += [("split%d" % n, random_pieces(body, rng)) for n in range(RANDOM_SPLITS)]
        for name, pieces in ways:
            out, usage, _tap = run_tap(kind, pieces, content_type, encoding, info, **kwargs)
            self.assertEqual(out, body, name)
            self.assertEqual(usage, expected, name)
        return expected


# ---------------------------------------------------------------------------------------------
# Realistic samples
# ---------------------------------------------------------------------------------------------

OPENAI_CHAT_BODY = json.dumps({
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant",
                    "content": "The image shows a wooden boardwalk through a lush green meadow.",
                    "refusal": None, "annotations": []},
        "logprobs": None,
        "finish_reason": "stop",
    }],
    "usage": {
        "prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}, indent=2).encode()   # OpenAI pretty-prints non-streaming bodies

STREAM_USAGE = {
    "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 192, "audio_tokens": 0,
                                  "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
}
WORDS = ["Hello", "!", " How", " can", " I", " help", " you", " today", "?", " Ask", " me",
         " about", " \"usage\"", " or", " errors", ",", " émigré", " 日本", "."]


def openai_chat_stream(include_usage, model="o4-mini-2025-04-16", words=WORDS, usage=STREAM_USAGE,
                       usage_first=False, newline="\n", pings=False):
    """An OpenAI chat.completion.chunk stream, exactly as the API shapes it.

    With include_usage every chunk carries "usage":null and an extra usage-only chunk
    ("choices": []) comes just before [DONE].  ``usage_first`` puts the usage member first.
    """
    events = []
    created = 1754000000
    obfuscation = ["dJmyTl2A", "Q8", "hz3kx", "K", "u5Tq", "aaB", "0x", "Pe", "7wL"]

    def chunk(choices, usage_value, n):
        obj = {}
        if include_usage and usage_first:
            obj["usage"] = usage_value
        obj.update({"id": "chatcmpl-C0XbYp7Ts1hfJ3o8b9wCfUq2lRr5k", "object": "chat.completion.chunk",
                    "created": created, "model": model, "service_tier": "default",
                    "system_fingerprint": "fp_6f2eabb9a5", "choices": choices})
        if include_usage and not usage_first:
            obj["usage"] = usage_value
        obj["obfuscation"] = obfuscation[n % len(obfuscation)]
        return obj

    def choice(delta, finish=None):
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    events.append(sse(chunk(choice({"role": "assistant", "content": "", "refusal": None}), None, 0)))
    for n, word in enumerate(words, 1):
        events.append(sse(chunk(choice({"content": word}), None, n)))
        if pings and n % 5 == 0:
            events.append(b": keep-alive\n\n")
    events.append(sse(chunk(choice({}, "stop"), None, 99)))
    if include_usage:
        events.append(sse(chunk([], usage, 100)))
    events.append(b"data: [DONE]\n\n")
    body = b"".join(events)
    return body.replace(b"\n", newline.encode()) if newline != "\n" else body


def openai_completions_stream(include_usage):
    events = []
    for n, text in enumerate(["\n\n", "This", " is", " indeed", " a", " test", ""]):
        obj = {"id": "cmpl-7iA7iJjj8V2zOkCGvWF2hAkDWBQZe", "object": "text_completion",
               "created": 1690759702,
               "choices": [{"text": text, "index": 0, "logprobs": None,
                            "finish_reason": "length" if n == 6 else None}],
               "model": "gpt-3.5-turbo-instruct"}
        if include_usage:
            obj["usage"] = None
        events.append(sse(obj))
    if include_usage:
        events.append(sse({"id": "cmpl-7iA7iJjj8V2zOkCGvWF2hAkDWBQZe", "object": "text_completion",
                           "created": 1690759702, "choices": [], "model": "gpt-3.5-turbo-instruct",
                           "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


OPENAI_COMPLETIONS_BODY = json.dumps({
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [{"text": "\n\nThis is indeed a test", "index": 0, "logprobs": None,
                 "finish_reason": "length"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}, indent=2).encode()

OPENAI_EMBEDDINGS_BODY = json.dumps({
    "object": "list",
    "data": [{"object": "embedding", "index": i,
              "embedding": [round(0.0023064255 * (k + 1) * (-1) ** k, 10) for k in range(64)]}
             for i in range(3)],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 24, "total_tokens": 24},
}).encode()

RESPONSE_OBJECT = {
    "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b", "object": "response",
    "created_at": 1741476542, "status": "completed", "background": False, "error": None,
    "incomplete_details": None, "instructions": None, "max_output_tokens": None,
    "model": "gpt-4.1-2025-04-14",
    "output": [{"type": "message", "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b",
                "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "annotations": [], "logprobs": [],
                             "text": "In a peaceful grove beneath a silver moon..."}]}],
    "parallel_tool_calls": True, "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None}, "service_tier": "default", "store": True,
    "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"},
    "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
    "usage": {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 12},
              "output_tokens": 87, "output_tokens_details": {"reasoning_tokens": 20},
              "total_tokens": 123},
    "user": None, "metadata": {},
}
RESPONSES_BODY = json.dumps(RESPONSE_OBJECT, indent=2).encode()


def responses_stream(terminal="response.completed", usage=True, done=False):
    """An OpenAI Responses SSE stream ending in ``terminal``."""
    base = dict(RESPONSE_OBJECT, status="in_progress", output=[], usage=None)
    item_id = "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b"
    seq = iter(range(1000))
    events = [
        sse({"type": "response.created", "sequence_number": next(seq), "response": base},
            "response.created"),
        sse({"type": "response.in_progress", "sequence_number": next(seq), "response": base},
            "response.in_progress"),
        sse({"type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0,
             "item": {"id": item_id, "type": "message", "status": "in_progress", "content": [],
                      "role": "assistant"}}, "response.output_item.added"),
        sse({"type": "response.content_part.added", "sequence_number": next(seq),
             "item_id": item_id, "output_index": 0, "content_index": 0,
             "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}},
            "response.content_part.added"),
    ]
    for word in ["In", " a", " peaceful", " grove", " (usage", " error)", "..."]:
        events.append(sse({"type": "response.output_text.delta", "sequence_number": next(seq),
                           "item_id": item_id, "output_index": 0, "content_index": 0,
                           "delta": word, "logprobs": [], "obfuscation": "Xq1"},
                          "response.output_text.delta"))
    events.append(sse({"type": "response.output_text.done", "sequence_number": next(seq),
                       "item_id": item_id, "output_index": 0, "content_index": 0,
                       "text": "In a peaceful grove (usage error)...", "logprobs": []},
                      "response.output_text.done"))
    final = dict(RESPONSE_OBJECT)
    if terminal == "response.incomplete":
        final.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    elif terminal == "response.failed":
        final.update(status="failed", output=[],
                     error={"code": "server_error",
                            "message": "The model failed to generate a response."})
    if not usage:
        final["usage"] = None
    events.append(sse({"type": terminal, "sequence_number": next(seq), "response": final},
                      terminal))
    if done:
        events.append(b"data: [DONE]\n\n")
    return b"".join(events)


ANTHROPIC_BODY = json.dumps({
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "content": [{"type": "text", "text": "Hello! How can I help you today?"}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 12, "cache_creation_input_tokens": 1500,
              "cache_read_input_tokens": 2048,
              "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 0},
              "output_tokens": 6, "service_tier": "standard"},
}).encode()


def anthropic_stream(repeat_cumulative=False, error=False, newline="\n"):
    """An Anthropic Messages SSE stream (with ping); optionally the newer message_delta that
    repeats the cumulative input/cache counts, twice, or an overloaded error inside the 200."""
    start_usage = {"input_tokens": 472, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 2048,
                   "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                   "output_tokens": 2, "service_tier": "standard"}
    events = [
        sse({"type": "message_start",
             "message": {"id": "msg_01GKBn1c8HLqQfJuAHi8gWA9", "type": "message",
                         "role": "assistant", "model": "claude-sonnet-4-20250514", "content": [],
                         "stop_reason": None, "stop_sequence": None, "usage": start_usage}},
            "message_start"),
        sse({"type": "content_block_start", "index": 0,
             "content_block": {"type": "text", "text": ""}}, "content_block_start"),
        sse('{"type": "ping"}', "ping"),
    ]
    for n, text in enumerate(["Hello", "! The", " usage", " of", " \"message_delta\"", "..."]):
        events.append(sse({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": text}}, "content_block_delta"))
        if error and n == 2:
            events.append(sse({"type": "error", "error": {"details": None, "type": "overloaded_error",
                                                          "message": "Overloaded"}}, "error"))
            body = b"".join(events)
            return body.replace(b"\n", newline.encode()) if newline != "\n" else body
    events.append(sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    if repeat_cumulative:
        for out in (40, 89):
            events.append(sse({"type": "message_delta",
                               "delta": {"stop_reason": "end_turn" if out == 89 else None,
                                         "stop_sequence": None},
                               "usage": {"input_tokens": 472, "cache_creation_input_tokens": 0,
                                         "cache_read_input_tokens": 2048, "output_tokens": out,
                                         "server_tool_use": {"web_search_requests": 0}}},
                              "message_delta"))
    else:
        events.append(sse({"type": "message_delta",
                           "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": 89}}, "message_delta"))
    events.append(sse({"type": "message_stop"}, "message_stop"))
    body = b"".join(events)
    return body.replace(b"\n", newline.encode()) if newline != "\n" else body


def ndjson(objs):
    return b"".join(dumps(o).encode("utf-8") + b"\n" for o in objs)


def ollama_generate_stream(with_prompt_count=True):
    objs = [{"model": "llama3.2", "created_at": "2024-08-04T08:52:19.385406455-07:00",
             "response": w, "done": False} for w in ["The", " sky", " is", " blue", "."]]
    final = {"model": "llama3.2", "created_at": "2024-08-04T19:22:45.499127Z", "response": "",
             "done": True, "done_reason": "stop", "context": [1, 2, 3],
             "total_duration": 10706818083, "load_duration": 6338219291,
             "prompt_eval_count": 26, "prompt_eval_duration": 130079000, "eval_count": 259,
             "eval_duration": 4232710000}
    if not with_prompt_count:   # Ollama omits zero counts (prompt fully cached)
        del final["prompt_eval_count"], final["prompt_eval_duration"]
    return ndjson(objs + [final])


def ollama_chat_stream(error=False):
    objs = [{"model": "qwen3:8b-q4_K_M", "created_at": "2025-05-03T10:11:12.345678Z",
             "message": {"role": "assistant", "content": w}, "done": False}
            for w in ["Why", " is", " the", " sky", " blue", "?"]]
    if error:
        return ndjson(objs[:3] + [{"error": "an error was encountered while running the model: "
                                            "unexpected EOF"}])
    objs.append({"model": "qwen3:8b-q4_K_M", "created_at": "2025-05-03T10:11:14.001Z",
                 "message": {"role": "assistant", "content": ""}, "done_reason": "stop",
                 "done": True, "total_duration": 4883583458, "load_duration": 1334875,
                 "prompt_eval_count": 26, "prompt_eval_duration": 342546000, "eval_count": 282,
                 "eval_duration": 4535599000})
    return ndjson(objs)


OLLAMA_GENERATE_BODY = dumps({
    "model": "llama3.2", "created_at": "2023-08-04T19:22:45.499127Z",
    "response": "The sky is blue because it is the color of the sky.", "done": True,
    "done_reason": "stop", "context": [1, 2, 3], "total_duration": 5043500667,
    "load_duration": 5025959, "prompt_eval_count": 26, "prompt_eval_duration": 325953000,
    "eval_count": 290, "eval_duration": 4709213000}).encode()

OLLAMA_CHAT_BODY = dumps({
    "model": "llama3.2", "created_at": "2023-12-12T14:13:43.416799Z",
    "message": {"role": "assistant", "content": "Hello! How are you today?"}, "done": True,
    "done_reason": "stop", "total_duration": 5191566416, "load_duration": 2154458,
    "prompt_eval_count": 26, "prompt_eval_duration": 383809000, "eval_count": 298,
    "eval_duration": 4799921000}).encode()

OLLAMA_EMBED_BODY = dumps({
    "model": "all-minilm",
    "embeddings": [[0.010071029, -0.0017594862, 0.05007221, 0.04692972, 0.054916814,
                    0.008599704, 0.105441414, -0.025878139, 0.12958129, 0.031952348]],
    "total_duration": 14143917, "load_duration": 1019500, "prompt_eval_count": 8}).encode()

LLAMACPP_TIMINGS = {"prompt_n": 10, "prompt_ms": 30.515, "prompt_per_token_ms": 3.0515,
                    "prompt_per_second": 327.7, "predicted_n": 3, "predicted_ms": 40.12,
                    "predicted_per_token_ms": 13.37, "predicted_per_second": 74.77}
LLAMACPP_FINAL = {
    "index": 0, "content": " Paris.", "tokens": [], "id_slot": 0, "stop": True,
    "model": "gemma-3-4b-it-Q4_K_M.gguf", "tokens_predicted": 3, "tokens_evaluated": 10,
    "generation_settings": {"n_predict": -1, "seed": 4294967295, "temperature": 0.8,
                            "top_k": 40, "top_p": 0.95, "stream": False},
    "prompt": "<bos>The capital of France is", "has_new_line": False, "truncated": False,
    "stop_type": "eos", "stopping_word": "", "tokens_cached": 12, "timings": LLAMACPP_TIMINGS,
}
LLAMACPP_BODY = dumps(LLAMACPP_FINAL).encode()


def llamacpp_stream():
    events = [b": ping\n\n"]
    for n, (text, tok) in enumerate([(" Paris", 6342), (".", 29889)], 1):
        events.append(sse({"index": 0, "content": text, "tokens": [tok], "stop": False,
                           "id_slot": -1, "tokens_predicted": n, "tokens_evaluated": 10}))
        events.append(b": ping\n\n")
    events.append(sse(dict(LLAMACPP_FINAL, content="")))
    return b"".join(events)


def ollama_openai_stream():
    """Ollama's OpenAI-compatible /v1/chat/completions with include_usage (no usage:null)."""
    def chunk(delta, finish):
        return {"id": "chatcmpl-396", "object": "chat.completion.chunk", "created": 1739000000,
                "model": "qwen3:8b", "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    events = [sse(chunk({"role": "assistant", "content": w}, None)) for w in ["Hi", " there", "!"]]
    events.append(sse(chunk({"role": "assistant", "content": ""}, "stop")))
    events.append(sse({"id": "chatcmpl-396", "object": "chat.completion.chunk",
                       "created": 1739000000, "model": "qwen3:8b",
                       "system_fingerprint": "fp_ollama", "choices": [],
                       "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}}))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


EXPECT_STREAM = usage_dict("o4-mini-2025-04-16", 2006, 300, cache_read=1920, reasoning=192)
EXPECT_ANTHROPIC_STREAM = usage_dict("claude-sonnet-4-20250514", 472 + 2048, 89, cache_read=2048)


# ---------------------------------------------------------------------------------------------
# Endpoint classification
# ---------------------------------------------------------------------------------------------

class ClassifyTest(unittest.TestCase):
    TABLE = [
        ("/v1/chat/completions", "openai_chat"),
        ("/chat/completions", "openai_chat"),
        ("/ollama/v1/chat/completions", "openai_chat"),
        ("/v1/chat/completions/", "openai_chat"),
        ("/v1/completions", "openai_completions"),
        ("/v1/embeddings", "openai_embeddings"),
        ("/v1/responses", "openai_responses"),
        ("/openai/v1/responses/", "openai_responses"),
        ("/v1/messages", "anthropic_messages"),
        ("/anthropic/v1/messages", "anthropic_messages"),
        ("/v1/messages/count_tokens", "anthropic_count_tokens"),
        ("/api/generate", "ollama_generate"),
        ("/api/chat", "ollama_chat"),
        ("/api/chat/", "ollama_chat"),
        ("/api/embed", "ollama_embed"),
        ("/api/embeddings", "ollama_embed"),
        ("/completion", "llamacpp_completion"),
        ("/infill", "llamacpp_completion"),
        ("/v1/chat/completions?api-version=2024-10-21", "openai_chat"),
        ("/api/tags", None),
        ("/v1/models", None),
        ("/v1/messagesX", None),
        ("/v1/messages/batches", None),
        ("/v1/responses/resp_123", None),
        ("/v1/chat/completions/chatcmpl-123", None),
        ("/api/show", None),
        ("/health", None),
        ("/", None),
        ("", None),
        ("/v1/xcompletions", None),
    ]

    def test_table(self):
        for path, kind in self.TABLE:
            self.assertEqual(proxy.classify_endpoint(path), kind, path)

    def test_completion_and_usage_kinds(self):
        completions = {"openai_chat", "openai_completions", "openai_responses", "anthropic_messages",
                       "ollama_generate", "ollama_chat", "llamacpp_completion"}
        all_kinds = {k for _p, k in self.TABLE if k}
        for kind in all_kinds | {None}:
            self.assertEqual(proxy.is_completion_kind(kind), kind in completions, kind)
            self.assertEqual(proxy.is_usage_kind(kind),
                             kind is not None and kind != "anthropic_count_tokens", kind)


# ---------------------------------------------------------------------------------------------
# Request inspection and include_usage injection
# ---------------------------------------------------------------------------------------------

BIG_MESSAGES = [{"role": "user", "content": "x" * 50000 + " \"stream\": false, \"model\": \"no\""},
                {"role": "user", "content": [{"type": "image_url",
                                              "image_url": {"url": "data:image/png;base64," + "A" * 100000}}]}]


class InspectRequestTest(unittest.TestCase):
    def test_whole_body(self):
        body = dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                      "stream": True, "stream_options": {"include_usage": True}}).encode()
        self.assertEqual(proxy.inspect_request("openai_chat", body, True),
                         proxy.RequestInfo("gpt-4o", True, True))
        body = json.dumps({"model": "claude-haiku-4-5-20251001", "max_tokens": 20,
                           "messages": [{"role": "user", "content": "Hi"}]}, indent=2).encode()
        self.assertEqual(proxy.inspect_request("anthropic_messages", body, True),
                         proxy.RequestInfo("claude-haiku-4-5-20251001", None, False))
        body = b'{"model":"llama3.2","prompt":"Why?","stream":false}'
        self.assertEqual(proxy.inspect_request("ollama_generate", body, True),
                         proxy.RequestInfo("llama3.2", False, False))

    def test_odd_values(self):
        for body, expected in [
            (b'{"model": 7, "stream": "true", "stream_options": {"include_usage": 1}}',
             proxy.RequestInfo(None, None, False)),
            (b'{"model":"m","stream":true,"stream_options":null}', proxy.RequestInfo("m", True, False)),
            (b'[1, 2, 3]', proxy.RequestInfo()),
            (b'', proxy.RequestInfo()),
            (b'\x00\xff\xfe garbage {{{', proxy.RequestInfo()),
            (b'{"model": "m", "stream": true', proxy.RequestInfo("m", None, False)),  # cut short
            (b'\xef\xbb\xbf{"model":"bom","stream":true}', proxy.RequestInfo("bom", True, False)),
        ]:
            self.assertEqual(proxy.inspect_request("openai_chat", body, True), expected, body[:40])
            self.assertIsInstance(proxy.inspect_request("openai_chat", body, False), proxy.RequestInfo)

    def test_prefix_with_keys_first(self):
        body = json.dumps({"model": "gpt-4o", "stream": True,
                           "stream_options": {"include_usage": True},
                           "messages": BIG_MESSAGES}).encode()
        prefix = body[:proxy.BODY_PEEK_LIMIT]
        self.assertEqual(proxy.inspect_request("openai_chat", prefix, False),
                         proxy.RequestInfo("gpt-4o", True, True))

    def test_prefix_with_stream_after_the_cut(self):
        # The strings inside "messages" mention "stream" and "model": they must not be taken.
        body = json.dumps({"model": "gpt-4o", "messages": BIG_MESSAGES, "stream": True}).encode()
        prefix = body[:proxy.BODY_PEEK_LIMIT]
        self.assertEqual(proxy.inspect_request("openai_chat", prefix, False),
                         proxy.RequestInfo("gpt-4o", None, False))

    def test_prefix_cut_inside_values(self):
        for prefix, expected in [
            (b'{"model": "gpt-4o", "stream": tr', proxy.RequestInfo("gpt-4o", None, False)),
            (b'{"model": "gpt-4o", "stream": true', proxy.RequestInfo("gpt-4o", None, False)),
            (b'{"model": "gpt-4o", "stream": true,', proxy.RequestInfo("gpt-4o", True, False)),
            (b'{"model": "gpt-', proxy.RequestInfo()),
            (b'{"mo', proxy.RequestInfo()),
            (b'{"model": "caf\xc3', proxy.RequestInfo()),
            (b'{"model":"m","stream_options":{"include_usage":true},"x":[',
             proxy.RequestInfo("m", None, True)),
        ]:
            self.assertEqual(proxy.inspect_request("openai_chat", prefix, False), expected, prefix)

    def test_never_raises(self):
        rng = random.Random(SEED)
        for _ in range(300):
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
            if rng.random() < 0.5:
                body = b'{"model":"m",' + body
            for complete in (True, False):
                self.assertIsInstance(proxy.inspect_request("openai_chat", body, complete),
                                      proxy.RequestInfo)
        deep = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
        self.assertEqual(proxy.inspect_request("openai_chat", deep, True), proxy.RequestInfo())
        self.assertEqual(proxy.inspect_request("openai_chat", deep, False), proxy.RequestInfo())


class InjectStreamUsageTest(unittest.TestCase):
    def inject(self, body, kind="openai_chat"):
        info = proxy.inspect_request(kind, body, True)
        return proxy.inject_stream_usage(kind, body, info)

    def test_adds_include_usage_and_keeps_every_other_byte(self):
        body = json.dumps({"model": "gpt-4o-mini",
                           "messages": [{"role": "user", "content": "Grüß dich — 你好 \"quoted\""}],
                           "temperature": 0.7, "stream": True}, indent=2,
                          ensure_ascii=False).encode("utf-8")
        new = self.inject(body)
        self.assertIsNotNone(new)
        self.assertTrue(new.startswith(body[:-1]), "everything before the closing brace kept")
        self.assertTrue(new.endswith(b"}"))
        obj = json.loads(new)
        self.assertEqual(obj.pop("stream_options"), {"include_usage": True})
        self.assertEqual(obj, json.loads(body))
        self.assertEqual(list(json.loads(new))[-1], "stream_options")
        self.assertEqual(proxy.inspect_request("openai_chat", new, True),
                         proxy.RequestInfo("gpt-4o-mini", True, True))

    def test_keeps_other_stream_options(self):
        body = b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":false},"n":1}'
        new = self.inject(body)
        self.assertEqual(new, b'{"model":"m","stream":true,"stream_options":'
                              b'{"continuous_usage_stats":false,"include_usage":true},"n":1}')
        body = b'{"stream_options": {"include_usage": false}, "stream": true, "prompt": "x"}'
        self.assertEqual(self.inject(body, "openai_completions"),
                         b'{"stream_options": {"include_usage":true}, "stream": true, "prompt": "x"}')
        body = b'{"model":"m","stream":true,"stream_options":null}'
        self.assertEqual(self.inject(body), b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}')

    def test_leaves_alone(self):
        for kind, body in [
            ("openai_chat", b'{"model":"m","messages":[]}'),                       # not streaming
            ("openai_chat", b'{"model":"m","stream":false}'),
            ("openai_chat", b'{"model":"m","stream":"true"}'),
            ("openai_chat", b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}'),
            ("openai_chat", b'{"model":"m","stream":true,"stream_options":"yes"}'),
            ("openai_chat", b'{"model":"m","stream":true'),                        # truncated
            ("openai_chat", b'{"model":"m","stream":true} trailing'),
            ("openai_chat", b'{"model":"m","stream":true}{}'),
            ("openai_chat", b'{"model":"m",,"stream":true}'),
            ("openai_chat", b'{"model":"\xff","stream":true}'),                     # not UTF-8
            ("openai_chat", b'[{"stream":true}]'),
            ("openai_chat", b''),
            ("anthropic_messages", b'{"model":"m","stream":true}'),
            ("openai_responses", b'{"model":"m","stream":true}'),
            ("ollama_chat", b'{"model":"m","stream":true}'),
            (None, b'{"model":"m","stream":true}'),
        ]:
            self.assertIsNone(proxy.inject_stream_usage(kind, body, None), body)
            self.assertIsNone(self.inject(body, kind), body)

    def test_duplicate_keys_follow_json_semantics(self):
        # json.loads (and most servers) keep the last duplicate: so do we.
        self.assertIsNone(self.inject(b'{"stream":true,"stream":false}'))
        self.assertEqual(self.inject(b'{"stream":false,"stream":true}'),
                         b'{"stream":false,"stream":true,"stream_options":{"include_usage":true}}')


# ---------------------------------------------------------------------------------------------
# The tap, API by API
# ---------------------------------------------------------------------------------------------

class OpenAITest(TapCase):
    def test_chat_non_stream(self):
        self.assertStable("openai_chat", OPENAI_CHAT_BODY, "application/json",
                          usage_dict("gpt-4o-2024-08-06", 1117, 46, cache_read=1024))

    def test_chat_stream_with_include_usage(self):
        self.assertStable("openai_chat", openai_chat_stream(True), "text/event-stream",
                          EXPECT_STREAM)

    def test_chat_stream_with_pings_and_usage_first(self):
        body = openai_chat_stream(True, usage_first=True, pings=True)
        self.assertStable("openai_chat", body, "text/event-stream; charset=utf-8", EXPECT_STREAM)

    def test_chat_stream_without_include_usage_is_missing(self):
        info = proxy.RequestInfo("o4-mini", True, False)
        self.assertStable("openai_chat", openai_chat_stream(False), "text/event-stream",
                          usage_dict("o4-mini-2025-04-16", 0, 0, source="missing"), info=info)

    def test_model_falls_back_to_request(self):
        body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
        info = proxy.RequestInfo("requested-model", True, False)
        self.assertStable("openai_chat", body, "text/event-stream",
                          usage_dict("requested-model", 0, 0, source="missing"), info=info)

    def test_legacy_completions(self):
        self.assertStable("openai_completions", OPENAI_COMPLETIONS_BODY, "application/json",
                          usage_dict("gpt-3.5-turbo-instruct", 5, 7))
        self.assertStable("openai_completions", openai_completions_stream(True),
                          "text/event-stream", usage_dict("gpt-3.5-turbo-instruct", 5, 7))

    def test_embeddings(self):
        expected = self.assertStable("openai_embeddings", OPENAI_EMBEDDINGS_BODY, "application/json",
                                     usage_dict("text-embedding-3-small", 24, 0))
        self.assertEqual(expected["total"], 24)

    def test_ollama_openai_compatible(self):
        self.assertStable("openai_chat", ollama_openai_stream(), "text/event-stream",
                          usage_dict("qwen3:8b", 12, 30))

    def test_llamacpp_openai_compatible_timings_and_usage(self):
        last = {"choices": [{"finish_reason": "stop", "index": 0, "delta": {}}],
                "created": 1741000000, "id": "chatcmpl-Xyz", "model": "gemma-3-4b-it",
                "system_fingerprint": "b5000-abc", "object": "chat.completion.chunk",
                "timings": LLAMACPP_TIMINGS}
        first = dict(last, choices=[{"finish_reason": None, "index": 0,
                                     "delta": {"content": "Paris"}}])
        first.pop("timings")
        body = sse(first) + sse(last) + b"data: [DONE]\n\n"
        # Without include_usage only `timings` is there: prompt_n / predicted_n.
        self.assertStable("openai_chat", body, "text/event-stream", usage_dict("gemma-3-4b-it", 10, 3))
        usage_chunk = dict(last, choices=[], usage={"completion_tokens": 3, "prompt_tokens": 22,
                                                    "total_tokens": 25,
                                                    "prompt_tokens_details": {"cached_tokens": 12}})
        body = sse(first) + sse(last) + sse(usage_chunk) + b"data: [DONE]\n\n"
        self.assertStable("openai_chat", body, "text/event-stream",
                          usage_dict("gemma-3-4b-it", 22, 3, cache_read=12))

    def test_error_chunk_in_stream(self):
        body = openai_chat_stream(False)[:400].rsplit(b"\n\n", 1)[0] + b"\n\n" + sse(
            {"error": {"message": "The server had an error while processing your request.",
                       "type": "server_error", "param": None, "code": None}})
        self.assertStable("openai_chat", body, "text/event-stream",
                          usage_dict("o4-mini-2025-04-16", 0, 0, source="missing",
                                     error="server_error: The server had an error while "
                                           "processing your request."))


class ResponsesTest(TapCase):
    def test_non_stream(self):
        self.assertStable("openai_responses", RESPONSES_BODY, "application/json",
                          usage_dict("gpt-4.1-2025-04-14", 36, 87, cache_read=12, reasoning=20))

    def test_stream_completed(self):
        expected = usage_dict("gpt-4.1-2025-04-14", 36, 87, cache_read=12, reasoning=20)
        self.assertStable("openai_responses", responses_stream(), "text/event-stream", expected)
        self.assertStable("openai_responses", responses_stream(done=True), "text/event-stream",
                          expected)

    def test_stream_incomplete(self):
        self.assertStable("openai_responses", responses_stream("response.incomplete"),
                          "text/event-stream",
                          usage_dict("gpt-4.1-2025-04-14", 36, 87, cache_read=12, reasoning=20))

    def test_stream_failed(self):
        error = "server_error: The model failed to generate a response."
        self.assertStable("openai_responses", responses_stream("response.failed"),
                          "text/event-stream",
                          usage_dict("gpt-4.1-2025-04-14", 36, 87, cache_read=12, reasoning=20,
                                     error=error))
        self.assertStable("openai_responses", responses_stream("response.failed", usage=False),
                          "text/event-stream",
                          usage_dict("gpt-4.1-2025-04-14", 0, 0, source="missing", error=error))

    def test_first_error_is_kept(self):
        body = (sse({"type": "error", "code": "rate_limit_exceeded", "message": "Slow down",
                     "param": None, "sequence_number": 1}, "error")
                + responses_stream("response.failed", usage=False).split(b"\n\n", 2)[2])
        self.assertStable("openai_responses", body, "text/event-stream",
                          usage_dict("gpt-4.1-2025-04-14", 0, 0, source="missing",
                                     error="rate_limit_exceeded: Slow down"))

    def test_error_event(self):
        body = responses_stream()[:1500].rsplit(b"\n\n", 1)[0] + b"\n\n" + sse(
            {"type": "error", "code": "ERR_SOMETHING", "message": "Something went wrong",
             "param": None, "sequence_number": 3}, "error")
        self.assertStable("openai_responses", body, "text/event-stream",
                          usage_dict("gpt-4.1-2025-04-14", 0, 0, source="missing",
                                     error="ERR_SOMETHING: Something went wrong"))


class AnthropicTest(TapCase):
    def test_non_stream_with_cache(self):
        self.assertStable("anthropic_messages", ANTHROPIC_BODY, "application/json",
                          usage_dict("claude-sonnet-4-20250514", 12 + 1500 + 2048, 6,
                                     cache_read=2048, cache_write=1500))

    def test_stream_with_ping(self):
        body = anthropic_stream()
        self.assertIn(b"event: ping", body)
        self.assertStable("anthropic_messages", body, "text/event-stream", EXPECT_ANTHROPIC_STREAM)

    def test_stream_repeating_cumulative_counts_is_not_double_counted(self):
        body = anthropic_stream(repeat_cumulative=True)
        self.assertEqual(body.count(b"event: message_delta"), 2)
        self.assertStable("anthropic_messages", body, "text/event-stream", EXPECT_ANTHROPIC_STREAM)

    def test_error_event_inside_200(self):
        self.assertStable("anthropic_messages", anthropic_stream(error=True), "text/event-stream",
                          usage_dict("claude-sonnet-4-20250514", 2520, 2, cache_read=2048,
                                     error="overloaded_error: Overloaded"))

    def test_error_event_with_non_json_data(self):
        body = anthropic_stream()[:700].rsplit(b"\n\n", 1)[0] + b"\n\nevent: error\ndata: upstream reset\n\n"
        self.assertStable("anthropic_messages", body, "text/event-stream",
                          usage_dict("claude-sonnet-4-20250514", 2520, 2, cache_read=2048,
                                     error="upstream reset"))

    def test_count_tokens_is_not_usage(self):
        body = b'{"input_tokens":2095}'
        info = proxy.RequestInfo("claude-sonnet-4-20250514", None, False)
        expected = usage_dict("claude-sonnet-4-20250514", 0, 0, source="none")
        self.assertStable("anthropic_count_tokens", body, "application/json", expected, info=info)
        self.assertStable(None, body, "application/json", expected, info=info)


class OllamaTest(TapCase):
    def test_generate_stream(self):
        self.assertStable("ollama_generate", ollama_generate_stream(), "application/x-ndjson",
                          usage_dict("llama3.2", 26, 259))

    def test_generate_stream_with_zero_prompt_count_omitted(self):
        self.assertStable("ollama_generate", ollama_generate_stream(False), "application/x-ndjson",
                          usage_dict("llama3.2", 0, 259))

    def test_chat_stream(self):
        self.assertStable("ollama_chat", ollama_chat_stream(), "application/x-ndjson",
                          usage_dict("qwen3:8b-q4_K_M", 26, 282))

    def test_stream_absent_means_ndjson_even_without_content_type(self):
        info = proxy.RequestInfo("qwen3:8b-q4_K_M", None, False)
        for ctype in (None, "", "text/plain; charset=utf-8"):
            self.assertStable("ollama_chat", ollama_chat_stream(), ctype,
                              usage_dict("qwen3:8b-q4_K_M", 26, 282), info=info)
            tap = proxy.UsageTap("ollama_chat", info, ctype, None)
            tap.feed(ollama_chat_stream())
            self.assertEqual(tap.held_bytes, 0, "read line by line, not buffered as one body")
            self.assertEqual(tap.usage, usage_dict("qwen3:8b-q4_K_M", 26, 282))

    def test_ndjson_labelled_as_json(self):
        self.assertStable("ollama_chat", ollama_chat_stream(), "application/json",
                          usage_dict("qwen3:8b-q4_K_M", 26, 282))

    def test_error_line(self):
        self.assertStable("ollama_chat", ollama_chat_stream(error=True), "application/x-ndjson",
                          usage_dict("qwen3:8b-q4_K_M", 0, 0, source="missing",
                                     error="an error was encountered while running the model: "
                                           "unexpected EOF"))

    def test_non_stream(self):
        info = proxy.RequestInfo("llama3.2", False, False)
        self.assertStable("ollama_generate", OLLAMA_GENERATE_BODY, "application/json; charset=utf-8",
                          usage_dict("llama3.2", 26, 290), info=info)
        self.assertStable("ollama_chat", OLLAMA_CHAT_BODY, "application/json; charset=utf-8",
                          usage_dict("llama3.2", 26, 298), info=info)

    def test_embed(self):
        expected = usage_dict("all-minilm", 8, 0)
        self.assertStable("ollama_embed", OLLAMA_EMBED_BODY, "application/json; charset=utf-8",
                          expected)

    def test_legacy_embeddings_reports_nothing(self):
        body = b'{"embedding":[0.5670403838157654,0.009260174818336964,0.23178744316101074]}'
        info = proxy.RequestInfo("all-minilm", None, False)
        self.assertStable("ollama_embed", body, "application/json",
                          usage_dict("all-minilm", 0, 0, source="missing"), info=info)


class LlamaCppTest(TapCase):
    def test_non_stream(self):
        self.assertStable("llamacpp_completion", LLAMACPP_BODY, "application/json; charset=utf-8",
                          usage_dict("gemma-3-4b-it-Q4_K_M.gguf", 10, 3))

    def test_stream_with_ping_comments(self):
        body = llamacpp_stream()
        self.assertIn(b": ping\n", body)
        self.assertStable("llamacpp_completion", body, "text/event-stream",
                          usage_dict("gemma-3-4b-it-Q4_K_M.gguf", 10, 3))

    def test_timings_only(self):
        body = dumps({"content": "x", "stop": True, "timings": LLAMACPP_TIMINGS}).encode()
        info = proxy.RequestInfo("local", None, False)
        self.assertStable("llamacpp_completion", body, "application/json",
                          usage_dict("local", 10, 3), info=info)


# ---------------------------------------------------------------------------------------------
# SSE framing, content sniffing, encodings
# ---------------------------------------------------------------------------------------------

class SseFramingTest(TapCase):
    def test_crlf_and_cr_line_endings(self):
        for newline in ("\r\n", "\r"):
            body = anthropic_stream(newline=newline)
            self.assertNotIn(b"\n" if newline == "\r" else b"\n\n", body)
            self.assertStable("anthropic_messages", body, "text/event-stream", EXPECT_ANTHROPIC_STREAM)
            body = openai_chat_stream(True, newline=newline, pings=True)
            self.assertStable("openai_chat", body, "text/event-stream", EXPECT_STREAM)

    def test_crlf_split_between_cr_and_lf_makes_no_extra_event(self):
        # A multi-line data event: an extra blank line after "data: {" would cut it in two.
        body = (b'data: {"model":"m","choices":[],\r\n'
                b'data: "usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\r\n\r\n'
                b'data: [DONE]\r\n\r\n')
        cut = body.index(b"\r\n") + 1
        out, usage, _ = run_tap("openai_chat", [body[:cut], body[cut:]], "text/event-stream")
        self.assertEqual((out, usage), (body, usage_dict("m", 3, 4)))
        self.assertStable("openai_chat", body, "text/event-stream", usage_dict("m", 3, 4))

    def test_field_variants(self):
        usage = '{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}'
        body = ("\ufeff: this is a comment\n"
                "retry: 3000\n"
                "id: 17\n"
                "x-unknown-field: whatever\n"
                "data:{\"model\":\"m\",\n"
                "data\n"
                "data:  \"choices\":[],\"usage\":" + usage + "}\n"
                "\n"
                ":\n\n"
                "data:[DONE]\n\n").encode("utf-8")
        self.assertStable("openai_chat", body, "text/event-stream", usage_dict("m", 3, 4))

    def test_bom_before_first_data_line(self):
        body = ('\ufeffdata: {"model":"m","choices":[],"usage":{"prompt_tokens":3,'
                '"completion_tokens":4,"total_tokens":7}}\n\ndata: [DONE]\n\n').encode("utf-8")
        self.assertStable("openai_chat", body, "text/event-stream", usage_dict("m", 3, 4))
        self.assertStable("openai_chat", body, None, usage_dict("m", 3, 4))

    def test_last_event_without_blank_line(self):
        body = (b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":3,'
                b'"completion_tokens":4,"total_tokens":7}}')
        self.assertStable("openai_chat", body, "text/event-stream", usage_dict("m", 3, 4))

    def test_sse_sniffed_without_content_type(self):
        self.assertStable("openai_chat", openai_chat_stream(True), None, EXPECT_STREAM)
        self.assertStable("anthropic_messages", anthropic_stream(), "application/octet-stream",
                          EXPECT_ANTHROPIC_STREAM)
        self.assertStable("openai_chat", b"\n\n" + OPENAI_CHAT_BODY, None,
                          usage_dict("gpt-4o-2024-08-06", 1117, 46, cache_read=1024))

    def test_anthropic_stream_without_event_lines(self):
        # Some compatible servers send only data: lines; the "type" member is enough.
        body = b"".join(line for line in anthropic_stream().splitlines(True)
                        if not line.startswith(b"event:"))
        self.assertStable("anthropic_messages", body, "text/event-stream", EXPECT_ANTHROPIC_STREAM)


class EncodingTest(TapCase):
    def compressed_cases(self):
        def raw_deflate(data):
            deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            return deflater.compress(data) + deflater.flush()
        return [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress),
                ("deflate", raw_deflate)]

    def test_compressed_bodies_in_random_splits(self):
        samples = [
            ("openai_chat", OPENAI_CHAT_BODY, "application/json",
             usage_dict("gpt-4o-2024-08-06", 1117, 46, cache_read=1024)),
            ("anthropic_messages", anthropic_stream(), "text/event-stream", EXPECT_ANTHROPIC_STREAM),
            ("ollama_chat", ollama_chat_stream(), "application/x-ndjson",
             usage_dict("qwen3:8b-q4_K_M", 26, 282)),
        ]
        for encoding, compress in self.compressed_cases():
            for kind, body, ctype, expected in samples:
                packed = compress(body)
                self.assertNotEqual(packed, body)
                self.assertStable(kind, packed, ctype, expected, encoding=encoding)
                if encoding == "gzip":
                    self.assertStable(kind, packed, ctype, expected, encoding="GZIP, identity")

    def test_large_gzip_body_inflates_in_bounded_pieces(self):
        body = json.dumps({"object": "list", "model": "text-embedding-3-large",
                           "data": [{"object": "embedding", "index": 0,
                                     "embedding": [0.0] * 200000}],
                           "usage": {"prompt_tokens": 9, "total_tokens": 9}}).encode()
        packed = gzip.compress(body)
        self.assertLess(len(packed), len(body) // 50)
        _out, usage, tap = run_tap("openai_embeddings", [packed], "application/json", "gzip")
        self.assertEqual(usage, usage_dict("text-embedding-3-large", 9, 0))

    def test_unsupported_or_broken_encoding_passes_bytes_and_reports_missing(self):
        info = proxy.RequestInfo("m", False, False)
        for encoding, body in [("br", b"\x1b\x00\x00garbage"), ("zstd", b"(\xb5/\xfd..."),
                               ("gzip, br", b"xx"), ("gzip", b"not gzip at all" * 10),
                               ("deflate", b"\xff\xfe\xfd\xfc" * 10)]:
            out, usage, _ = run_tap("openai_chat", random_pieces(body, random.Random(1)),
                                    "application/json", encoding, info)
            self.assertEqual(out, body)
            self.assertEqual(usage, usage_dict("m", 0, 0, source="missing"), encoding)


# ---------------------------------------------------------------------------------------------
# Interrupted streams, bounds, robustness
# ---------------------------------------------------------------------------------------------

def cut_after(body, marker, occurrence=1, extra=0):
    index = -1
    for _ in range(occurrence):
        index = body.index(marker, index + 1)
    return body[:index + extra]


class InterruptedTest(TapCase):
    def check(self, kind, body, ctype, expected):
        rng = random.Random(SEED)
        for pieces in [[body], [body[i:i + 1] for i in range(len(body))]] + [
                random_pieces(body, rng) for _ in range(10)]:
            out, usage, tap = run_tap(kind, pieces, ctype, complete=False)
            self.assertEqual(out, body)
            self.assertEqual(usage, expected)
            self.assertIs(tap.complete, False)

    def test_openai_stream_cut_before_usage_chunk(self):
        body = openai_chat_stream(True)
        self.check("openai_chat", cut_after(body, b'"choices":[]'),
                   "text/event-stream", usage_dict("o4-mini-2025-04-16", 0, 0, source="missing"))

    def test_openai_stream_cut_after_usage_chunk(self):
        body = openai_chat_stream(True)
        self.check("openai_chat", cut_after(body, b"data: [DONE]"), "text/event-stream",
                   EXPECT_STREAM)

    def test_anthropic_stream_counts_what_was_reported(self):
        body = anthropic_stream()
        self.check("anthropic_messages", cut_after(body, b"event: content_block_delta", 3),
                   "text/event-stream",
                   usage_dict("claude-sonnet-4-20250514", 2520, 2, cache_read=2048))
        body = anthropic_stream(repeat_cumulative=True)
        self.check("anthropic_messages", cut_after(body, b"event: message_delta", 2),
                   "text/event-stream",
                   usage_dict("claude-sonnet-4-20250514", 2520, 40, cache_read=2048))
        self.check("anthropic_messages", cut_after(body, b'"type":"message_start"', 1, 40),
                   "text/event-stream", usage_dict(None, 0, 0, source="missing"))

    def test_responses_stream_cut(self):
        body = responses_stream()
        self.check("openai_responses", cut_after(body, b"event: response.completed"),
                   "text/event-stream", usage_dict("gpt-4.1-2025-04-14", 0, 0, source="missing"))

    def test_ollama_stream_cut(self):
        body = ollama_chat_stream()
        self.check("ollama_chat", cut_after(body, b'"done":true'), "application/x-ndjson",
                   usage_dict("qwen3:8b-q4_K_M", 0, 0, source="missing"))

    def test_llamacpp_stream_cut_ignores_running_counts(self):
        body = llamacpp_stream()
        self.check("llamacpp_completion", cut_after(body, b'"stop":true'), "text/event-stream",
                   usage_dict(None, 0, 0, source="missing"))

    def test_json_body_cut(self):
        self.check("openai_chat", OPENAI_CHAT_BODY[:-30], "application/json",
                   usage_dict(None, 0, 0, source="missing"))


class BoundsTest(TapCase):
    def test_over_long_sse_line_is_skipped_not_buffered(self):
        max_line = 64 << 10
        huge = sse({"choices": [{"index": 0, "delta": {"content": "z" * (5 * max_line)}}],
                    "model": "m"})
        usage = sse({"model": "m", "choices": [],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
        for newline in (b"\n", b"\r\n", b"\r"):
            body = (sse({"model": "m", "choices": []}) + huge + huge + usage + b"data: [DONE]\n\n")
            body = body.replace(b"\n", newline)
            for piece in (4096, 4095, 1):
                pieces = [body[i:i + piece] for i in range(0, len(body), piece)] if piece > 1 else \
                    [body[:len(body) // 2], body[len(body) // 2:]]
                tap = proxy.UsageTap("openai_chat", None, "text/event-stream", None, max_line=max_line)
                peak = 0
                for p in pieces:
                    self.assertIs(tap.feed(p), p)
                    peak = max(peak, tap.held_bytes)
                _, result = tap.finish(True)
                self.assertEqual(result, usage_dict("m", 3, 4), (newline, piece))
                if piece > 1:
                    self.assertLessEqual(peak, max_line + piece)

    def test_over_long_ndjson_line_is_skipped(self):
        max_line = 64 << 10
        lines = ollama_chat_stream().split(b"\n")
        huge = dumps({"model": "qwen3:8b-q4_K_M", "message": {"content": "q" * (4 * max_line)},
                      "done": False}).encode()
        body = b"\n".join(lines[:2] + [huge] + lines[2:])
        for piece in (4096, 1000):
            tap = proxy.UsageTap("ollama_chat", None, "application/x-ndjson", None, max_line=max_line)
            peak = 0
            for i in range(0, len(body), piece):
                tap.feed(body[i:i + piece])
                peak = max(peak, tap.held_bytes)
            self.assertEqual(tap.finish(True)[1], usage_dict("qwen3:8b-q4_K_M", 26, 282))
            self.assertLessEqual(peak, max_line + piece)

    def test_json_body_above_bound_uses_the_tail(self):
        max_body = 64 << 10
        big = json.dumps({"object": "list",
                          "data": [{"object": "embedding", "index": i,
                                    "embedding": [0.0123456789] * 1536} for i in range(20)],
                          "model": "text-embedding-3-small",
                          "usage": {"prompt_tokens": 120, "total_tokens": 120}}).encode()
        self.assertGreater(len(big), 4 * max_body)
        out, usage, tap = run_tap("openai_embeddings", random_pieces(big, random.Random(3)),
                                  "application/json", max_body=max_body)
        self.assertEqual(out, big)
        self.assertEqual(usage, usage_dict("text-embedding-3-small", 120, 0))
        ollama = dumps({"model": "nomic-embed-text", "embeddings": [[0.5] * 30000],
                        "total_duration": 14143917, "load_duration": 1019500,
                        "prompt_eval_count": 77}).encode()
        _out, usage, _ = run_tap("ollama_embed", [ollama[i:i + 5000] for i in range(0, len(ollama), 5000)],
                                 "application/json", max_body=max_body)
        self.assertEqual(usage, usage_dict("nomic-embed-text", 77, 0))
        # Truncated: the tail is not searched.
        _out, usage, _ = run_tap("ollama_embed", [ollama[:-3]], "application/json",
                                 complete=False, max_body=max_body)
        self.assertEqual(usage["source"], "missing")

    def test_json_buffer_memory_is_bounded(self):
        max_body = 64 << 10
        tap = proxy.UsageTap("openai_embeddings", None, "application/json", None, max_body=max_body)
        chunk = b"[" + b"0.123456," * 7000
        for _ in range(200):
            tap.feed(chunk)
            self.assertLessEqual(tap.held_bytes, max_body + 2 * (256 << 10) + len(chunk) + (64 << 10))
        self.assertEqual(tap.finish(True)[1]["source"], "missing")


class RobustnessTest(TapCase):
    def test_garbage_never_raises(self):
        rng = random.Random(SEED)
        kinds = sorted(proxy.USAGE_KINDS) + ["anthropic_count_tokens", None]
        ctypes = ["text/event-stream", "application/x-ndjson", "application/json", None]
        for n in range(300):
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 400)))
            if n % 3 == 0:
                blob = b'data: {"choices":[],"usage":' + blob + b"\n\n"
            if n % 5 == 0:
                blob = b"\x1f\x8b" + blob
            kind = rng.choice(kinds)
            ctype = rng.choice(ctypes)
            encoding = rng.choice([None, "gzip", "deflate", "br"])
            strip = rng.random() < 0.3
            out, usage, _tap = run_tap(kind, random_pieces(blob, rng), ctype, encoding,
                                       strip=strip, complete=rng.random() < 0.5)
            self.assertEqual(out, blob)
            self.assertEqual(set(usage), set(usage_dict(None, 0, 0)))

    def test_finish_twice_and_feed_after_finish(self):
        body = OPENAI_CHAT_BODY
        tap = proxy.UsageTap("openai_chat", None, "application/json", None)
        self.assertEqual(tap.usage["source"], "missing")
        tap.feed(body)
        leftover, first = tap.finish(True)
        self.assertEqual(leftover, b"")
        self.assertEqual(tap.finish(False), (b"", first))
        late = b"late"
        self.assertIs(tap.feed(late), late)
        self.assertEqual(tap.usage, first)
        first["prompt"] = -1
        self.assertEqual(tap.usage["prompt"], 1117, "callers get copies")

    def test_usage_readable_while_streaming(self):
        body = openai_chat_stream(True)
        tap = proxy.UsageTap("openai_chat", None, "text/event-stream", None)
        tap.feed(body)
        self.assertEqual(tap.usage, EXPECT_STREAM)


# ---------------------------------------------------------------------------------------------
# Stripping the usage we injected
# ---------------------------------------------------------------------------------------------

class StripTest(TapCase):
    def assertStrips(self, kind, injected, plain, expected, **kwargs):
        rng = random.Random(SEED)
        ways = [[injected], [injected[i:i + 1] for i in range(len(injected))]]
        ways += [random_pieces(injected, rng) for _ in range(RANDOM_SPLITS)]
        for pieces in ways:
            out, usage, _ = run_tap(kind, pieces, "text/event-stream", strip=True, **kwargs)
            self.assertEqual(out, plain)
            self.assertEqual(usage, expected)

    def test_stripped_stream_equals_stream_without_include_usage(self):
        injected, plain = openai_chat_stream(True), openai_chat_stream(False)
        self.assertIn(b'"usage":null', injected)
        self.assertNotIn(b'"usage"', plain.replace(b'\\"usage\\"', b""))
        expected = dict(EXPECT_STREAM, source="injected")
        self.assertStrips("openai_chat", injected, plain, expected)

    def test_variants(self):
        expected = dict(EXPECT_STREAM, source="injected")
        for kwargs in ({"usage_first": True}, {"pings": True}, {"newline": "\r\n"},
                       {"newline": "\r", "pings": True}):
            self.assertStrips("openai_chat", openai_chat_stream(True, **kwargs),
                              openai_chat_stream(False, **kwargs), expected)

    def test_legacy_completions(self):
        self.assertStrips("openai_completions", openai_completions_stream(True),
                          openai_completions_stream(False),
                          usage_dict("gpt-3.5-turbo-instruct", 5, 7, source="injected"))

    def test_backend_without_usage_null(self):
        # Ollama's compatible API adds only the usage chunk.
        stream = ollama_openai_stream()
        usage_event = stream[stream.rindex(b"data: {", 0, stream.index(b'"choices":[]')):
                             stream.index(b"data: [DONE]")]
        self.assertTrue(usage_event.startswith(b'data: {"id":"chatcmpl-396"'))
        plain = stream.replace(usage_event, b"")
        self.assertNotIn(b'"choices":[]', plain)
        self.assertStrips("openai_chat", stream, plain, usage_dict("qwen3:8b", 12, 30, source="injected"))

    def test_backend_ignoring_include_usage(self):
        plain = openai_chat_stream(False)
        self.assertStrips("openai_chat", plain, plain,
                          usage_dict("o4-mini-2025-04-16", 0, 0, source="missing"))

    def test_only_incomplete_events_are_held(self):
        injected, plain = openai_chat_stream(True), openai_chat_stream(False)
        first_end = injected.index(b"\n\n") + 2
        tap = StrippingTap("openai_chat", None, "text/event-stream", None)
        out = tap.feed(injected[:first_end + 30])
        self.assertEqual(out, plain[:plain.index(b"\n\n") + 2])
        rest = tap.feed(injected[first_end + 30:])
        leftover, usage = tap.finish(True)
        self.assertEqual(out + rest + leftover, plain)
        self.assertEqual(leftover, b"")
        # A comment line between events is not held back.
        tap = StrippingTap("openai_chat", None, "text/event-stream", None)
        self.assertEqual(tap.feed(b": ping\n"), b": ping\n")
        self.assertEqual(tap.feed(b"data: {\"usage\":null,"), b"")
        self.assertEqual(tap.feed(b"\"a\":1}\n\n"), b"data: {\"a\":1}\n\n")

    def test_stream_ending_without_blank_line_returns_leftover(self):
        injected = openai_chat_stream(True)[:-2]
        plain = openai_chat_stream(False)[:-2]
        tap = StrippingTap("openai_chat", None, "text/event-stream", None)
        out = tap.feed(injected)
        leftover, usage = tap.finish(True)
        self.assertEqual(leftover, b"data: [DONE]")
        self.assertEqual(out + leftover, plain)
        self.assertEqual(usage["source"], "injected")

    def test_no_strip_when_compressed(self):
        body = gzip.compress(openai_chat_stream(True))
        tap = StrippingTap("openai_chat", None, "text/event-stream", "gzip")
        pieces = random_pieces(body, random.Random(6))
        for p in pieces:
            self.assertIs(tap.feed(p), p)
        self.assertEqual(tap.finish(True), (b"", dict(EXPECT_STREAM, source="injected")))

    def test_nested_or_duplicate_usage_null_is_left_alone(self):
        events = (b'data: {"model":"m","choices":[{"delta":{"usage":null}}],"usage":null}\n\n'
                  b'data: {"model":"m","choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
                  b'data: [DONE]\n\n')
        expect = (b'data: {"model":"m","choices":[{"delta":{"usage":null}}],"usage":null}\n\n'
                  b'data: {"model":"m","choices":[{"delta":{"content":"x"}}]}\n\n'
                  b'data: [DONE]\n\n')
        self.assertStrips("openai_chat", events, expect, usage_dict("m", 0, 0, source="missing"))

    def test_multi_line_data_event_is_left_alone(self):
        events = (b'data: {"model":"m","choices":[{"delta":{"content":"x"}}],\n'
                  b'data: "usage":null}\n\n'
                  b'data: {"model":"m","choices":[{"delta":{"content":"y"}}],"usage":null}\n\n'
                  b'data: [DONE]\n\n')
        expect = events.replace(b'],"usage":null}\n\ndata: [', b']}\n\ndata: [')
        self.assertNotEqual(expect, events)
        self.assertStrips("openai_chat", events, expect, usage_dict("m", 0, 0, source="missing"))

    def test_usage_on_a_content_chunk_is_not_dropped(self):
        # Older llama.cpp builds put usage on the finish_reason chunk itself: never drop content.
        events = (b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"x"}}],"usage":null}\n\n'
                  b'data: {"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
                  b'"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}\n\n'
                  b'data: [DONE]\n\n')
        expect = events.replace(b',"usage":null', b"")
        self.assertStrips("openai_chat", events, expect, usage_dict("m", 5, 1, source="injected"))

    def test_over_long_event_is_released_unchanged(self):
        max_line = 16 << 10
        huge = b'data: {"model":"m","choices":[{"delta":{"content":"' + b"w" * (3 * max_line) + \
            b'"}}],"usage":null}\n\n'
        injected = openai_chat_stream(True)
        body = huge + injected
        tap = StrippingTap("openai_chat", None, "text/event-stream", None,
                             max_line=max_line)
        out = []
        for i in range(0, len(body), 1000):
            out.append(tap.feed(body[i:i + 1000]))
            self.assertLessEqual(tap.held_bytes, max_line + 1000)
        leftover, usage = tap.finish(True)
        self.assertEqual(b"".join(out) + leftover, body, "nothing lost or changed once given up")
        # The over-long event itself was skipped; the usage of the stream after it counts.
        self.assertEqual(usage, dict(EXPECT_STREAM, source="injected"))


# ---------------------------------------------------------------------------------------------
# Micro-benchmark (not a test)
# ---------------------------------------------------------------------------------------------

def bench_tap(events=200, rounds=200):
    """Feed a 200-event OpenAI SSE stream in event-sized pieces through non-stripping taps.

    Prints microseconds per feed() call for a stream with and without include_usage, and for
    the stripping tap.  Returns the dict of figures.
    """
    words = [" token%d" % i for i in range(events - 3)]
    results = {}
    for label, include, strip in (("plain", False, False), ("include_usage", True, False),
                                  ("stripping", True, True)):
        body = openai_chat_stream(include, words=words)
        pieces = [p + b"\n\n" for p in body.split(b"\n\n") if p]
        start = time.perf_counter()
        for _ in range(rounds):
            tap = (StrippingTap("openai_chat", None, "text/event-stream", None) if strip
                   else proxy.UsageTap("openai_chat", None, "text/event-stream", None))
            for piece in pieces:
                tap.feed(piece)
            tap.finish(True)
        elapsed = time.perf_counter() - start
        per_feed = elapsed / (rounds * len(pieces)) * 1e6
        results[label] = per_feed
        print("%-14s %d events/stream, %5.2f us per feed (incl. tap creation and finish)"
              % (label, len(pieces), per_feed))
    baseline = time.perf_counter()
    for _ in range(rounds):
        for piece in pieces:
            pass
    print("loop overhead  %5.2f us per piece" % ((time.perf_counter() - baseline)
                                                 / (rounds * len(pieces)) * 1e6))
    return results


if __name__ == "__main__":
    unittest.main()
