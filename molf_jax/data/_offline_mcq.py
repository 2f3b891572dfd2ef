"""Offline 4-option multiple choice over knowledge the base model already has.

The Med-style task teaches a *format*, not facts: every question asks something the base model
answers correctly when asked in a plain cloze form ("27 + 15 =", "The capital of Peru is"), so
fine-tuning only has to map knowledge the model holds onto the multiple-choice format. That is
where the paper expects LoRA's low-rank update to suffice and full fine-tuning to forget more.
The answer is the correct option's *text* (``answer_style: 'option_text'``), not its letter:
Gemma 3 270M did not learn which letter goes with which option in 20 optimizer steps (every
method scored 25%, chance), while writing the option's text asks it for the fact it knows.

Candidates come from a few families of common knowledge (sums, differences and products of small
numbers, the next number of a count, capitals, opposites, past tenses, plurals), each with a cloze prompt, an answer and three plausible
distractors. ``known_cases.json`` beside this file lists the cloze prompts that Gemma 3 270M (the
project's embedded model) completes correctly with greedy decoding (the answer, then no further
letter or digit); it is written by ``python scripts/known_facts.py`` with that model.
``generate(known_only=True)`` (the default) keeps only those, so what the evaluation measures
is the format, on knowledge that is there.

Records follow the MedMCQA columns (``id``, ``question``, ``opa``..``opd``, ``cop`` 0-based,
``choice_type``, ``exp``, ``subject_name`` = family, ``topic_name`` = family), plus
``fact_id`` (the cloze prompt) and ``answer_style``. Training and evaluation items never share a
fact, and answer positions are balanced over A-D in each split.

:func:`forgetting_probe` picks a fixed set of the known facts, asked in their cloze form, to
measure what a fine-tuned model has forgotten of what its base model knew.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any, NamedTuple

from molf_jax.data._prompts import ANSWER_STYLE, OPTION_TEXT

KNOWN_FILE = Path(__file__).with_name("known_cases.json")

_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Ireland", "Dublin"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("Turkey", "Ankara"), ("India", "New Delhi"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Mexico", "Mexico City"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
    ("Brazil", "Brasilia"), ("Colombia", "Bogota"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Ukraine", "Kyiv"), ("Czechia", "Prague"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Switzerland", "Bern"), ("Scotland", "Edinburgh"), ("England", "London"),
    ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"),
    ("Pakistan", "Islamabad"), ("Afghanistan", "Kabul"), ("Saudi Arabia", "Riyadh"),
    ("Israel", "Jerusalem"), ("Lebanon", "Beirut"), ("Syria", "Damascus"), ("Jordan", "Amman"),
    ("Ethiopia", "Addis Ababa"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Morocco", "Rabat"),
    ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Venezuela", "Caracas"), ("Iceland",
    "Reykjavik"), ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"),
    ("Nepal", "Kathmandu"), ("Bangladesh", "Dhaka"), ("Mongolia", "Ulaanbaatar"),
)
_OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("high", "low"), ("old", "young"), ("rich", "poor"),
    ("early", "late"), ("strong", "weak"), ("wet", "dry"), ("hard", "soft"), ("full", "empty"),
    ("long", "short"), ("thick", "thin"), ("loud", "quiet"),
    ("clean", "dirty"), ("cheap", "expensive"), ("true", "false"), ("left", "right"),
    ("inside", "outside"), ("win", "lose"), ("buy", "sell"), ("push", "pull"),
    ("begin", "end"), ("day", "night"), ("north", "south"), ("east", "west"),
    ("love", "hate"), ("friend", "enemy"), ("question", "answer"), ("first", "last"),
    ("good", "bad"), ("black", "white"), ("alive", "dead"), ("safe", "dangerous"),
    ("sweet", "sour"), ("always", "never"), ("before", "after"), ("above", "below"),
)

_PAST_TENSES = (
    ("go", "went"), ("eat", "ate"), ("see", "saw"), ("take", "took"), ("give", "gave"),
    ("come", "came"), ("run", "ran"), ("swim", "swam"), ("sing", "sang"), ("drink", "drank"),
    ("write", "wrote"), ("drive", "drove"), ("ride", "rode"), ("speak", "spoke"),
    ("break", "broke"), ("choose", "chose"), ("freeze", "froze"), ("steal", "stole"),
    ("wake", "woke"), ("fly", "flew"), ("grow", "grew"), ("know", "knew"), ("throw", "threw"),
    ("draw", "drew"), ("blow", "blew"), ("begin", "began"), ("ring", "rang"), ("sit", "sat"),
    ("get", "got"), ("forget", "forgot"), ("find", "found"), ("buy", "bought"),
    ("bring", "brought"), ("think", "thought"), ("fight", "fought"), ("catch", "caught"),
    ("teach", "taught"), ("sell", "sold"), ("tell", "told"), ("hold", "held"),
    ("stand", "stood"), ("understand", "understood"), ("feel", "felt"), ("keep", "kept"),
    ("sleep", "slept"), ("leave", "left"), ("meet", "met"), ("send", "sent"),
    ("spend", "spent"), ("build", "built"), ("lose", "lost"), ("make", "made"),
    ("pay", "paid"), ("say", "said"), ("hear", "heard"), ("win", "won"), ("fall", "fell"),
    ("wear", "wore"), ("tear", "tore"), ("bite", "bit"), ("hide", "hid"), ("shake", "shook"),
    ("walk", "walked"), ("play", "played"), ("jump", "jumped"), ("talk", "talked"),
    ("watch", "watched"), ("open", "opened"), ("call", "called"), ("help", "helped"),
    ("cook", "cooked"), ("clean", "cleaned"), ("dance", "danced"), ("smile", "smiled"),
    ("live", "lived"), ("love", "loved"), ("stop", "stopped"), ("plan", "planned"),
    ("cry", "cried"), ("study", "studied"), ("carry", "carried"), ("try", "tried"),
)
_PLURALS = (
    ("child", "children"), ("man", "men"), ("woman", "women"), ("mouse", "mice"),
    ("foot", "feet"), ("tooth", "teeth"), ("goose", "geese"), ("person", "people"),
    ("ox", "oxen"), ("leaf", "leaves"), ("knife", "knives"), ("wife", "wives"),
    ("life", "lives"), ("wolf", "wolves"), ("half", "halves"), ("shelf", "shelves"),
    ("loaf", "loaves"), ("cactus", "cacti"), ("box", "boxes"), ("bus", "buses"),
    ("church", "churches"), ("dish", "dishes"), ("glass", "glasses"), ("fox", "foxes"),
    ("watch", "watches"), ("city", "cities"), ("baby", "babies"), ("party", "parties"),
    ("story", "stories"), ("country", "countries"), ("lady", "ladies"), ("family", "families"),
    ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"), ("cat", "cats"),
    ("dog", "dogs"), ("book", "books"), ("car", "cars"), ("tree", "trees"), ("house", "houses"),
    ("apple", "apples"), ("bird", "birds"), ("chair", "chairs"), ("table", "tables"),
    ("horse", "horses"), ("flower", "flowers"), ("river", "rivers"), ("friend", "friends"),
    ("teacher", "teachers"), ("day", "days"), ("boy", "boys"), ("girl", "girls"),
    ("key", "keys"), ("toy", "toys"), ("pen", "pens"), ("star", "stars"), ("shoe", "shoes"),
    ("hand", "hands"), ("eye", "eyes"),
)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One fact: a cloze prompt, its answer, a question and three distractors."""

    family: str
    cloze: str
    answer: str
    question: str
    distractors: tuple[str, ...]

    @property
    def completion(self) -> str:
        """What a model that knows the fact writes right after the cloze: the answer, after a
        space unless the cloze ends by opening a quote (``'... is "'`` + ``'cold'``)."""
        return self.answer if self.cloze.endswith('"') else " " + self.answer


