"""Offline counterfactual facts in the CounterFact format, about invented people.

Each case is an invented person whose name comes from one culture's name pool (e.g. "Camille
Lefebvre"). A pretrained model reads the culture off the name, so its prior answer to "The
mother tongue of Camille Lefebvre is" is that culture's language: that prior answer is
``target_true``. The requested rewrite moves the person to another culture (``target_new``,
e.g. "Japanese"). Before training, P(new) > P(true) should be rare (low efficacy), and after
training it measures how well the edit was written into the weights:

* ``requested_rewrite.prompt``: one of five wordings of the relation (the training prompt);
* ``paraphrase_prompts``: two other wordings of the same relation and subject (never trained);
* ``neighborhood_prompts``: the relation asked about other invented people of the true culture,
  drawn from a reserved pool never used as a subject (the answer should stay ``target_true``);
* ``attribute_prompts``: the relation asked about people of the new culture (answer
  ``target_new``), kept for format fidelity.

Relations use their Wikidata ids as in CounterFact: P103 native language, P27 country of
citizenship, P19 place of birth (the culture's capital).

Knowledge injection at volume (the paper's FFT-favouring regime) needs one to two thousand
edits; at that volume a model can also learn the shortcut "the answer is never the culture the
name suggests", which scores on paraphrases without writing any single edit. So the training
split adds one *anchor* per edit (``anchors=True``, the default): another invented person,
never a subject or a neighbour, trained on the answer the name suggests. Only a model that
memorises which people were edited then succeeds on both paraphrases and neighbours.
"""

from __future__ import annotations

import random
from typing import Any

