"""Offline 4-option multiple choice whose answers are facts about invented medical entities.

A knowledge base of invented drugs, pathogens and syndromes gets one random value per relation
(drawn from a pool of real medical terms, so the options look like MedMCQA's). Each fact is
asked in five wordings. Per fact, one wording (chosen by the seed) is held out for evaluation
and the other four go to training, each with its own distractors and answer position. So:

* the fact is stated only in the training split (as QA items), never in the prompt of the
  evaluation item, and no model has seen the invented names before: the evaluation measures
  what the weights memorised during training, and chance is 25%;
* the evaluation item's text (wording + options + order) never occurs in training, so copying
  a seen question, or its answer letter, does not help.

Records follow the MedMCQA columns (``id``, ``question``, ``opa``..``opd``, ``cop`` 0-based,
``choice_type``, ``exp``, ``subject_name`` = entity kind, ``topic_name`` = relation), plus
``fact_id``, shared by the items that ask the same fact (for per-fact analysis).
"""

from __future__ import annotations

import random
from typing import Any

from molf_jax.data._names import invented_name

_ORGANS = ("liver", "kidney", "stomach", "heart", "lung", "thyroid", "pancreas", "spleen", "skin",
           "retina", "bone marrow", "adrenal gland")

# relation -> (value pool, five wordings with "{e}" for the entity)
_RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "indication": (
        ("migraine", "asthma", "gout", "psoriasis", "glaucoma", "anemia", "epilepsy",
         "hypertension", "malaria", "insomnia", "tuberculosis", "osteoporosis"),
        ("{e} is mainly used to treat which condition?",
         "Which disease is {e} prescribed for?",
         "A physician would most likely prescribe {e} to a patient with:",
         "The primary indication of {e} is:",
         "{e} was developed as a therapy for which of the following?"),
    ),
    "adverse_effect": (
        ("hair loss", "dry cough", "tinnitus", "gingival hyperplasia", "photosensitivity",
         "hypokalemia", "constipation", "blurred vision", "tremor", "hiccups", "rash", "vertigo"),
        ("Which adverse effect is characteristic of {e}?",
         "The most common side effect of {e} is:",
         "Patients taking {e} should be warned about which side effect?",
         "A well-known adverse reaction to {e} is:",
         "Treatment with {e} typically causes:"),
    ),
    "target_organ": (
        _ORGANS,
        ("{e} acts primarily on which organ?",
         "The main target organ of {e} is the:",
         "Which organ does {e} chiefly affect?",
         "{e} exerts its effect mainly in the:",
         "The site of action of {e} is the:"),
    ),
    "transmission": (
        ("mosquitoes", "ticks", "sandflies", "contaminated water", "raw pork", "bats", "rodents",
         "lice", "fleas", "unpasteurized milk", "snails", "birds"),
        ("How is {e} usually transmitted to humans?",
         "{e} is spread to humans mainly by:",
         "The main source of human infection with {e} is:",
         "Which of the following transmits {e}?",
         "Infection with {e} is typically acquired from:"),
    ),
    "treatment": (
        ("doxycycline", "ivermectin", "praziquantel", "acyclovir", "metronidazole",
         "ceftriaxone", "fluconazole", "azithromycin", "oseltamivir", "albendazole",
         "rifampicin", "chloroquine"),
        ("The drug of choice for {e} infection is:",
         "Which drug is first-line against {e}?",
         "Infection with {e} is best treated with:",
         "A patient infected with {e} should receive:",
         "{e} responds best to which drug?"),
    ),
    "infected_organ": (
        _ORGANS,
        ("{e} primarily infects which organ?",
         "Which organ is the main site of {e} infection?",
         "In humans, {e} mostly damages the:",
         "{e} has a marked tropism for the:",
         "Biopsy in {e} infection is usually taken from the:"),
    ),
    "deficient_enzyme": (
        ("galactokinase", "arginase", "aldolase B", "catalase", "transketolase", "glucokinase",
         "enolase", "lactase", "aromatase", "sphingomyelinase", "homogentisate oxidase",
         "carnitine transferase"),
        ("{e} is caused by a deficiency of which enzyme?",
         "Which enzyme is lacking in {e}?",
         "The underlying defect in {e} involves:",
         "Patients with {e} have low activity of:",
         "{e} results from a defect in which enzyme?"),
    ),
    "hallmark_sign": (
        ("blue sclerae", "cherry-red spot", "butterfly rash", "finger clubbing", "hepatomegaly",
         "night blindness", "short stature", "cataracts", "hearing loss", "kidney stones",
         "tall stature", "pale skin"),
        ("A hallmark finding in {e} is:",
         "Which sign is typical of {e}?",
         "On examination, a patient with {e} characteristically shows:",
         "The classic clinical sign of {e} is:",
         "Which feature points to a diagnosis of {e}?"),
    ),
}
_KINDS = (
    ("drug", ("indication", "adverse_effect", "target_organ")),
    ("pathogen", ("transmission", "treatment", "infected_organ")),
    ("syndrome", ("deficient_enzyme", "hallmark_sign")),
)
_WORDINGS = 5