def _number_distractors(rng: random.Random, answer: int) -> tuple[str, ...]:
    near = {answer + d for d in (-10, -2, -1, 1, 2, 10)} - {answer}
    return tuple(str(n) for n in rng.sample(sorted(n for n in near if n >= 0), 3))


def candidates() -> list[Candidate]:
    """Every candidate fact, in a fixed order (the base model's filter is keyed by ``cloze``).

    Example:
      >>> facts = candidates()
      >>> facts[0].cloze, facts[0].answer
      ('3 + 4 = 7\\n12 + 5 = 17\\n2 + 2 =', '4')
    """
    rng = random.Random("molf-offline-med-candidates")
    out = []
    shots = {"+": "3 + 4 = 7\n12 + 5 = 17\n", "-": "9 - 4 = 5\n20 - 7 = 13\n",
             "x": "3 x 4 = 12\n6 x 5 = 30\n"}
    words = {"+": ("What is {a} plus {b}?", "{a} + {b} equals:", "Add {a} and {b}:"),
             "-": ("What is {a} minus {b}?", "{a} - {b} equals:", "Subtract {b} from {a}:"),
             "x": ("What is {a} times {b}?", "{a} x {b} equals:", "Multiply {a} by {b}:")}
    pairs = {"+": [(a, b) for a in range(2, 50) for b in range(2, 50)],
             "-": [(a, b) for a in range(10, 60) for b in range(2, 10)],
             "x": [(a, b) for a in range(2, 13) for b in range(2, 13)]}
    for op, values in pairs.items():
        for a, b in values:
            answer = {"+": a + b, "-": a - b, "x": a * b}[op]
            question = rng.choice(words[op]).format(a=a, b=b)
            out.append(Candidate(f"arithmetic {op}", f"{shots[op]}{a} {op} {b} =", str(answer),
                                 question, _number_distractors(rng, answer)))
    cities = [c for _, c in _CAPITALS]
    for country, city in _CAPITALS:
        question = rng.choice(("What is the capital of {c}?", "The capital city of {c} is:",
                               "Which city is the capital of {c}?")).format(c=country)
        out.append(Candidate("capital", f"The capital of {country} is", city, question,
                             tuple(rng.sample([x for x in cities if x != city], 3))))
    words_pool = sorted({w for pair in _OPPOSITES for w in pair})
    for first, second in _OPPOSITES + tuple((b, a) for a, b in _OPPOSITES):
        question = rng.choice(('What is the opposite of "{w}"?', 'The opposite of "{w}" is:',
                               'Which word means the opposite of "{w}"?')).format(w=first)
        others = [w for w in words_pool if w not in (first, second)]
        out.append(Candidate("opposite", f'The opposite of "{first}" is "', second, question,
                             tuple(rng.sample(others, 3))))
    # Families added later come last, so the facts above (and their draws of rng) never change.
    for start in range(10, 260):
        counted = ", ".join(str(n) for n in range(start - 3, start)) + ","
        question = rng.choice(("What number comes right after {n}?",
                               "Which number follows {n}?", "{n} plus one is:")).format(n=start - 1)
        out.append(Candidate("next number", counted, str(start), question,
                             _number_distractors(rng, start)))
    for family, pairs, template, asks in (
        ("past tense", _PAST_TENSES, 'The past tense of "{w}" is "',
         ('What is the past tense of "{w}"?', 'The past tense of "{w}" is:')),
        ("plural", _PLURALS, 'The plural of "{w}" is "',
         ('What is the plural of "{w}"?', 'The plural of "{w}" is:')),
    ):
        forms = sorted({form for _, form in pairs})
        for word, form in pairs:
            out.append(Candidate(family, template.format(w=word), form,
                                 rng.choice(asks).format(w=word),
                                 tuple(rng.sample([f for f in forms if f != form], 3))))
    return out


