#!/usr/bin/env python3
"""Run the official `openai` Python client against a `mamba-rs serve` server.

    python3 tools/openai_client_check.py --base-url http://127.0.0.1:8080/v1 --model NAME

Checks, with greedy decoding: the model list, a completion, a streamed chat
completion (equal to the same request not streamed, with usage), and
log-probabilities in both APIs (completions with echo, chat with
top_logprobs). Prints one line per check and exits non-zero on the first
failure. Needs `pip install openai`; the model needs a tokenizer.json.
"""

import argparse
import sys

from openai import OpenAI


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default="unused")
    a = ap.parse_args()
    client = OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=60)

    ids = [m.id for m in client.models.list().data]
    check(a.model in ids, f"models.list names {a.model!r} ({ids})")

    c = client.completions.create(model=a.model, prompt="the cat sat on the", max_tokens=5, temperature=0)
    ch = c.choices[0]
    check(ch.finish_reason in ("length", "stop"), f"completion finish_reason {ch.finish_reason!r}")
    check(c.usage.completion_tokens == 5 or ch.finish_reason == "stop", f"completion usage {c.usage}")
    check(isinstance(ch.text, str) and ch.text.strip() != "", f"completion text {ch.text!r}")

    messages = [{"role": "system", "content": "the"}, {"role": "user", "content": "the cat sat"}]
    stream = client.chat.completions.create(
        model=a.model,
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage, roles, objects = [], None, None, [], set()
    for chunk in stream:
        objects.add(chunk.object)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    streamed = "".join(parts)
    check(objects == {"chat.completion.chunk"}, f"chunk objects {objects}")
    check(roles == ["assistant"], f"streamed chat starts with the assistant role ({roles})")
    check(finish in ("length", "stop"), f"streamed chat finish_reason {finish!r}")
    check(usage is not None and usage.completion_tokens > 0, f"streamed chat usage {usage}")
    whole = client.chat.completions.create(model=a.model, messages=messages, max_tokens=6, temperature=0)
    check(
        whole.choices[0].message.content == streamed,
        f"streamed chat text {streamed!r} equals the unstreamed one {whole.choices[0].message.content!r}",
    )

    lp = client.completions.create(
        model=a.model, prompt="the cat sat", max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    lps = lp.choices[0].logprobs
    n = len(lps.tokens)
    check(n == len(lps.token_logprobs) == len(lps.top_logprobs) == len(lps.text_offset), f"{n} log-prob entries")
    check(lps.token_logprobs[0] is None and lps.top_logprobs[0] is None, "the first echoed token has no log-prob")
    check(all(x <= 0 for x in lps.token_logprobs[1:]), "log-probs are <= 0")
    check(all(len(t) <= 2 for t in lps.top_logprobs[1:]), "at most 2 alternatives per token")
    greedy = lps.top_logprobs[-1]
    check(abs(max(greedy.values()) - lps.token_logprobs[-1]) < 1e-6, "the greedy token is the top alternative")
    check(lps.text_offset == sorted(lps.text_offset), "text offsets ascend")

    chat_lp = client.chat.completions.create(
        model=a.model, messages=messages, max_tokens=2, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat_lp.choices[0].logprobs.content
    check(len(content) == 2 and all(len(t.top_logprobs) == 2 for t in content), "chat log-probs with top 2")
    print("openai client check: all passed")


if __name__ == "__main__":
    main()