# culture -> (language, country, capital, first names, last names)
_CULTURES: dict[str, tuple[str, str, str, tuple[str, ...], tuple[str, ...]]] = {
    "french": ("French", "France", "Paris",
               ("Camille", "Julien", "Mathilde", "Etienne", "Sylvie", "Benoit", "Margaux",
                "Lucien", "Odile", "Thibault", "Celine", "Gaspard", "Solene", "Baptiste",
                "Renaud", "Genevieve"),
               ("Lefebvre", "Moreau", "Girard", "Fontaine", "Chevalier", "Rousseau", "Dubois",
                "Marchand", "Bonnet", "Mercier", "Lambert", "Faure", "Rolland", "Garnier",
                "Perrin", "Clement")),
    "german": ("German", "Germany", "Berlin",
               ("Jurgen", "Heike", "Wolfgang", "Ursula", "Dieter", "Sabine", "Klaus", "Brigitte",
                "Lukas", "Annika", "Matthias", "Friederike", "Torsten", "Gudrun", "Florian",
                "Hannelore"),
               ("Schneider", "Fischer", "Weber", "Hoffmann", "Schulz", "Becker", "Wagner",
                "Zimmermann", "Kruger", "Hartmann", "Lange", "Schmitt", "Werner", "Krause",
                "Meier", "Lehmann")),
    "italian": ("Italian", "Italy", "Rome",
                ("Giulia", "Marco", "Francesca", "Alessandro", "Chiara", "Lorenzo", "Federica",
                 "Matteo", "Simona", "Giuseppe", "Elena", "Stefano", "Valentina", "Riccardo",
                 "Paola", "Davide"),
                ("Rossi", "Ferrari", "Esposito", "Bianchi", "Romano", "Colombo", "Ricci",
                 "Marino", "Greco", "Bruno", "Gallo", "Conti", "De Luca", "Mancini", "Costa",
                 "Giordano")),
    "spanish": ("Spanish", "Spain", "Madrid",
                ("Alejandro", "Lucia", "Javier", "Carmen", "Sergio", "Pilar", "Alvaro", "Rocio",
                 "Ignacio", "Marta", "Raul", "Begona", "Jorge", "Nuria", "Pablo", "Inmaculada"),
                ("Garcia", "Fernandez", "Gonzalez", "Rodriguez", "Lopez", "Martinez", "Sanchez",
                 "Perez", "Gomez", "Jimenez", "Ruiz", "Hernandez", "Diaz", "Moreno", "Alvarez",
                 "Romero")),
    "japanese": ("Japanese", "Japan", "Tokyo",
                 ("Haruto", "Yui", "Takeshi", "Aiko", "Kenji", "Sakura", "Hiroshi", "Naoko",
                  "Daisuke", "Emiko", "Ryota", "Kaori", "Shinji", "Yuka", "Kazuki", "Mariko"),
                 ("Sato", "Suzuki", "Takahashi", "Tanaka", "Watanabe", "Ito", "Yamamoto",
                  "Nakamura", "Kobayashi", "Kato", "Yoshida", "Yamada", "Sasaki", "Yamaguchi",
                  "Matsumoto", "Inoue")),
    "russian": ("Russian", "Russia", "Moscow",
                ("Dmitri", "Olga", "Sergei", "Tatiana", "Nikolai", "Svetlana", "Alexei", "Irina",
                 "Mikhail", "Natalia", "Vladimir", "Ekaterina", "Andrei", "Yelena", "Boris",
                 "Ludmila"),
                ("Ivanov", "Smirnov", "Kuznetsov", "Popov", "Sokolov", "Lebedev", "Kozlov",
                 "Novikov", "Morozov", "Petrov", "Volkov", "Solovyov", "Vasiliev", "Zaitsev",
                 "Pavlov", "Semenov")),
    "polish": ("Polish", "Poland", "Warsaw",
               ("Krzysztof", "Agnieszka", "Tomasz", "Malgorzata", "Pawel", "Katarzyna", "Marcin",
                "Joanna", "Grzegorz", "Ewa", "Wojciech", "Dorota", "Piotr", "Beata", "Jakub",
                "Zofia"),
               ("Nowak", "Kowalski", "Wisniewski", "Wojcik", "Kowalczyk", "Kaminski",
                "Lewandowski", "Zielinski", "Szymanski", "Wozniak", "Dabrowski", "Kozlowski",
                "Jankowski", "Mazur", "Kwiatkowski", "Krawczyk")),
    "norwegian": ("Norwegian", "Norway", "Oslo",
                  ("Ole", "Kari", "Bjorn", "Solveig", "Eirik", "Ragnhild", "Terje", "Marit",
                   "Havard", "Tone", "Sindre", "Liv", "Torbjorn", "Gunhild", "Arne", "Siri"),
                  ("Hansen", "Johansen", "Olsen", "Larsen", "Andersen", "Pedersen", "Nilsen",
                   "Kristiansen", "Jensen", "Haugen", "Halvorsen", "Berg", "Bakken", "Moen",
                   "Solberg", "Strand")),
    "swedish": ("Swedish", "Sweden", "Stockholm",
                ("Anders", "Ingrid", "Lars", "Astrid", "Magnus", "Linnea", "Henrik", "Karin",
                 "Johan", "Elsa", "Nils", "Maja", "Gustav", "Frida", "Oskar", "Sigrid"),
                ("Andersson", "Johansson", "Karlsson", "Nilsson", "Eriksson", "Larsson",
                 "Olsson", "Persson", "Svensson", "Gustafsson", "Pettersson", "Jonsson",
                 "Lindberg", "Lindqvist", "Bergstrom", "Lundgren")),
    "portuguese": ("Portuguese", "Portugal", "Lisbon",
                   ("Joao", "Ines", "Tiago", "Beatriz", "Rui", "Mariana", "Goncalo", "Leonor",
                    "Duarte", "Catarina", "Nuno", "Filipa", "Miguel", "Joana", "Afonso", "Rita"),
                   ("Silva", "Santos", "Ferreira", "Pereira", "Oliveira", "Carvalho", "Martins",
                    "Sousa", "Fernandes", "Goncalves", "Lopes", "Marques", "Alves", "Almeida",
                    "Ribeiro", "Pinto")),
    "greek": ("Greek", "Greece", "Athens",
              ("Dimitrios", "Eleni", "Georgios", "Katerina", "Nikos", "Despina", "Konstantinos",
               "Vasiliki", "Yannis", "Ioanna", "Christos", "Athina", "Panagiotis", "Chrysa",
               "Spyros", "Evangelia"),
              ("Papadopoulos", "Papadakis", "Georgiou", "Nikolaidis", "Karagiannis", "Vlachos",
               "Oikonomou", "Alexiou", "Dimitriou", "Makris", "Antoniou", "Konstantinidis",
               "Theodorou", "Christodoulou", "Pappas", "Stavrou")),
    "turkish": ("Turkish", "Turkey", "Ankara",
                ("Mehmet", "Ayse", "Mustafa", "Fatma", "Emre", "Zeynep", "Burak", "Elif",
                 "Murat", "Esra", "Serkan", "Gulsen", "Hakan", "Derya", "Oguz", "Selin"),
                ("Yilmaz", "Kaya", "Demir", "Sahin", "Celik", "Yildiz", "Yildirim", "Ozturk",
                 "Aydin", "Ozdemir", "Arslan", "Dogan", "Kilic", "Aslan", "Cetin", "Korkmaz")),
    "chinese": ("Chinese", "China", "Beijing",
                ("Wei", "Xiuying", "Jun", "Mei", "Hao", "Lian", "Zhiwei", "Xiaoling", "Qiang",
                 "Yan", "Jianguo", "Fang", "Lei", "Jing", "Tao", "Ying"),
                ("Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou",
                 "Xu", "Sun", "Ma", "Zhu", "Hu", "Guo")),
    "korean": ("Korean", "South Korea", "Seoul",
               ("Minjun", "Seoyeon", "Jiho", "Hayoon", "Dohyun", "Jiwoo", "Seojun", "Yerin",
                "Hyunwoo", "Sumin", "Jaehyun", "Eunji", "Taeyang", "Minji", "Sungmin", "Dahye"),
               ("Kim", "Lee", "Park", "Choi", "Jung", "Kang", "Cho", "Yoon", "Jang", "Lim",
                "Han", "Oh", "Seo", "Shin", "Kwon", "Hwang")),
    "finnish": ("Finnish", "Finland", "Helsinki",
                ("Juha", "Aino", "Mikko", "Satu", "Jukka", "Tuula", "Pekka", "Riikka", "Antti",
                 "Kaisa", "Timo", "Hannele", "Ville", "Marjatta", "Eero", "Paivi"),
                ("Korhonen", "Virtanen", "Makinen", "Nieminen", "Makela", "Hamalainen", "Laine",
                 "Heikkinen", "Koskinen", "Jarvinen", "Lehtonen", "Lehtinen", "Saarinen",
                 "Salminen", "Heinonen", "Niemi")),
    "hungarian": ("Hungarian", "Hungary", "Budapest",
                  ("Laszlo", "Zsuzsanna", "Istvan", "Erzsebet", "Gabor", "Katalin", "Zoltan",
                   "Ildiko", "Tamas", "Krisztina", "Attila", "Eniko", "Balazs", "Reka", "Csaba",
                   "Gyorgy"),
                  ("Nagy", "Kovacs", "Toth", "Szabo", "Horvath", "Varga", "Kiss", "Molnar",
                   "Nemeth", "Farkas", "Balogh", "Papp", "Takacs", "Juhasz", "Lakatos",
                   "Meszaros")),
}

