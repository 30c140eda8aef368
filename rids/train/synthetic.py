"""Offline chat data: requests of the kind people send a chat model, answered by the base itself.

No dataset can be downloaded, so requests are made here, from three sources:

1. hand-written requests across domains (`prompts/train_seeds.txt`, and `prompts/train_chat.txt`
   written the way people type them: lengths, registers, pasted text, constraints);
2. domain templates (advice, stories and poems, explanations, code, word problems, emails,
   summaries, comparisons, lists, rewriting) over topic lists, with seeded numbers;
3. user turns the base writes itself: a few-shot list of requests, continued by sampling the
   base (many seeds, temperatures and topics), one new request per sample.

Requests are deduplicated and kept apart from a held-out set (`leaks_into`), a share of the
conversations gets a follow-up user turn, and `answer_conversations` has the base answer every
last turn greedily: the drafts an adapter learns must match the base's own greedy text.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from rids.llm import LLM

Message = dict[str, str]
Conversation = list[Message]

PROMPTS = Path(__file__).resolve().parents[2] / "prompts"  # the repository's prompt sets
TRAIN_SEEDS = PROMPTS / "train_seeds.txt"
TRAIN_CHAT = PROMPTS / "train_chat.txt"  # hand-written in the way people type (embedded stage 5)
# hand-written sets that training and tuning never see: open-ended chat, and text nothing can draft
HELD_OUT = {"heldout": PROMPTS / "heldout_chat.jsonl", "adversarial": PROMPTS / "adversarial.jsonl"}

TOPICS = [
    "the ocean", "a rainy afternoon", "city lights", "an old bicycle", "mountains",
    "a small village", "the night sky", "a busy market", "winter mornings", "a garden",
    "an abandoned train station", "the desert", "a forest path", "a thunderstorm", "a lost dog",
    "a first snowfall", "the harbor", "an old library", "a summer festival", "a quiet street",
    "a candle", "the river", "a clock tower", "a childhood home", "a violin", "the moon",
    "a field of sunflowers", "a bakery at dawn", "a paper boat", "a crowded bus",
    "a mountain cabin", "the last day of school", "an island",
]  # fmt: skip
SUBJECTS = [
    "volcanoes", "earthquakes", "tides", "rainbows", "magnets", "the immune system", "batteries",
    "microwaves", "the heart", "clouds", "fossils", "glaciers", "coral reefs",
    "the printing press", "democracy", "taxes", "interest rates", "supply and demand",
    "the Roman Empire", "pyramids", "evolution", "DNA", "the speed of light", "seasons",
    "lightning", "wind turbines", "nuclear energy", "recycling", "the moon landing", "vitamins",
    "muscles", "memory", "the brain", "gravity on Mars", "hurricanes", "deserts",
    "the water table", "electric motors", "3D printers", "cloud computing", "encryption",
    "passwords", "search engines", "machine learning", "blockchains", "compilers",
    "the Olympic Games", "time zones", "leap years", "the calendar", "eclipses", "comets",
]  # fmt: skip
SITUATIONS = [
    "moving to a new city", "starting university", "learning to cook", "running a 5k race",
    "staying motivated to study", "keeping a tidy desk", "sleeping on a long flight",
    "talking to a shy child", "planning a wedding on a budget", "growing tomatoes on a balcony",
    "training a puppy", "learning to swim as an adult", "writing a resume", "negotiating rent",
    "getting over a cold quickly", "reducing screen time", "teaching grandparents to use a phone",
    "hosting a dinner party", "choosing a laptop", "starting a podcast", "learning to draw",
    "buying a used car", "preparing for an exam", "traveling alone", "organizing a closet",
    "making a long-distance friendship work", "speaking up in meetings", "cycling to work",
]  # fmt: skip
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "finds the largest number in a list",
    "counts the vowels in a string", "merges two sorted lists",
    "returns the n-th Fibonacci number", "checks whether a word is a palindrome",
    "converts Celsius to Fahrenheit", "flattens a list of lists", "computes the average of a list",
    "removes spaces from a string", "finds the most common element in a list",
    "checks whether a year is a leap year", "counts how often each letter appears",
    "returns the sum of the digits of a number", "capitalizes the first letter of every word",
    "returns the minimum and maximum of a list", "splits a list into chunks of size n",
    "generates a random password", "checks whether a list is sorted",
    "converts a binary string to an integer",
]  # fmt: skip
LANGUAGES = ["Python", "JavaScript", "Java", "C", "Go", "Rust", "TypeScript", "Ruby"]
CONCEPTS = [
    "a variable", "a function", "a class", "a loop", "an array", "a hash map", "a stack",
    "a queue", "a binary tree", "an interface", "a pointer", "a closure", "an exception",
    "a thread", "a database index", "a unit test", "version control", "a REST API", "JSON",
    "a regular expression", "big O notation", "a compiler", "garbage collection", "a lambda",
    "a module",
]  # fmt: skip
PEOPLE = [
    "my manager", "a customer", "my professor", "a new client", "my team", "the school principal",
    "my sister", "an old friend", "the hotel", "a job recruiter", "the city council", "my coach",
]  # fmt: skip
EMAIL_REASONS = [
    "asking for a day off next week", "confirming a meeting time",
    "following up on an application", "thanking them for their help",
    "complaining about a late delivery", "asking for feedback",
    "announcing that I am leaving the company", "requesting a quote for a kitchen repair",
    "asking to move our call to Monday", "inviting them to a workshop",
    "sharing the project update",
]  # fmt: skip
PAIRS = [
    ("tea", "coffee"), ("Python", "JavaScript"), ("summer", "winter"), ("books", "movies"),
    ("running", "swimming"), ("trains", "buses"), ("paper books", "e-readers"), ("cats", "rabbits"),
    ("a tablet", "a laptop"), ("solar power", "wind power"), ("walking", "cycling"),
    ("studying alone", "studying in a group"), ("a credit card", "a debit card"),
    ("frozen vegetables", "fresh vegetables"), ("yoga", "pilates"), ("the mountains", "the beach"),
]  # fmt: skip
THINGS = [
    "healthy snacks", "ways to save energy at home", "birds you can see in a park",
    "classic novels", "countries in South America", "inventions that changed the world",
    "weekend hobbies", "indoor exercises", "tips for a job interview",
    "things to do in a new city", "kitchen tools", "programming languages for beginners",
    "ways to reduce stress", "team-building activities", "herbs that grow indoors",
    "questions to ask a landlord", "road trip games", "study techniques",
]  # fmt: skip
SENTENCES = [
    "The results of the survey were not very good.", "we need to talk about the budget asap",
    "The meeting was long and nobody agreed on anything.",
    "I think maybe we could try again later", "Our new product is fast, cheap and easy to use.",
    "The kids played outside until it got dark.", "The report has many mistakes that need fixing.",
    "can you pls check my code when u have time",
]  # fmt: skip
PARAGRAPHS = [
    "The town opened a new park last spring. It has a playground, a small pond and a path for "
    "bikes. On weekends it is full of families, and the town plans to add a cafe next year.",
    "Many people now work from home a few days a week. They save time on travel, but some say "
    "they miss talking to colleagues. Companies are trying mixed schedules to keep both benefits.",
    "Scientists found that some birds use the Earth's magnetic field to find their way. A "
    "special protein in their eyes may let them sense it, which helps them migrate thousands of "
    "kilometres.",
    "The bakery on Main Street will change its hours. It will open at 6 am instead of 7 and close "
    "earlier on Sundays. The owner says more customers come in the early morning.",
    "Electric scooters became popular in many cities. They are cheap and quick for short trips, "
    "but some people leave them on sidewalks, so cities now set rules about where to park them.",
]
STYLES = ["", "", " Keep it short.", " Use simple words.", " Give an example.", " Be brief."]
FOLLOW_UPS = [
    "Can you make it shorter?", "Can you explain that more simply?", "Give me another example.",
    "Why is that?", "Thanks! Can you add one more tip?", "Can you say that in a friendlier tone?",
    "What would you suggest first?", "Can you put that in a list?", "Is there anything to avoid?",
    "Can you give me a short summary of that?", "How long would that take?", "Tell me more.",
]  # fmt: skip


def _word_problem(r: random.Random) -> str:
    a, b, c = r.randint(2, 12), r.randint(3, 60), r.randint(2, 9)
    return r.choice([
        f"A book costs ${b} and I buy {a} of them with a {c * 10}% discount. How much do I pay?",
        f"A cyclist rides {b} km in {a} hours. What is her average speed?",
        f"I have {b} marbles and share them among {a} friends. How many does each get, and how "
        "many are left over?",
        f"A garden is {a} m by {b} m. How much fence do I need to go around it?",
        f"A bus carries {b} people and {c} get off at each of {a} stops. How many are left?",
        f"If {a} workers build a wall in {b} hours, how long would {a + c} workers take?",
        f"What is {c * 5}% of {b * 10}?",
        f"A phone plan costs ${b} a month plus ${c} per gigabyte. What do {a} gigabytes cost?",
    ])  # fmt: skip


def _pick(r: random.Random, items: list) -> str:
    return r.choice(items)


TEMPLATES: list[Callable[[random.Random], str]] = [
    lambda r: _pick(r, ["Any tips for {}?", "How do I get better at {}?", "What should I know "
                        "about {}?", "I need advice on {}."]).format(_pick(r, SITUATIONS)),
    lambda r: _pick(r, ["Write a short poem about {}.", "Write a haiku about {}.", "Tell me a "
                        "short story about {}.", "Write a few lines describing {}."])
    .format(_pick(r, TOPICS)),
    lambda r: _pick(r, ["Explain {} to a beginner.", "How do {} work?", "Why are {} important?",
                        "What should everyone know about {}?", "Tell me about {}."])
    .format(_pick(r, SUBJECTS)) + _pick(r, STYLES),
    lambda r: f"Write a {_pick(r, LANGUAGES)} function that {_pick(r, CODE_TASKS)}.",
    lambda r: f"What is {_pick(r, CONCEPTS)} in programming?" + _pick(r, STYLES),
    _word_problem,
    lambda r: f"Write a short email to {_pick(r, PEOPLE)} {_pick(r, EMAIL_REASONS)}.",
    lambda r: _pick(r, ["Summarize this in one sentence: {}", "What is the main idea here? {}",
                        "Give me a short summary: {}"]).format(_pick(r, PARAGRAPHS)),
    lambda r: _pick(r, ["Compare {} and {}.", "What are the pros and cons of {} versus {}?",
                        "Should I choose {} or {}?"]).format(*_pick(r, PAIRS)),
    lambda r: f"List {r.randint(3, 8)} {_pick(r, THINGS)}." + _pick(r, STYLES),
    lambda r: _pick(r, ["Rewrite this more politely: {}", "Make this sound professional: {}",
                        "Fix the grammar: {}"]).format(_pick(r, SENTENCES)),
]  # fmt: skip

STOPWORDS = {
    "about", "after", "again", "being", "could", "doing", "every", "from", "have", "having",
    "here", "into", "just", "more", "most", "other", "over", "same", "should", "some", "such",
    "than", "that", "their", "them", "then", "there", "these", "they", "this", "those",
    "through", "under", "until", "very", "what", "when", "where", "which", "while", "with",
    "would", "your", "write", "short", "give", "tell", "explain", "make", "simple", "example",
    "please", "ideas", "things", "something", "someone", "sentence", "briefly", "summarize",
    "summary", "email", "message",
}  # fmt: skip


def content_words(text: str) -> set[str]:
    """Lower-case words of 5+ letters, request-form words removed."""
    return {w for w in re.findall(r"[a-z]{5,}", text.lower()) if w not in STOPWORDS}


def leaks_into(held_out: list[dict]) -> Callable[[str], bool]:
    """A test for training requests too close to a held-out record (`{"topics": [...],
    "messages": [...]}`): one that names a held-out topic (a word or the start of one), or
    shares 3 or more content words with one held-out request."""
    topics = [t for record in held_out for t in record.get("topics", [])]
    pattern = re.compile("|".join(rf"\b{re.escape(t)}" for t in topics) or "$^", re.IGNORECASE)
    words = [content_words(m["content"]) for r in held_out for m in r["messages"]]
    return lambda text: (
        bool(pattern.search(text)) or any(len(content_words(text) & w) >= 3 for w in words)
    )


def seed_requests(path: Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def template_requests(n: int, seed: int = 0) -> list[str]:
    """Up to `n` distinct requests from the domain templates, in turn, reproducible from `seed`."""
    r, seen, out = random.Random(seed), set(), []
    for attempt in range(n * 50):
        if len(out) == n:
            break
        text = TEMPLATES[attempt % len(TEMPLATES)](r)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def few_shot_prompt(examples: list[str], topic: str) -> str:
    lines = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(examples))
    return (
        "Here are messages that people sent to a helpful AI assistant. Each one is a question or "
        f"a request, some about {topic}.\n{lines}\n{len(examples) + 1}."
    )


def base_written_requests(
    llm: LLM, examples: list[str], n: int, seed: int = 0, batch_size: int = 64,
    done: Sequence[list[str]] = (),
    on_batch: Callable[[list[str], int], None] = lambda kept, total: None,
) -> list[str]:  # fmt: skip
    """Requests the base writes itself: it continues a numbered few-shot list of requests
    (examples and a topic drawn per sample), sampled with a temperature drawn per batch and a
    seed per sample; the first line of a continuation is kept if it reads like a request.

    `done`: what the first batches of an interrupted run kept; they are not sampled again and
    the run goes on as if it had not stopped. `on_batch` gets each new batch's kept lines and
    the requests written so far (for a caller to save them and show progress)."""
    r, out, seen = random.Random(seed), [], set()
    topics = TOPICS + SUBJECTS + SITUATIONS + THINGS
    for batch in range(20 * n // batch_size + 1):
        if len(out) >= n:
            break
        prompts = [
            few_shot_prompt(r.sample(examples, 6), _pick(r, topics)) for _ in range(batch_size)
        ]
        temperature = r.choice([0.7, 0.8, 0.9, 1.0, 1.1])
        if batch < len(done):
            kept = done[batch]
        else:
            results = llm.generate(
                prompts, max_new_tokens=40, temperature=temperature, top_p=0.95,
                seed=(seed * 1_000_003 + batch) * batch_size,
            )  # fmt: skip
            kept = [line for res in results if (line := first_request(res.text or ""))]
        for request in kept:
            if request.lower() not in seen:
                seen.add(request.lower())
                out.append(request)
        if batch >= len(done):
            on_batch(kept, min(len(out), n))
    return out[:n]


def first_request(text: str) -> str | None:
    """The first line of a continuation, if it reads like one complete request."""
    line = text.strip().split("\n", 1)[0].strip()
    if not 12 <= len(line) <= 200 or line[-1] not in ".?!":
        return None
    if re.match(r"^\d+\.", line) or "http" in line or line.count('"') % 2:
        return None
    return line


def with_follow_ups(
    conversations: list[Conversation], share: float, seed: int = 0
) -> list[tuple[Conversation, str]]:
    """(answered conversation, follow-up request) for a seeded share of the conversations."""
    r = random.Random(seed)
    return [(c, _pick(r, FOLLOW_UPS)) for c in conversations if r.random() < share]


def answer_conversations(
    llm: LLM, conversations: list[Conversation], max_new_tokens: int = 192,
    batch_size: int = 64, on_batch: Callable[[int], None] = lambda done: None,
) -> list[Conversation]:  # fmt: skip
    """Each conversation (ending with a user turn) with the base's greedy answer appended."""
    tok, out = llm.tokenizer, []
    for i in range(0, len(conversations), batch_size):
        chunk = conversations[i : i + batch_size]
        prompts = [llm.encode_chat(c) for c in chunk]
        for conv, result in zip(
            chunk, llm.generate(prompts, max_new_tokens=max_new_tokens), strict=True
        ):
            answer = tok.decode(result.token_ids, skip_special_tokens=True).strip()
            out.append([*conv, {"role": "assistant", "content": answer}])
        on_batch(len(out))
    return out


def read_records(path: Path) -> list[dict]:
    """The records of a JSONL file (`{"messages": [...], ...}` a line)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_conversations(path: Path) -> list[Conversation]:
    return [record["messages"] for record in read_records(path)]


def held_out_records() -> list[dict]:
    """Every record of the held-out sets (`HELD_OUT`), chat first."""
    return [record for path in HELD_OUT.values() for record in read_records(path)]
