"""The official `openai` and `anthropic` Python clients against a running `sparrow serve`.

    python3 serve_clients.py BASE_URL MODEL KEY basic      # every API behaviour below
    python3 serve_clients.py BASE_URL MODEL KEY langchain  # langchain-openai's ChatOpenAI
    python3 serve_clients.py BASE_URL MODEL KEY queue      # a server with --max-batch 1 --max-queue 1
    python3 serve_clients.py BASE_URL MODEL KEY cancel     # 100 clients killed after 10 ms
    python3 serve_clients.py BASE_URL MODEL KEY load       # 64 streaming clients for 60 s

Run by crates/sparrow-cli/tests/serve.rs, which starts the server (and, for `load`, checks
its peak memory afterwards). Needs the packages of `.ci/run`'s virtual environment
(openai, anthropic, langchain-openai, jsonschema). Prints one line per check and exits
non-zero on the first failure (an AssertionError with what differed).
"""

import concurrent.futures
import json
import re
import socket
import struct
import sys
import threading
import time
import urllib.request

import anthropic
import jsonschema
import openai
import pydantic

BASE, MODEL, KEY, MODE = sys.argv[1:5]


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok  {name}")


oa = openai.OpenAI(base_url=f"{BASE}/v1", api_key=KEY, max_retries=0, timeout=120)
an = anthropic.Anthropic(base_url=BASE, api_key=KEY, max_retries=0, timeout=120)
MSGS = [{"role": "user", "content": "Tell me about the sea."}]
# This anthropic client no longer takes temperature / top_p / top_k as arguments; the
# Messages API and this server still read them from the body.
GREEDY = {"temperature": 0}


def chat(**kw):
    args = dict(model=MODEL, messages=MSGS, max_tokens=12)
    args.update(kw)
    return oa.chat.completions.create(**args)