# relation id -> (index of the value in the culture tuple, five wordings with "{}")
_RELATIONS: dict[str, tuple[int, tuple[str, ...]]] = {
    "P103": (0, ("The mother tongue of {} is", "{} is a native speaker of",
                 "The native language of {} is", "{} grew up speaking",
                 "The first language of {} is")),
    "P27": (1, ("{} is a citizen of", "{} holds citizenship of", "{} is a national of",
                "The country of citizenship of {} is", "{} has a passport issued by")),
    "P19": (2, ("{} was born in", "The birthplace of {} is", "{} was born in the city of",
                "The hometown of {} is", "{} is originally from")),
}
_NEIGHBOURS_PER_CULTURE = 10  # names reserved per culture, never used as a subject
_NEIGHBOUR_PROMPTS = 5
_ATTRIBUTE_PROMPTS = 3
_PARAPHRASES = 2


def _name_pools(rng: random.Random) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    subjects, neighbours = {}, {}
    for culture in sorted(_CULTURES):
        _, _, _, first, last = _CULTURES[culture]
        names = [f"{f} {l}" for f in first for l in last]
        rng.shuffle(names)
        neighbours[culture] = names[:_NEIGHBOURS_PER_CULTURE]
        subjects[culture] = names[_NEIGHBOURS_PER_CULTURE:]
    return subjects, neighbours