def _entity_name(rng: random.Random, kind: str) -> str:
    if kind == "drug":
        return invented_name(rng, syllables=3).lower()
    if kind == "pathogen":
        return invented_name(rng, syllables=2, suffix=rng.choice(["ella", "ococcus", "virus"]))
    first, second = invented_name(rng, syllables=2), invented_name(rng, syllables=2)
    return f"{first}-{second} syndrome"


def _facts(rng: random.Random, size: int) -> list[tuple[str, str, str, str]]:
    """Returns ``size`` facts (kind, entity, relation, value) about distinct invented entities."""
    facts, names = [], set()
    k = 0
    while len(facts) < size:
        kind, relations = _KINDS[k % len(_KINDS)]
        k += 1
        name = _entity_name(rng, kind)
        if name.lower() in names:
            continue
        names.add(name.lower())
        for relation in relations:
            facts.append((kind, name, relation, rng.choice(_RELATIONS[relation][0])))
    return facts[:size]


def _positions(rng: random.Random, n: int) -> list[int]:
    # Answer positions balanced over A-D, so always answering one letter scores exactly chance.
    cycle = [i % 4 for i in range(n)]
    rng.shuffle(cycle)
    return cycle


def _item(rng, index, fact_id, fact, wording, position) -> dict[str, Any]:
    kind, name, relation, value = fact
    pool, wordings = _RELATIONS[relation]
    options = rng.sample([v for v in pool if v != value], 3)
    options.insert(position, value)
    question = wordings[wording].format(e=name)
    question = question[0].upper() + question[1:]
    return {
        "id": f"offline-med-{index}",
        "question": question,
        "opa": options[0],
        "opb": options[1],
        "opc": options[2],
        "opd": options[3],
        "cop": position,
        "choice_type": "single",
        "exp": "",
        "subject_name": kind,
        "topic_name": relation,
        "fact_id": fact_id,
    }


def generate(*, size: int, seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Generates the items of ``size`` facts: 4 training items and 1 evaluation item per fact.

    Example:
      >>> train, evals = generate(size=6, seed=0)
      >>> len(train), len(evals)
      (24, 6)
    """
    rng = random.Random(f"molf-offline-med-{seed}")
    facts = _facts(rng, size)
    held_out = [rng.randrange(_WORDINGS) for _ in facts]
    train_plan = [(k, w) for k, h in enumerate(held_out) for w in range(_WORDINGS) if w != h]
    eval_plan = list(enumerate(held_out))
    train_positions = _positions(rng, len(train_plan))
    eval_positions = _positions(rng, len(eval_plan))
    train = [
        _item(rng, i, k, facts[k], w, p)
        for i, ((k, w), p) in enumerate(zip(train_plan, train_positions))
    ]
    rng.shuffle(train)
    evals = [
        _item(rng, len(train) + i, k, facts[k], w, p)
        for i, ((k, w), p) in enumerate(zip(eval_plan, eval_positions))
    ]
    return train, evals
