"""The official OpenAI Python SDK against anteroom, unchanged but for its base URL.

Usage: openai_client.py BASE_URL basic|retry|stream_error|burst|keepalive [N|stream|timeout]
Prints one JSON line with what it saw; exits non-zero when an expectation fails.
"""

import json
import sys
import time

import openai

base_url, mode = sys.argv[1], sys.argv[2]
seen = []  # (status, retry-after-ms, monotonic time) of every HTTP response


def on_response(response):
    seen.append(
        (
            response.status_code,
            response.headers.get("retry-after-ms"),
            response.headers.get("retry-after"),
            time.monotonic(),
        )
    )


factory = getattr(openai, "DefaultHttpx2Client", None) or openai.DefaultHttpxClient


def sdk_client(hook):
    """An SDK client (max_retries 2) that calls hook with every HTTP response."""
    return openai.OpenAI(
        base_url=base_url,
        api_key="not-needed",
        max_retries=2,
        http_client=factory(event_hooks={"response": [hook]}),
    )


client = sdk_client(on_response)
messages = [{"role": "user", "content": "hello"}]
out = {"mode": mode}

if mode == "basic":
    full = client.chat.completions.create(model="anteroom-sim", messages=messages, max_tokens=5)
    out["content"] = full.choices[0].message.content
    out["usage"] = full.usage.completion_tokens
    parts = []
    for chunk in client.chat.completions.create(
        model="anteroom-sim", messages=messages, max_tokens=5, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    out["streamed"] = "".join(parts)
    expected = "tok0 tok1 tok2 tok3 tok4 "
    ok = out["content"] == expected and out["streamed"] == expected and out["usage"] == 5
elif mode == "retry":
    # Say we are ready (the import is slow), and wait for the test to fill
    # the proxy before asking.
    print("ready", flush=True)
    sys.stdin.readline()
    resp = client.chat.completions.create(model="anteroom-sim", messages=messages, max_tokens=1)
    out["content"] = resp.choices[0].message.content
    out["seen"] = [[s, ms, secs] for s, ms, secs, _ in seen]
    ok = len(seen) >= 2 and seen[0][0] == 429 and seen[-1][0] == 200
    if ok:
        advised = float(seen[0][1]) / 1000.0
        waited = seen[1][3] - seen[0][3]
        out["advised_s"] = advised
        out["waited_s"] = waited
        # The SDK slept the advised delay before its retry (the retry's own
        # round trip comes on top).
        ok = waited >= advised * 0.95 and int(seen[0][2]) >= 1
elif mode == "burst":
    # N clients at once, each an SDK client of its own (max_retries 2):
    # every client's statuses and advised waits, in order.
    import threading

    n = int(sys.argv[3])
    results = [None] * n
    start = threading.Barrier(n)

    def one(i):
        mine = []
        c = sdk_client(lambda r: mine.append([r.status_code, r.headers.get("retry-after-ms")]))
        start.wait()
        try:
            c.chat.completions.create(
                model="anteroom-sim", messages=messages, max_tokens=1
            )
        except openai.APIError as e:
            mine.append(["raised", type(e).__name__])
        results[i] = mine

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["clients"] = results
    ok = all(r and r[-1][0] == 200 for r in results)
elif mode == "stream_error":
    # The backend dies after three tokens: anteroom ends the stream with an
    # error event, which the SDK must raise as an APIError.
    parts = []
    try:
        for chunk in client.chat.completions.create(
            model="anteroom-sim", messages=messages, max_tokens=10, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        out["error"] = None
    except openai.APIError as e:
        out["error"] = type(e).__name__
        out["error_code"] = getattr(e, "code", None)
        out["error_message"] = str(e)
    out["streamed"] = "".join(parts)
    ok = out["error"] is not None and out.get("error_code") == "upstream_stream_error"
elif mode == "keepalive":
    # A stream that asks for keep-alive comments while it waits in the
    # queue (argv[3]: "stream" when it gets in, "timeout" when its wait
    # runs out after the head came): the SDK must skip the comments, and
    # raise the error event.
    print("ready", flush=True)
    sys.stdin.readline()
    heads = []
    c = sdk_client(
        lambda r: heads.append([r.status_code, r.headers.get("x-anteroom-queue-keepalive")])
    )
    parts = []
    out["error"] = None
    try:
        for chunk in c.chat.completions.create(
            model="anteroom-sim",
            messages=messages,
            max_tokens=5,
            stream=True,
            extra_headers={"x-anteroom-queue-keepalive": "1"},
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
    except openai.APIError as e:
        out["error"] = type(e).__name__
        out["error_code"] = getattr(e, "code", None)
        out["error_body"] = getattr(e, "body", None)
    out["streamed"] = "".join(parts)
    out["heads"] = heads
    kept = heads == [[200, "1"]]
    if sys.argv[3] == "stream":
        ok = kept and out["error"] is None and out["streamed"] == "tok0 tok1 tok2 tok3 tok4 "
    else:
        ok = kept and out["error"] == "APIError" and out["error_code"] == "queue_timeout"
else:
    raise SystemExit(f"unknown mode {mode}")

out["ok"] = ok
print(json.dumps(out))
sys.exit(0 if ok else 1)