def known_clozes() -> set[str] | None:
    """The cloze prompts the embedded base model answers correctly (None if never measured)."""
    if not KNOWN_FILE.is_file():
        return None
    return set(json.loads(KNOWN_FILE.read_text())["known"])


def _positions(rng: random.Random, n: int) -> list[int]:
    # Answer positions balanced over A-D, so always answering one letter scores exactly chance.
    cycle = [i % 4 for i in range(n)]
    rng.shuffle(cycle)
    return cycle


def _item(index: int, fact: Candidate, position: int) -> dict[str, Any]:
    options = list(fact.distractors)
    options.insert(position, fact.answer)
    return {"id": f"offline-med-{index}", "question": fact.question, "opa": options[0],
            "opb": options[1], "opc": options[2], "opd": options[3], "cop": position,
            "choice_type": "single", "exp": "", "subject_name": fact.family,
            "topic_name": fact.family, "fact_id": fact.cloze, ANSWER_STYLE: OPTION_TEXT}


def generate(*, size: int, seed: int = 0, known_only: bool = True
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``size`` training items and every remaining fact as an evaluation item.

    Args:
      size: training items (facts); the evaluation split holds all the other facts.
      seed: which facts train, and the answer positions.
      known_only: keep only facts the embedded base model knows (``known_cases.json``).

    Example:
      >>> train, evals = generate(size=8, seed=0)
      >>> len(train), len(evals) >= 400
      (8, True)
    """
    facts = candidates()
    known = known_clozes() if known_only else None
    if known is not None:
        facts = [f for f in facts if f.cloze in known]
    if not 0 < size < len(facts):
        raise ValueError(f"size must be in 1..{len(facts) - 1} for offline med, got {size}")
    rng = random.Random(f"molf-offline-med-{seed}")
    rng.shuffle(facts)
    train_facts, eval_facts = facts[:size], facts[size:]
    train = [_item(i, f, p) for i, (f, p) in
             enumerate(zip(train_facts, _positions(rng, len(train_facts))))]
    evals = [_item(size + i, f, p) for i, (f, p) in
             enumerate(zip(eval_facts, _positions(rng, len(eval_facts))))]
    return train, evals


class ProbeFact(NamedTuple):
    """One known fact of the forgetting probe, asked in its cloze form.

    Attributes:
      cloze: the prompt ("The capital of Peru is").
      completion: what the base model writes after it (" Lima"; see
        :attr:`Candidate.completion`).
      answer: the answer itself ("Lima").
      family: the fact's family ("capital").
    """

    cloze: str
    completion: str
    answer: str
    family: str


def forgetting_probe(n: int = 400, seed: int = 0) -> list[ProbeFact]:
    """``n`` facts the embedded base model knows, to score what fine-tuning made it forget.

    The facts come from :func:`candidates` filtered by ``known_cases.json``, taken round-robin
    over the families (each family's known facts shuffled by ``seed``), so the probe is as
    balanced over families as their known counts allow: a family with fewer known facts than
    its share gives all it has. The same ``n`` and ``seed`` always give the same facts, in the
    same order. Score them with :func:`molf_jax.eval.retained_facts`.

    Args:
      n: number of facts (at most the number of known facts).
      seed: which facts of each family.

    Example:
      >>> probe = forgetting_probe(8)
      >>> len(probe), len({f.family for f in probe})
      (8, 8)
      >>> probe[0].completion.strip() == probe[0].answer
      True
    """
    known = known_clozes()
    if known is None:
        raise ValueError(f"forgetting_probe needs {KNOWN_FILE.name} (written by "
                         "scripts/known_facts.py); it is missing")
    families: dict[str, list[Candidate]] = {}
    for fact in candidates():
        if fact.cloze in known:
            families.setdefault(fact.family, []).append(fact)
    total = sum(len(facts) for facts in families.values())
    if not 0 < n <= total:
        raise ValueError(f"forgetting_probe: n must be in 1..{total} (the known facts), got {n}")
    rng = random.Random(f"molf-forgetting-probe-{seed}")
    queues = []
    for family in families:  # candidates() order, so the family order is fixed too
        facts = families[family]
        rng.shuffle(facts)
        queues.append(facts)
    chosen: list[Candidate] = []
    while len(chosen) < n:
        for facts in queues:
            if facts and len(chosen) < n:
                chosen.append(facts.pop())
    return [ProbeFact(f.cloze, f.completion, f.answer, f.family) for f in chosen]