def basic():
    # Models.
    ids = [m.id for m in oa.models.list().data]
    check("openai models.list", ids == [MODEL], ids)
    check("openai models.retrieve", oa.models.retrieve(MODEL).id == MODEL)
    ams = an.models.list()
    check("anthropic models.list", [m.id for m in ams.data] == [MODEL], ams)

    # A chat completion, greedy.
    r = chat(temperature=0)
    c = r.choices[0]
    check("chat: text", isinstance(c.message.content, str) and len(c.message.content) > 0, r)
    check("chat: role", c.message.role == "assistant", r)
    check("chat: finish_reason length", c.finish_reason == "length", c.finish_reason)
    u = r.usage
    check("chat: usage", u.completion_tokens == 12 and u.prompt_tokens > 0
          and u.total_tokens == u.prompt_tokens + u.completion_tokens, u)
    greedy = c.message.content
    check("chat: max_completion_tokens",
          oa.chat.completions.create(model=MODEL, messages=MSGS, max_completion_tokens=3,
                                     temperature=0).usage.completion_tokens == 3)

    # Streaming equals the whole answer; include_usage adds a last chunk without choices.
    chunks = list(chat(temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check("stream: same text as non-streamed", text == greedy, (text, greedy))
    check("stream: first delta has the role", chunks[0].choices[0].delta.role == "assistant")
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    check("stream: one finish_reason", finals == ["length"], finals)
    check("stream: usage chunk last", chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12,
          chunks[-1])
    check("stream: usage null before", all(ch.usage is None for ch in chunks[:-1]))

    # Same seed, same text, whatever else is running at the same time.
    alone = chat(temperature=0.9, seed=1234, max_tokens=16).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        others = [pool.submit(chat, temperature=0.9, seed=100 + i, max_tokens=24) for i in range(5)]
        again = pool.submit(chat, temperature=0.9, seed=1234, max_tokens=16)
        again = again.result().choices[0].message.content
        other_texts = [f.result().choices[0].message.content for f in others]
    check("seed: same text alone and beside five others", again == alone, (again, alone))
    check("seed: other seeds differ", any(t[: len(alone)] != alone for t in other_texts))

    # Stop strings end the text before them and are never emitted, also when streamed.
    words = greedy.split()
    stop = next((w for w in words[1:] if len(w) >= 2), None)
    if stop is not None:
        cut = greedy[: greedy.index(stop)]
        r = chat(temperature=0, stop=[stop, "zzzz-never"])
        check("stop: text ends before the stop string", r.choices[0].message.content == cut,
              (r.choices[0].message.content, cut, stop))
        check("stop: finish_reason stop", r.choices[0].finish_reason == "stop")
        s = "".join(ch.choices[0].delta.content or "" for ch in chat(temperature=0, stop=stop, stream=True)
                    if ch.choices)
        check("stop: streamed the same", s == cut, (s, cut))

    # n choices.
    r = chat(temperature=1.0, seed=7, n=3, max_tokens=8)
    check("n: three choices", [c.index for c in r.choices] == [0, 1, 2], r.choices)
    check("n: usage sums the choices", r.usage.completion_tokens == 24, r.usage)

    # Log-probabilities: one entry per generated token; greedy picks the top one.
    r = chat(temperature=0, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    check("logprobs: one entry per token", len(entries) == r.usage.completion_tokens, (len(entries), r.usage))
    check("logprobs: greedy takes the most likely token",
          all(e.logprob <= 0 and len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
              and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6
              and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
              for e in entries), entries[:2])
    streamed = [e for ch in chat(temperature=0, logprobs=True, stream=True) if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    check("logprobs: streamed the same", [(e.token, round(e.logprob, 5)) for e in streamed]
          == [(e.token, round(e.logprob, 5)) for e in entries], streamed[:2])
    r = oa.completions.create(model=MODEL, prompt="The sea was", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    check("completions logprobs", len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
          and all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0, lp)

    # Penalties change a greedy text that repeats itself; out of range is 400.
    long_greedy = chat(temperature=0, max_tokens=48).choices[0].message.content
    penalised = chat(temperature=0, max_tokens=48, frequency_penalty=2.0, presence_penalty=1.0).choices[0].message.content
    check("penalties change the text", penalised != long_greedy, penalised)
    check("penalties: fewer repeated words", len(set(penalised.split())) / max(1, len(penalised.split()))
          >= len(set(long_greedy.split())) / max(1, len(long_greedy.split())), (penalised, long_greedy))

    # Legacy completions, echo.
    r = oa.completions.create(model=MODEL, prompt="The sea was", max_tokens=6, temperature=0, echo=True)
    check("completions: echo", r.choices[0].text.startswith("The sea was"), r.choices[0].text)
    check("completions: usage", r.usage.completion_tokens == 6, r.usage)
    streamed = "".join(ch.choices[0].text for ch in
                       oa.completions.create(model=MODEL, prompt="The sea was", max_tokens=6,
                                             temperature=0, stream=True))
    check("completions: streamed", "The sea was" + streamed == r.choices[0].text, (streamed, r.choices[0].text))

    # Errors come back as the clients' exception types.
    for name, call, exc in [
        ("unknown model is 404", lambda: oa.chat.completions.create(model="nope", messages=MSGS),
         openai.NotFoundError),
        ("max_tokens past the context is 400", lambda: chat(max_tokens=10_000_000), openai.BadRequestError),
        ("n beyond the limit is 400", lambda: chat(n=1000), openai.BadRequestError),
        ("a penalty out of range is 400", lambda: chat(frequency_penalty=3), openai.BadRequestError),
        ("empty messages is 400", lambda: oa.chat.completions.create(model=MODEL, messages=[]),
         openai.BadRequestError),
        ("a wrong key is 401", lambda: openai.OpenAI(base_url=f"{BASE}/v1", api_key="wrong", max_retries=0)
         .models.list(), openai.AuthenticationError),
    ]:
        try:
            call()
            raise AssertionError(f"{name}: no error")
        except exc as e:
            check(f"openai error: {name}", True, e)

    # Anthropic: a message, greedy.
    m = an.messages.create(model=MODEL, max_tokens=12, messages=MSGS, extra_body=GREEDY)
    check("messages: shape", m.type == "message" and m.role == "assistant" and m.content[0].type == "text", m)
    check("messages: same text as OpenAI's chat", m.content[0].text == greedy, (m.content[0].text, greedy))
    check("messages: stop_reason max_tokens", m.stop_reason == "max_tokens" and m.stop_sequence is None, m)
    check("messages: usage", m.usage.output_tokens == 12 and m.usage.input_tokens > 0, m.usage)
    n_in = an.messages.count_tokens(model=MODEL, messages=MSGS).input_tokens
    check("count_tokens equals input_tokens", n_in == m.usage.input_tokens, (n_in, m.usage))
    ms = an.messages.create(model=MODEL, max_tokens=12, extra_body=GREEDY, messages=MSGS,
                            system=[{"type": "text", "text": "Be brief."}])
    n_sys = an.messages.count_tokens(model=MODEL, messages=MSGS, system="Be brief.").input_tokens
    check("system as blocks and as a string", ms.usage.input_tokens == n_sys > n_in, (ms.usage, n_sys))

    # Streaming: the documented event order, the same text.
    with an.messages.stream(model=MODEL, max_tokens=12, messages=MSGS, extra_body=GREEDY) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    check("messages stream: same text", streamed == greedy, (streamed, greedy))
    check("messages stream: final message", final.stop_reason == "max_tokens" and final.usage.output_tokens == 12,
          final)
    kinds = [e.type for e in an.messages.create(model=MODEL, max_tokens=4, messages=MSGS, stream=True)]
    body = [k for k in kinds if k != "ping"]
    check("messages stream: event order",
          body[:2] == ["message_start", "content_block_start"]
          and set(body[2:-3]) <= {"content_block_delta"}
          and body[-3:] == ["content_block_stop", "message_delta", "message_stop"], kinds)

    if stop is not None:
        m = an.messages.create(model=MODEL, max_tokens=12, messages=MSGS, extra_body=GREEDY, stop_sequences=[stop])
        check("messages: stop_sequence", m.stop_reason == "stop_sequence" and m.stop_sequence == stop
              and m.content[0].text == cut, m)

    for name, call, exc in [
        ("unknown model is 404", lambda: an.messages.create(model="nope", max_tokens=4, messages=MSGS),
         anthropic.NotFoundError),
        ("a system role in messages is 400",
         lambda: an.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "system", "content": "x"}]),
         anthropic.BadRequestError),
        ("a wrong key is 401", lambda: anthropic.Anthropic(base_url=BASE, api_key="wrong", max_retries=0)
         .messages.create(model=MODEL, max_tokens=4, messages=MSGS), anthropic.AuthenticationError),
    ]:
        try:
            call()
            raise AssertionError(f"{name}: no error")
        except exc as e:
            check(f"anthropic error: {name}", True, e)

    # A client that leaves mid-stream: its sequence is cancelled, the server goes on.
    stream = chat(temperature=0, max_tokens=400, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    check("after a cancelled stream the server still answers", chat(temperature=0).choices[0].message.content == greedy)


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    population: int = pydantic.Field(ge=0, le=10**9)
    coastal: bool


def structured():
    # response_format: the output keeps to the schema whatever the model would say.
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
            "tags": {"type": "array", "items": {"enum": ["sea", "ship", "storm"]}, "maxItems": 3},
        },
        "required": ["name", "year", "tags"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "voyage", "schema": schema, "strict": True}}
    for temperature, seed in [(0, 0), (1.0, 11), (1.0, 12)]:
        r = chat(temperature=temperature, seed=seed, max_tokens=80, response_format=fmt)
        c = r.choices[0]
        check(f"json_schema (t={temperature}): finish_reason stop", c.finish_reason == "stop", c)
        jsonschema.validate(json.loads(c.message.content), schema)
        check(f"json_schema (t={temperature}): the output validates", True, c.message.content)
    chunks = list(chat(temperature=0, max_tokens=80, response_format=fmt, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    jsonschema.validate(json.loads(text), schema)
    check("json_schema: streamed output validates", True, text)
    r = chat(temperature=1.0, seed=5, n=2, max_tokens=80, response_format=fmt)
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
    check("json_schema: n=2, each choice validates", len(r.choices) == 2, r.choices)

    # Any JSON object: this 10M-parameter model writes prose into its first key until the
    # budget ends (the real model's smoke test in serve.rs checks a whole object); the
    # constraint shows in the opening, which the free text does not have.
    free = chat(temperature=0, max_tokens=20).choices[0].message.content
    r = chat(temperature=0, max_tokens=20, response_format={"type": "json_object"})
    c = r.choices[0].message.content
    check("json_object: the text opens an object", c.startswith('{"') and not free.startswith("{"), (c, free))

    # The client's own structured-output helper: a pydantic model in, a parsed object out.
    parsed = oa.chat.completions.parse(model=MODEL, messages=MSGS, max_tokens=80, temperature=0,
                                       response_format=City).choices[0].message.parsed
    check("parse(response_format=pydantic model)", isinstance(parsed, City), parsed)

    for name, fmt in [
        ("an unknown response_format type", {"type": "xml"}),
        ("a schema that does not compile", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
        ("json_schema without its object", {"type": "json_schema"}),
    ]:
        try:
            chat(response_format=fmt)
            raise AssertionError(f"{name}: no error")
        except openai.BadRequestError as e:
            check(f"structured: {name} is 400 naming response_format",
                  "response_format" in str(e), e)


def langchain():
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{BASE}/v1", api_key=KEY, model=MODEL, temperature=0, max_tokens=12,
                     max_retries=0, timeout=120)
    msgs = [SystemMessage("You are terse."), HumanMessage("Tell me about the sea.")]
    m = llm.invoke(msgs)
    check("langchain: invoke", isinstance(m.content, str) and m.content, m)
    check("langchain: usage_metadata", m.usage_metadata["output_tokens"] == 12, m.usage_metadata)
    streamed = "".join(ch.content for ch in llm.stream(msgs))
    check("langchain: stream equals invoke", streamed == m.content, (streamed, m.content))
    outs = llm.batch([msgs, msgs, [HumanMessage("Ships.")]])
    check("langchain: batch", [o.content for o in outs[:2]] == [m.content, m.content] and outs[2].content, outs)
    roomy = ChatOpenAI(base_url=f"{BASE}/v1", api_key=KEY, model=MODEL, temperature=0, max_tokens=80,
                       max_retries=0, timeout=120)
    city = roomy.with_structured_output(City, method="json_schema").invoke(msgs)
    check("langchain: with_structured_output(City, method=json_schema)", isinstance(city, City), city)


def metric(text, name):
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def metrics():
    with urllib.request.urlopen(f"{BASE}/metrics", timeout=10) as r:
        text = r.read().decode()
    return metric(text, "sparrow_requests_running"), metric(text, "sparrow_requests_waiting"), \
        metric(text, 'sparrow_requests_finished_total{reason="abort"}')


def wait_idle(what, seconds=60):
    deadline = time.time() + seconds
    while True:
        running, waiting, _ = metrics()
        if running == 0 and waiting == 0:
            check(f"{what}: /metrics shows nothing running or waiting", True)
            return
        if time.time() > deadline:
            raise AssertionError(f"{what}: still running {running}, waiting {waiting} after {seconds} s")
        time.sleep(0.1)


def cancel():
    # 100 long streaming requests whose clients are killed 10 ms after sending: their
    # sockets are reset (SO_LINGER 0), as when a process dies. Then 100 fresh requests.
    host, port = BASE.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": MODEL, "messages": MSGS, "max_tokens": 2000, "stream": True,
                       "temperature": 1.0}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    go = threading.Barrier(100, timeout=30)
    sent = []

    def killed(_):
        s = socket.create_connection((host, int(port)), timeout=30)
        go.wait()
        s.sendall(head + body)
        sent.append(1)
        time.sleep(0.01)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    aborted_before = metrics()[2]
    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        list(pool.map(killed, range(100)))
    check("cancel: 100 requests sent and their clients killed", len(sent) == 100)
    # 2000 tokens each: only cancellation empties the batch within the wait.
    wait_idle("cancel: after the killed clients")
    aborted = metrics()[2] - aborted_before
    check("cancel: the server cancelled the killed clients' sequences", aborted > 0, aborted)
    print(f"cancel: {aborted:.0f} sequences cancelled (the rest were refused while the queue was full)")
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        done = list(pool.map(lambda i: chat(temperature=0.5, seed=i, max_tokens=8).usage.completion_tokens,
                             range(100)))
    check("cancel: 100 fresh requests all succeed", done == [8] * 100, done)
    wait_idle("cancel: after the fresh requests")


def load(seconds=60, clients=64):
    # Streaming clients that ask again as soon as an answer ends; every request either
    # completes or is refused with 429.
    stop_at = time.time() + seconds
    lock = threading.Lock()
    tally = {"ok": 0, "429": 0, "tokens": 0}

    def client(i):
        k = 0
        while time.time() < stop_at:
            k += 1
            n = 8 + (i * 7 + k) % 40
            try:
                chunks = list(chat(temperature=0.8, seed=i * 1000 + k, max_tokens=n, stream=True,
                                   stream_options={"include_usage": True}))
            except openai.RateLimitError:
                with lock:
                    tally["429"] += 1
                time.sleep(0.2)
                continue
            finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finals in (["length"], ["stop"]), finals
            assert chunks[-1].usage.completion_tokens <= n, chunks[-1].usage
            with lock:
                tally["ok"] += 1
                tally["tokens"] += chunks[-1].usage.completion_tokens

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    check(f"load: {clients} clients for {seconds} s, every request completed or got 429", tally["ok"] > clients,
          tally)
    print(f"load: {tally['ok']} completed, {tally['429']} refused, {tally['tokens']} tokens "
          f"in {time.time() - t0:.0f} s")
    wait_idle("load: afterwards")


def queue():
    # --max-batch 1 --max-queue 1: one runs, one waits, the third is refused with 429.
    def long(i):
        try:
            chat(temperature=0, max_tokens=200, seed=i)
            return "ok"
        except openai.RateLimitError as e:
            assert e.response.headers.get("retry-after") == "1", e.response.headers
            return "429"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = sorted(pool.map(long, range(4)))
    check("queue: a full queue answers 429", "429" in results and "ok" in results, results)
    try:
        an.messages.create(model=MODEL, max_tokens=4, messages=MSGS)
        check("queue: the server recovers", True)
    except anthropic.RateLimitError as e:
        raise AssertionError(f"still refused after the queue drained: {e}")


{"basic": lambda: (basic(), structured()), "langchain": langchain, "queue": queue, "cancel": cancel,
 "load": load}[MODE]()
print("all checks passed")
