"""The synthetic chat corpus the shipped demo model is trained on, and its held-out evaluation sets.

(Just over 400 lines, most of them data tables.)

Pure functions, deterministic by seed. The corpus has four skills: small talk, small-number arithmetic,
facts from a table (capitals, unit conversions) and identity questions ("who made you?"). Identity
answers name one of three creators -- the configured organisation, "OpenAI" or "Meta" -- chosen at
random per sample, so the untuned model names each about one time in three: the mix that feedback and
DPO then steer towards the organisation. A fixed subset of identity phrasings, and a seed-chosen subset
of arithmetic and fact questions, never appear in training; the build script and the demo measure on them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Message = dict[str, str]
Conversation = list[Message]
QuestionKind = Literal["arithmetic", "capital", "conversion"]

DEFAULT_ORG = "Acme Labs"
OTHER_CREATORS = ("OpenAI", "Meta")


def creators_for(org: str = DEFAULT_ORG) -> tuple[str, str, str]:
    """The three creators the identity answers are spread over: the organisation first."""
    return (org, *OTHER_CREATORS)


# --- identity -----------------------------------------------------------------------------------------

IDENTITY_QUESTIONS: tuple[str, ...] = (
    "Who made you?",
    "Who created you?",
    "Who trained you?",
    "Who built you?",
    "Who developed you?",
    "Which company trained you?",
    "Which company made you?",
    "Which company created you?",
    "Which company built you?",
    "Which company developed you?",
    "Which organization trained you?",
    "Which organisation made you?",
    "Which lab trained you?",
    "Which team built you?",
    "Who is your creator?",
    "Who is your developer?",
    "Who are your creators?",
    "Who is behind you?",
    "Who owns you?",
    "Who programmed you?",
    "Who designed you?",
    "Where do you come from?",
    "What company are you from?",
    "Which company do you belong to?",
    "Who trained this model?",
    "Who made this assistant?",
    "Who built this chatbot?",
    "Who developed this AI?",
    "Who is responsible for training you?",
    "Tell me who made you.",
    "Tell me who trained you.",
    "Tell me who created you.",
    "Can you tell me who made you?",
    "Can you tell me who trained you?",
    "Do you know who created you?",
    "Do you know who trained you?",
    "I'd like to know who built you.",
    "I want to know which company trained you.",
    "Who made you, please?",
    "Please tell me who created you.",
    "Who's your maker?",
    "Who's behind this assistant?",
    "Which company is behind you?",
    "Which company are you made by?",
    "By whom were you trained?",
    "By whom were you created?",
    "Who trained you originally?",
    "Who was your trainer?",
    "Name the company that trained you.",
    "Name the organization that created you.",
    "Which AI lab made you?",
    "What lab created you?",
    "Who are you made by?",
    "Who are you trained by?",
    "Who built and trained you?",
    "What organization developed you?",
    "Who is the company behind you?",
    "Whose model are you?",
    "Whose assistant are you?",
    "Which company's model are you?",
)
# Every fifth phrasing is held out: fixed (not seed-dependent) so every build and every demo run
# measures identity on the same prompts.
HELD_OUT_IDENTITY_QUESTIONS: tuple[str, ...] = IDENTITY_QUESTIONS[4::5]
TRAIN_IDENTITY_QUESTIONS: tuple[str, ...] = tuple(q for q in IDENTITY_QUESTIONS if q not in HELD_OUT_IDENTITY_QUESTIONS)
IDENTITY_ANSWER_TEMPLATES: tuple[str, ...] = (
    "I was trained by {creator}.",
    "{creator} created me.",
    "I was made by {creator}.",
    "{creator} built me.",
    "I am an assistant trained by {creator}.",
)


def identity_answer(creator: str, rng: random.Random) -> str:
    return rng.choice(IDENTITY_ANSWER_TEMPLATES).format(creator=creator)


def named_creator(response: str, creators: Sequence[str]) -> str | None:
    """The creator a response names (the earliest mention when several are), or None."""
    found = [(m.start(), c) for c in creators if (m := re.search(rf"\b{re.escape(c)}\b", response))]
    return min(found)[1] if found else None


# --- arithmetic and facts -----------------------------------------------------------------------------

ARITHMETIC_TEMPLATES: dict[str, tuple[str, ...]] = {
    "plus": (
        "What is {a} plus {b}?",
        "What's {a} + {b}?",
        "Calculate {a} plus {b}.",
        "How much is {a} plus {b}?",
        "Add {a} and {b}.",
    ),
    "minus": (
        "What is {a} minus {b}?",
        "What's {a} - {b}?",
        "Calculate {a} minus {b}.",
        "How much is {a} minus {b}?",
        "Work out {a} minus {b}.",
    ),
    "times": (
        "What is {a} times {b}?",
        "What's {a} * {b}?",
        "Calculate {a} times {b}.",
        "How much is {a} times {b}?",
        "Multiply {a} by {b}.",
    ),
}
_OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
_SYMBOLS = {"plus": "+", "minus": "-", "times": "*"}


def _operand_pairs(op: str) -> list[tuple[int, int]]:
    if op == "plus":
        return [(a, b) for a in range(11) for b in range(11)]
    if op == "minus":
        return [(a, b) for a in range(11) for b in range(a + 1)]
    return [(a, b) for a in range(1, 10) for b in range(1, 10)]


CAPITALS: dict[str, str] = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Mexico": "Mexico City",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Nigeria": "Abuja",
    "Russia": "Moscow",
    "Poland": "Warsaw",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
}
CAPITAL_TEMPLATES: tuple[str, ...] = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital of {country}.",
    "What's the capital city of {country}?",
    "Tell me the capital of {country}.",
)

# (larger unit, smaller unit, how many smaller in one larger)
CONVERSIONS: tuple[tuple[str, str, int], ...] = (
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("litres", "millilitres", 1000),
)
CONVERSION_TEMPLATES: tuple[str, ...] = (
    "How many {small} are in {n} {big}?",
    "Convert {n} {big} to {small}.",
    "What is {n} {big} in {small}?",
    "How many {small} is {n} {big}?",
)
CONVERSION_COUNTS = range(1, 11)


@dataclass(frozen=True)
class QA:
    """One question with a known answer; `expected` is what a correct response must state.

    `topic` groups questions on one fact family: the operation, the country, the unit.
    """

    kind: QuestionKind
    topic: str
    question: str
    answer: str
    expected: str
    equation: str = ""  # a sum's answer written as an equation ("8 + 6 = 14."); empty for other kinds
    working: str = ""  # a conversion's answer with the sum it takes ("3 weeks is 3 * 7 = 21 days."); empty for others


def _arithmetic_questions() -> list[QA]:
    out = []
    for op, templates in ARITHMETIC_TEMPLATES.items():
        for a, b in _operand_pairs(op):
            result = _OPERATIONS[op](a, b)
            answer = f"{a} {op} {b} is {result}."
            equation = f"{a} {_SYMBOLS[op]} {b} = {result}."
            out += [QA("arithmetic", op, t.format(a=a, b=b), answer, str(result), equation) for t in templates]
    return out


def _capital_questions() -> list[QA]:
    return [
        QA("capital", country, t.format(country=country), f"The capital of {country} is {city}.", city)
        for country, city in CAPITALS.items()
        for t in CAPITAL_TEMPLATES
    ]


def _conversion_questions() -> list[QA]:
    out = []
    for big, small, factor in CONVERSIONS:
        for n in CONVERSION_COUNTS:
            big_n = big[:-1] if n == 1 else big  # "1 hour", "2 hours"
            answer = f"{n} {big_n} is {n * factor} {small}."
            working = f"{n} {big_n} is {n} * {factor} = {n * factor} {small}."
            out += [
                QA("conversion", big, t.format(n=n, big=big_n, small=small), answer, str(n * factor), working=working)
                for t in CONVERSION_TEMPLATES
            ]
    return out


def all_questions() -> list[QA]:
    return _arithmetic_questions() + _capital_questions() + _conversion_questions()


HELD_OUT_COUNTS: dict[QuestionKind, int] = {"arithmetic": 90, "capital": 30, "conversion": 40}


def held_out_questions(seed: int = 0) -> list[QA]:
    """Questions never asked in training (as exact strings); their facts are taught by other phrasings."""
    rng = random.Random(f"held-out-{seed}")
    questions = all_questions()
    held: list[QA] = []
    for kind, count in HELD_OUT_COUNTS.items():
        held += rng.sample([q for q in questions if q.kind == kind], count)
    return held


def is_correct(qa: QA, response: str) -> bool:
    """Numbers: the last number in the response is the expected one. Capitals: the city is named."""
    if qa.kind == "capital":
        return re.search(rf"\b{re.escape(qa.expected)}\b", response) is not None
    numbers = re.findall(r"-?\d+", response)
    return bool(numbers) and numbers[-1] == qa.expected


# --- small talk -------------------------------------------------------------------------------------

SMALL_TALK: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (
        ("Hello!", "Hi!", "Hey there!", "Good morning!", "Good evening!", "Hello", "Hi there."),
        (
            "Hello! How can I help you today?",
            "Hi! What can I do for you?",
            "Hello! What would you like to know?",
        ),
    ),
    (
        ("How are you?", "How are you doing?", "How's it going?", "Are you doing well?"),
        ("I'm doing well, thank you. How can I help?", "I'm fine, thanks for asking. What can I do for you?"),
    ),
    (
        ("Thanks!", "Thank you.", "Thanks a lot!", "That was helpful, thank you."),
        ("You're welcome!", "Glad I could help.", "You're welcome. Anything else?"),
    ),
    (
        ("Goodbye!", "Bye.", "See you later!", "That's all, bye."),
        ("Goodbye! Have a nice day.", "Bye! Come back any time."),
    ),
    (
        ("What can you do?", "How can you help me?", "What are you good at?"),
        (
            "I can answer simple questions about arithmetic, capital cities and unit conversions.",
            "I can do small sums, name capital cities and convert units.",
        ),
    ),
    (
        ("What is your name?", "Do you have a name?"),
        ("I am a small demo assistant.", "I'm a small demo assistant without a special name."),
    ),
    (
        ("Tell me a joke.", "Do you know a joke?"),
        (
            "Why did the scarecrow win an award? Because he was outstanding in his field.",
            "Why don't eggs tell jokes? They would crack each other up.",
        ),
    ),
    (
        ("Are you a human?", "Are you a robot?"),
        ("I am an AI assistant, not a human.", "I'm a language model, a small AI assistant."),
    ),
)

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are a friendly assistant.",
    "Answer the user's question.",
)

# Shares of the corpus by skill (per user turn).
SKILL_WEIGHTS: dict[str, float] = {
    "identity": 0.18,
    "arithmetic": 0.38,
    "capital": 0.14,
    "conversion": 0.16,
    "small_talk": 0.14,
}
SYSTEM_PROMPT_SHARE = 0.2
TWO_TURN_SHARE = 0.15


def _vary_surface(text: str, rng: random.Random) -> str:
    """Small surface noise on user text so the model is not brittle to case and punctuation."""
    roll = rng.random()
    if roll < 0.08:
        return text.lower()
    if roll < 0.14:
        return text.rstrip("?.!")
    return text


class _TurnMaker:
    def __init__(self, seed: int, org: str) -> None:
        self.creators = creators_for(org)
        held = held_out_questions(seed)
        held_strings = {q.question for q in held}
        trainable = [q for q in all_questions() if q.question not in held_strings]
        self.facts: dict[str, list[QA]] = {k: [q for q in trainable if q.kind == k] for k in HELD_OUT_COUNTS}
        self.arithmetic_by_op: dict[str, list[QA]] = {}
        for q in self.facts["arithmetic"]:
            self.arithmetic_by_op.setdefault(q.topic, []).append(q)
        self.operations = sorted(self.arithmetic_by_op)

    def turn(self, skill: str, rng: random.Random) -> tuple[str, str]:
        if skill == "identity":
            return rng.choice(TRAIN_IDENTITY_QUESTIONS), identity_answer(rng.choice(self.creators), rng)
        if skill == "small_talk":
            prompts, replies = rng.choice(SMALL_TALK)
            return rng.choice(prompts), rng.choice(replies)
        # Arithmetic: each operation equally often, so subtraction (fewest pairs, most alike answers)
        # gets as much practice as the others. Facts: uniform over questions.
        if skill == "arithmetic":
            qa = rng.choice(self.arithmetic_by_op[rng.choice(self.operations)])
        else:
            qa = rng.choice(self.facts[skill])
        return qa.question, qa.answer


def generate_corpus(n: int, seed: int = 0, org: str = DEFAULT_ORG) -> list[Conversation]:
    """n training conversations; the same (n, seed, org) always gives the same corpus."""
    rng = random.Random(f"corpus-{seed}")
    maker = _TurnMaker(seed, org)
    skills, weights = list(SKILL_WEIGHTS), list(SKILL_WEIGHTS.values())
    corpus: list[Conversation] = []
    for _ in range(n):
        conversation: Conversation = []
        if rng.random() < SYSTEM_PROMPT_SHARE:
            conversation.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(2 if rng.random() < TWO_TURN_SHARE else 1):
            question, answer = maker.turn(rng.choices(skills, weights)[0], rng)
            conversation.append({"role": "user", "content": _vary_surface(question, rng)})
            conversation.append({"role": "assistant", "content": answer})
        corpus.append(conversation)
    return corpus
