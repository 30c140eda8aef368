"""Offline chat data for training an adapter on what the base itself says.

`chat_prompts` builds varied requests from seeded templates (arithmetic, unit conversions,
definitions, short code, rewriting, lists, explanations); `answer_prompts` has the base answer
them greedily (batched, through rids) and returns chat records for `rids train-adapter`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from rids.chat import user_turn
from rids.llm import LLM

UNITS = [
    ("kilometres", "miles"), ("miles", "kilometres"), ("kilograms", "pounds"),
    ("pounds", "kilograms"), ("degrees Celsius", "degrees Fahrenheit"), ("litres", "gallons"),
    ("inches", "centimetres"), ("hours", "minutes"), ("metres", "feet"), ("days", "hours"),
]  # fmt: skip
WORDS = [
    "entropy", "gravity", "photosynthesis", "democracy", "algorithm", "metaphor", "inflation",
    "ecosystem", "molecule", "recursion", "irony", "empathy", "catalyst", "latitude", "habitat",
    "friction", "hypothesis", "synonym", "velocity", "biodiversity", "compiler", "glacier",
    "mammal", "orbit", "protein", "volcano", "alliteration", "archipelago", "bandwidth",
    "census", "climate", "dialect", "erosion", "fossil", "genome", "harmony", "isotope",
    "journalism", "kinetic", "legislature", "monsoon", "nucleus", "oxygen", "pixel", "quorum",
    "renaissance", "satellite", "tariff", "ultraviolet",
]  # fmt: skip
CODE = [
    "reverses a string", "checks whether a number is prime", "returns the factorial of n",
    "counts the vowels in a string", "finds the largest number in a list",
    "removes duplicates from a list", "checks whether a word is a palindrome",
    "returns the n-th Fibonacci number", "converts Celsius to Fahrenheit",
    "sums the even numbers in a list", "merges two sorted lists", "counts words in a sentence",
    "returns the average of a list", "capitalizes every word in a string",
    "checks whether a year is a leap year", "flattens a list of lists",
    "returns the greatest common divisor of two numbers", "sorts a list of names by length",
]  # fmt: skip
SENTENCES = [
    "The cat chased the mouse.", "The committee approved the new budget.",
    "Our team won the final match.", "The chef cooked a delicious meal.",
    "Many people visit the museum every year.", "The storm damaged several houses.",
    "The students finished the project early.", "A strong wind knocked over the fence.",
    "The company released a new phone.", "My neighbour painted the fence blue.",
    "hey can u send me the report asap", "the meeting got moved to tmrw i think",
]  # fmt: skip
THINGS = [
    "fruits", "planets", "programming languages", "musical instruments", "countries in Europe",
    "primary colours", "mammals that live in the ocean", "famous scientists", "kitchen tools",
    "sports played with a ball", "prime numbers", "rivers", "ways to save energy at home",
    "healthy breakfast ideas", "tips for learning a language", "board games",
]  # fmt: skip
TOPICS = [
    "why the sky is blue", "how a rainbow forms", "what a black hole is", "how vaccines work",
    "why leaves change colour in autumn", "how the internet works", "what inflation is",
    "why we have seasons", "how a bicycle stays upright", "what DNA does",
    "how airplanes fly", "why the ocean is salty", "what machine learning is",
    "how the moon affects tides", "why ice floats", "how a compiler works",
]  # fmt: skip


def _arithmetic(r: random.Random) -> str:
    a, b = r.randint(2, 99), r.randint(2, 99)
    op = r.choice(["plus", "minus", "times"])
    return r.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}. Show your work."])


STYLES = ["", " Keep it short.", " Use simple words.", " Give one example.", " Be precise."]
LANGUAGES = ["Python", "JavaScript", "Rust", "Go"]
REWRITES = [
    "Rewrite this sentence in the passive voice: {}", "Make this sentence more formal: {}",
    "Make this sentence more casual: {}", "Translate this sentence into French: {}",
    "Summarize this sentence in five words: {}",
]  # fmt: skip
TEMPLATES: list[Callable[[random.Random], str]] = [
    _arithmetic,
    lambda r: "Convert {} {} to {}.".format(r.randint(1, 500), *r.choice(UNITS)),
    lambda r: (
        r.choice(["Define the word '{}'.", "What does '{}' mean?"]).format(r.choice(WORDS))
        + r.choice(STYLES)
    ),
    lambda r: f"Write a {r.choice(LANGUAGES)} function that {r.choice(CODE)}." + r.choice(STYLES),
    lambda r: r.choice(REWRITES).format(r.choice(SENTENCES)),
    lambda r: f"List {r.randint(3, 7)} {r.choice(THINGS)}." + r.choice(STYLES),
    lambda r: (
        r.choice(["Explain {} in two sentences.", "Briefly explain {}."]).format(r.choice(TOPICS))
        + r.choice(STYLES)
    ),
]


def chat_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct requests, templates in turn (a template whose variety is used up simply
    stops contributing), reproducible from `seed`."""
    r, seen, out = random.Random(seed), set(), []
    for attempt in range(n * 50):
        if len(out) == n:
            break
        text = TEMPLATES[attempt % len(TEMPLATES)](r)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def held_out_prompts(n: int, training: int = 3000, seed: int = 0) -> list[str]:
    """`n` requests that `chat_prompts(training, seed)` (the training set) does not contain."""
    return chat_prompts(training + n, seed)[training:]


def answer_prompts(
    llm: LLM, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 64,
    on_batch: Callable[[int], None] = lambda done: None,
) -> list[dict]:  # fmt: skip
    """The base's greedy answers, as chat records ({"messages": [user, assistant]})."""
    tok, records = llm.tokenizer, []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        rendered = [user_turn(tok, p) for p in chunk]
        for p, out in zip(
            chunk, llm.generate(rendered, max_new_tokens=max_new_tokens), strict=True
        ):
            answer = tok.decode(out.token_ids, skip_special_tokens=True).strip()
            records.append({"messages": [
                {"role": "user", "content": p}, {"role": "assistant", "content": answer},
            ]})  # fmt: skip
        on_batch(len(records))
    return records
