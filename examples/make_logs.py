"""Write examples/logs.jsonl: a small synthetic log in the long JSONL format (docs/data.md).

    python examples/make_logs.py            # rewrites examples/logs.jsonl (deterministic: seed 0)

Nothing here was measured: the prompts come from templates, and each LLM's quality, answer length,
latency and cost are drawn from a plausible model of three LLMs of different sizes (examples/models.json):
the large one is good at everything and expensive, the medium one weaker on hard math and code,
the small one good at short writing and easy facts only. That is enough for a router to learn
something (send hard math to the large LLM, a haiku to the small one) and for every command of
the docs to run in seconds. The file has 128 queries x 3 LLMs = 384 lines: 96 queries in the
`train` split, 24 in `test` (four tasks: math, code, writing, facts) and 8 in `ood`, a task the
training split does not have (translation). Every query has every LLM's outcome (the simulator and
the experiments need that; a real log may leave outcomes out, or log `"quality": null` for a call
that was made but not scored), and a few lines have no cost (it is derived from the token counts
and the models file's prices).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# name: (price in, price out per million tokens, ttft_s, tokens_per_s): as in models.json
MODELS = {"large-llm": (5.0, 15.0, 0.8, 40.0), "medium-llm": (0.5, 1.5, 0.4, 90.0),
          "small-llm": (0.1, 0.2, 0.2, 150.0)}
# P(correct) of an easy query (difficulty 0) per task, and how much a hard one (difficulty 1) loses
SKILL = {
    "math": {"large-llm": (0.97, 0.15), "medium-llm": (0.92, 0.55), "small-llm": (0.80, 0.75)},
    "code": {"large-llm": (0.95, 0.15), "medium-llm": (0.90, 0.45), "small-llm": (0.75, 0.65)},
    "writing": {"large-llm": (0.92, 0.05), "medium-llm": (0.90, 0.10), "small-llm": (0.86, 0.15)},
    "facts": {"large-llm": (0.98, 0.10), "medium-llm": (0.96, 0.25), "small-llm": (0.92, 0.50)},
    "translation": {"large-llm": (0.93, 0.10), "medium-llm": (0.85, 0.30), "small-llm": (0.70, 0.50)},
}
GRADED = {"writing", "translation"}  # scored on [0, 1] by a judge; the other tasks are right (1) or wrong (0)
ANSWER_TOKENS = {"math": 120, "code": 180, "writing": 70, "facts": 20, "translation": 40}
VERBOSITY = {"large-llm": 1.3, "medium-llm": 1.0, "small-llm": 0.8}

COUNTRIES = ["France", "Japan", "Kenya", "Peru", "Canada", "Norway", "Vietnam", "Egypt", "Chile", "Poland",
             "Australia", "Morocco", "Finland", "Thailand", "Portugal"]
BOOKS = ["Pride and Prejudice", "One Hundred Years of Solitude", "The Trial", "Moby-Dick", "Beloved",
         "The Master and Margarita", "Things Fall Apart", "Middlemarch"]
FUNCS = ["reverses a string", "checks whether a word is a palindrome", "returns the n-th Fibonacci number",
         "merges two sorted lists into one sorted list", "counts the vowels in a sentence",
         "removes duplicates from a list while keeping the order", "parses an ISO 8601 date",
         "computes the median of a list of numbers", "flattens a nested list of any depth",
         "finds the longest common prefix of a list of strings", "validates an email address with a regex",
         "implements binary search on a sorted list", "groups words that are anagrams of each other",
         "converts a Roman numeral to an integer"]
LANGS = ["Python", "JavaScript", "Go", "Rust"]
FORMS = ["a haiku", "a limerick", "a two-sentence horror story", "a short product description",
         "a friendly out-of-office reply", "a four-line poem", "a tweet announcing a launch"]
TOPICS = ["autumn rain", "a lost umbrella", "coffee at dawn", "a robot learning to paint", "the sea",
          "a noise-cancelling headphone", "moving to a new city", "a cat on a keyboard", "the first snow"]
SENTENCES = ["Where is the train station?", "The meeting is postponed until Friday.",
             "Please keep the receipt.", "I would like a table for two.", "The museum opens at nine."]
TARGETS = ["French", "Spanish", "German", "Italian", "Japanese"]


def math_prompt(rng) -> tuple[str, float]:
    kind = rng.integers(5)
    a, b = int(rng.integers(3, 99)), int(rng.integers(3, 99))
    if kind == 0:
        return f"What is {a} times {b}?", 0.1
    if kind == 1:
        return f"Solve for x: {a}x + {b} = {a * 7 + b}.", 0.3
    if kind == 2:
        return (f"A train travels {a * 10} km in {b % 7 + 2} hours. What is its average speed in km/h? "
                "Round to one decimal.", 0.4)
    if kind == 3:
        return f"How many positive integers below {a * 10} are divisible by {b % 9 + 2} but not by {b % 5 + 3}?", 0.8
    return (f"Prove that the sum of the first {a} odd numbers is a perfect square, "
            "and give the square.", 0.9)


def code_prompt(rng) -> tuple[str, float]:
    f, lang = FUNCS[rng.integers(len(FUNCS))], LANGS[rng.integers(len(LANGS))]
    kind = rng.integers(3)
    if kind == 0:
        return f"Write a {lang} function that {f}.", 0.3 + 0.3 * (lang in ("Go", "Rust"))
    if kind == 1:
        return f"Write a {lang} function that {f}, with unit tests and a docstring.", 0.6
    return f"Write a {lang} function that {f} in O(n) time, and explain why it is O(n).", 0.85


def writing_prompt(rng) -> tuple[str, float]:
    return f"Write {FORMS[rng.integers(len(FORMS))]} about {TOPICS[rng.integers(len(TOPICS))]}.", 0.2


def facts_prompt(rng) -> tuple[str, float]:
    kind = rng.integers(3)
    if kind == 0:
        return f"What is the capital of {COUNTRIES[rng.integers(len(COUNTRIES))]}?", 0.05
    if kind == 1:
        return f"Who wrote {BOOKS[rng.integers(len(BOOKS))]}, and in which year was it published?", 0.5
    c = COUNTRIES[rng.integers(len(COUNTRIES))]
    return f"What is the official currency of {c}, and what is its ISO 4217 code?", 0.6


def translation_prompt(rng) -> tuple[str, float]:
    s, t = SENTENCES[rng.integers(len(SENTENCES))], TARGETS[rng.integers(len(TARGETS))]
    return f"Translate into {t}: \"{s}\"", 0.3 + 0.4 * (t == "Japanese")


PROMPTS = {"math": math_prompt, "code": code_prompt, "writing": writing_prompt, "facts": facts_prompt,
           "translation": translation_prompt}


def outcome(rng, task: str, model: str, difficulty: float, prompt_tokens: int) -> dict:
    easy, loss = SKILL[task][model]
    p = min(1.0, max(0.0, easy - loss * difficulty))
    if task in GRADED:
        quality = round(float(np.clip(rng.normal(p, 0.08), 0.0, 1.0)), 2)
    else:
        quality = float(rng.random() < p)
    completion = max(1, int(ANSWER_TOKENS[task] * VERBOSITY[model] * (0.6 + difficulty) * math.exp(rng.normal(0, 0.3))))
    pin, pout, ttft, tps = MODELS[model]
    return {"quality": quality, "prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "cost": round((prompt_tokens * pin + completion * pout) * 1e-6, 8),
            "latency_s": round(ttft * math.exp(rng.normal(0, 0.2)) + completion / tps, 3)}


def rows(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    plan = [(task, split, n) for task in ("math", "code", "writing", "facts") for split, n in (("train", 24), ("test", 6))]
    plan.append(("translation", "ood", 8))
    out, seen, qid = [], set(), 0
    for task, split, n in plan:
        made = 0
        while made < n:
            prompt, base = PROMPTS[task](rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            made += 1
            qid += 1
            difficulty = float(np.clip(base + rng.normal(0, 0.1), 0.0, 1.0))
            prompt_tokens = max(4, round(len(prompt) / 4))
            for model in MODELS:
                row = {"query_id": f"q{qid:04d}", "prompt": prompt, "model": model,
                       **outcome(rng, task, model, difficulty, prompt_tokens), "tags": [task], "split": split}
                if split == "train" and qid % 17 == 0 and model == "small-llm":
                    del row["cost"]  # derived from the token counts and the prices
                out.append(row)
    return out


def main() -> None:
    out = rows()
    with open(HERE / "logs.jsonl", "w") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(out)} lines to {HERE / 'logs.jsonl'}")


if __name__ == "__main__":
    main()