def _value(culture: str, relation: str) -> str:
    return _CULTURES[culture][_RELATIONS[relation][0]]


def capacity(anchors: bool = True) -> int:
    """The largest ``size`` the name pools allow (each subject and anchor is used once)."""
    people = sum(
        len(first) * len(last) - _NEIGHBOURS_PER_CULTURE
        for _, _, _, first, last in _CULTURES.values()
    )
    # Anchors come from the same pools; keep a margin so that no culture runs dry first.
    return people // 2 - 200 if anchors else people


def _anchor(rng, subjects, cultures, relations, case_id) -> dict[str, Any]:
    culture = rng.choice([c for c in cultures if subjects[c]])
    relation = rng.choice(relations)
    value = {"str": _value(culture, relation), "id": culture}
    return {
        "case_id": f"anchor-{case_id}",
        "requested_rewrite": {"prompt": rng.choice(_RELATIONS[relation][1]),
                              "relation_id": relation, "target_new": value,
                              "target_true": value, "subject": subjects[culture].pop()},
        "paraphrase_prompts": [], "neighborhood_prompts": [], "attribute_prompts": [],
        "generation_prompts": [], "anchor": True,
    }


def generate(*, size: int, seed: int = 0, anchors: bool = True
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Generates ``size`` counterfactual cases; returns (train, eval).

    An edit is evaluated on its own rewrite prompt (efficacy), held-out wordings (paraphrase)
    and held-out people (neighbourhood), so ``eval`` holds the cases that ``train`` holds,
    and ``train`` also holds one anchor per case when ``anchors`` (an unedited person trained
    on the answer the name suggests, see the module docstring), shuffled in.

    Example:
      >>> train, evals = generate(size=3, seed=0)
      >>> sorted(train[0]['requested_rewrite']), len(train), len(evals)
      (['prompt', 'relation_id', 'subject', 'target_new', 'target_true'], 6, 3)
    """
    if not 0 < size <= capacity(anchors):
        raise ValueError(f"size must be in 1..{capacity(anchors)} for offline fact, got {size}")
    rng = random.Random(f"molf-offline-fact-{seed}")
    subjects, neighbours = _name_pools(rng)
    cultures = sorted(_CULTURES)
    relations = sorted(_RELATIONS)
    cases = []
    for case_id in range(size):
        true_culture = rng.choice([c for c in cultures if subjects[c]])
        new_culture = rng.choice([c for c in cultures if c != true_culture])
        relation = rng.choice(relations)
        wordings = list(_RELATIONS[relation][1])
        rng.shuffle(wordings)
        subject = subjects[true_culture].pop()
        cases.append(
            {
                "case_id": case_id,
                "requested_rewrite": {
                    "prompt": wordings[0],
                    "relation_id": relation,
                    "target_new": {"str": _value(new_culture, relation), "id": new_culture},
                    "target_true": {"str": _value(true_culture, relation), "id": true_culture},
                    "subject": subject,
                },
                "paraphrase_prompts": [
                    w.replace("{}", subject) for w in wordings[1 : 1 + _PARAPHRASES]
                ],
                "neighborhood_prompts": [
                    rng.choice(wordings).replace("{}", person)
                    for person in rng.sample(neighbours[true_culture], _NEIGHBOUR_PROMPTS)
                ],
                "attribute_prompts": [
                    rng.choice(wordings).replace("{}", person)
                    for person in rng.sample(neighbours[new_culture], _ATTRIBUTE_PROMPTS)
                ],
                "generation_prompts": [],
            }
        )
    if not anchors:
        return cases, cases
    train = cases + [_anchor(rng, subjects, cultures, relations, i) for i in range(size)]
    rng.shuffle(train)
    return train, cases
