"""The concept set of booth-mini's emoji world, and the held-out Fluent subjects.

Each base concept is one emoji codepoint that all three base styles (Noto Color Emoji, OpenMoji, Twemoji)
draw. Its name is the Unicode character name lowercased (`unicodedata.name`), or, where the Unicode name is
archaic or long ("HOCHO", "SLICE OF PIZZA", "BEAR FACE"), the CLDR English short name, listed in the table
below. Categories are booth's own coarse grouping.

The held-out subjects come from Fluent Emoji 3D and are never part of base training: they are the novel
subjects that personalization learns from 4-5 images. Their codepoints are deliberately absent from the base
set, and each has a class noun (DreamBooth's classes: dog, cat, toy, backpack, sneaker, cup, ...).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

CATEGORIES = (
    "animal",
    "food",
    "drink",
    "plant",
    "vehicle",
    "object",
    "clothing",
    "sport",
    "music",
    "building",
    "sky",
)


@dataclass(frozen=True)
class Concept:
    """One emoji concept: its codepoints, caption name and category."""

    codepoints: tuple[int, ...]
    name: str
    category: str

    @property
    def key(self) -> str:
        """Lower-case hex codepoints joined by '-', e.g. "1f34e" (the file-name form of the sources)."""
        return "-".join(f"{cp:x}" for cp in self.codepoints)

    @property
    def text(self) -> str:
        """The emoji as a string."""
        return "".join(chr(cp) for cp in self.codepoints)


@dataclass(frozen=True)
class Subject(Concept):
    """A held-out novel subject (Fluent Emoji) with the class noun personalization pairs it with."""

    class_noun: str = ""

    @property
    def slug(self) -> str:
        """A folder name: the name with spaces as dashes, e.g. "teddy-bear"."""
        return self.name.replace(" ", "-")


# (hex codepoint, category, CLDR short name when it replaces the Unicode name)
_BASE_TABLE: tuple[tuple[str, str, str | None], ...] = (
    # animals
    ("1f415", "animal", None),  # dog
    ("1f408", "animal", None),  # cat
    ("1f404", "animal", None),  # cow
    ("1f405", "animal", None),  # tiger
    ("1f407", "animal", None),  # rabbit
    ("1f409", "animal", None),  # dragon
    ("1f40b", "animal", None),  # whale
    ("1f40c", "animal", None),  # snail
    ("1f40d", "animal", None),  # snake
    ("1f40e", "animal", None),  # horse
    ("1f411", "animal", None),  # sheep
    ("1f412", "animal", None),  # monkey
    ("1f416", "animal", None),  # pig
    ("1f418", "animal", None),  # elephant
    ("1f419", "animal", None),  # octopus
    ("1f41a", "animal", None),  # spiral shell
    ("1f41d", "animal", None),  # honeybee
    ("1f41e", "animal", None),  # lady beetle
    ("1f41f", "animal", None),  # fish
    ("1f422", "animal", None),  # turtle
    ("1f426", "animal", None),  # bird
    ("1f427", "animal", None),  # penguin
    ("1f42c", "animal", None),  # dolphin
    ("1f438", "animal", "frog"),
    ("1f43b", "animal", "bear"),
    ("1f43c", "animal", "panda"),
    ("1f980", "animal", None),  # crab
    ("1f981", "animal", "lion"),
    ("1f986", "animal", None),  # duck
    ("1f988", "animal", None),  # shark
    ("1f989", "animal", None),  # owl
    ("1f98a", "animal", "fox"),
    ("1f98b", "animal", None),  # butterfly
    ("1f98c", "animal", None),  # deer
    ("1f992", "animal", "giraffe"),
    ("1f993", "animal", "zebra"),
    ("1f996", "animal", None),  # t-rex
    ("1f99c", "animal", None),  # parrot
    ("1f9a9", "animal", None),  # flamingo
    ("1f984", "animal", "unicorn"),
    # food
    ("1f34e", "food", None),  # red apple
    ("1f350", "food", None),  # pear
    ("1f352", "food", None),  # cherries
    ("1f353", "food", None),  # strawberry
    ("1f347", "food", None),  # grapes
    ("1f349", "food", None),  # watermelon
    ("1f34b", "food", None),  # lemon
    ("1f34c", "food", None),  # banana
    ("1f34d", "food", None),  # pineapple
    ("1f345", "food", None),  # tomato
    ("1f346", "food", "eggplant"),
    ("1f344", "food", None),  # mushroom
    ("1f951", "food", None),  # avocado
    ("1f955", "food", None),  # carrot
    ("1f966", "food", None),  # broccoli
    ("1f354", "food", None),  # hamburger
    ("1f355", "food", "pizza"),
    ("1f35e", "food", None),  # bread
    ("1f35f", "food", None),  # french fries
    ("1f32d", "food", None),  # hot dog
    ("1f369", "food", None),  # doughnut
    ("1f36a", "food", None),  # cookie
    ("1f36b", "food", None),  # chocolate bar
    ("1f382", "food", None),  # birthday cake
    ("1f9c1", "food", None),  # cupcake
    ("1f366", "food", None),  # soft ice cream
    ("1f363", "food", None),  # sushi
    ("1f35d", "food", None),  # spaghetti
    ("1f950", "food", None),  # croissant
    ("1f95a", "food", None),  # egg
    ("1f9c0", "food", None),  # cheese wedge
    ("1f37f", "food", None),  # popcorn
    # drinks
    ("1f37a", "drink", None),  # beer mug
    ("1f377", "drink", None),  # wine glass
    ("1f378", "drink", None),  # cocktail glass
    ("1f379", "drink", None),  # tropical drink
    ("1f9cb", "drink", None),  # bubble tea
    ("1f95b", "drink", None),  # glass of milk
    # plants
    ("1f332", "plant", None),  # evergreen tree
    ("1f334", "plant", None),  # palm tree
    ("1f335", "plant", None),  # cactus
    ("1f337", "plant", None),  # tulip
    ("1f339", "plant", None),  # rose
    ("1f33b", "plant", None),  # sunflower
    ("1f338", "plant", None),  # cherry blossom
    ("1f340", "plant", None),  # four leaf clover
    ("1f341", "plant", None),  # maple leaf
    ("1fab4", "plant", None),  # potted plant
    # vehicles
    ("1f680", "vehicle", None),  # rocket
    ("1f681", "vehicle", None),  # helicopter
    ("1f682", "vehicle", "locomotive"),
    ("1f68c", "vehicle", None),  # bus
    ("1f691", "vehicle", None),  # ambulance
    ("1f692", "vehicle", None),  # fire engine
    ("1f693", "vehicle", None),  # police car
    ("1f695", "vehicle", None),  # taxi
    ("1f697", "vehicle", None),  # automobile
    ("1f69a", "vehicle", None),  # delivery truck
    ("1f69c", "vehicle", None),  # tractor
    ("1f6b2", "vehicle", None),  # bicycle
    ("1f3cd", "vehicle", "motorcycle"),
    ("1f3ce", "vehicle", None),  # racing car
    ("1f6a2", "vehicle", None),  # ship
    ("26f5", "vehicle", None),  # sailboat
    ("1f6f6", "vehicle", None),  # canoe
    ("2708", "vehicle", None),  # airplane
    ("1f6f8", "vehicle", None),  # flying saucer
    ("1f6f9", "vehicle", None),  # skateboard
    # objects
    ("1f4a1", "object", "light bulb"),
    ("1f4a3", "object", None),  # bomb
    ("1f511", "object", None),  # key
    ("1f514", "object", None),  # bell
    ("1f527", "object", None),  # wrench
    ("1f528", "object", None),  # hammer
    ("1f52d", "object", None),  # telescope
    ("1f56f", "object", None),  # candle
    ("1f4f1", "object", None),  # mobile phone
    ("1f4f7", "object", None),  # camera
    ("1f4fa", "object", None),  # television
    ("1f4bb", "object", "laptop"),
    ("2709", "object", None),  # envelope
    ("270f", "object", None),  # pencil
    ("2702", "object", "scissors"),
    ("1f4ce", "object", None),  # paperclip
    ("1f4da", "object", None),  # books
    ("1f48e", "object", None),  # gem stone
    ("1f451", "object", None),  # crown
    ("1f381", "object", "wrapped gift"),
    ("1f388", "object", None),  # balloon
    ("1f383", "object", None),  # jack-o-lantern
    ("1f384", "object", None),  # christmas tree
    ("1f3b2", "object", None),  # game die
    ("1f9e9", "object", "puzzle piece"),
    ("1fa81", "object", None),  # kite
    ("1f9f2", "object", None),  # magnet
    ("1fa91", "object", None),  # chair
    ("1fa93", "object", None),  # axe
    ("1fa9c", "object", None),  # ladder
    ("1f6cf", "object", None),  # bed
    ("2693", "object", None),  # anchor
    ("1f6e1", "object", None),  # shield
    ("1f3c6", "object", None),  # trophy
    ("2602", "object", None),  # umbrella
    ("23f0", "object", None),  # alarm clock
    # clothing
    ("1f455", "clothing", None),  # t-shirt
    ("1f456", "clothing", None),  # jeans
    ("1f457", "clothing", None),  # dress
    ("1f45c", "clothing", None),  # handbag
    ("1f460", "clothing", None),  # high-heeled shoe
    ("1f3a9", "clothing", None),  # top hat
    ("1f393", "clothing", None),  # graduation cap
    ("1f9e3", "clothing", None),  # scarf
    ("1f9e4", "clothing", None),  # gloves
    ("1f454", "clothing", None),  # necktie
    ("1f97e", "clothing", None),  # hiking boot
    ("1f453", "clothing", "glasses"),
    # sport
    ("26bd", "sport", None),  # soccer ball
    ("1f3c0", "sport", "basketball"),
    ("1f3c8", "sport", None),  # american football
    ("1f3be", "sport", "tennis"),
    ("26be", "sport", None),  # baseball
    ("1f3d0", "sport", None),  # volleyball
    ("1f3b3", "sport", None),  # bowling
    ("1f94a", "sport", None),  # boxing glove
    ("1f94c", "sport", None),  # curling stone
    ("26f8", "sport", None),  # ice skate
    ("1f3a3", "sport", "fishing pole"),
    ("1f3b1", "sport", "pool 8 ball"),
    # music
    ("1f3b8", "music", None),  # guitar
    ("1f3ba", "music", None),  # trumpet
    ("1f3bb", "music", None),  # violin
    ("1f3b7", "music", None),  # saxophone
    ("1f941", "music", "drum"),
    ("1fa95", "music", None),  # banjo
    ("1fa97", "music", None),  # accordion
    ("1f3a4", "music", None),  # microphone
    ("1f3a7", "music", None),  # headphone
    ("1f3b5", "music", None),  # musical note
    # buildings and places
    ("1f3e0", "building", "house"),
    ("1f3f0", "building", "castle"),
    ("1f3ed", "building", None),  # factory
    ("26ea", "building", None),  # church
    ("26fa", "building", None),  # tent
    ("1f3aa", "building", None),  # circus tent
    ("1f3a1", "building", None),  # ferris wheel
    ("1f5fd", "building", None),  # statue of liberty
    ("1f3dd", "building", None),  # desert island
    ("1f30b", "building", None),  # volcano
    # sky and weather
    ("2600", "sky", "sun"),
    ("2601", "sky", None),  # cloud
    ("2603", "sky", None),  # snowman
    ("2744", "sky", None),  # snowflake
    ("1f525", "sky", None),  # fire
    ("1f308", "sky", None),  # rainbow
    ("1f319", "sky", None),  # crescent moon
    ("2b50", "sky", "star"),
    ("1f30a", "sky", None),  # water wave
    ("1fa90", "sky", None),  # ringed planet
    ("2604", "sky", None),  # comet
    ("1f30d", "sky", "globe"),
)

# Held-out novel subjects: (hex codepoint sequence, name, class noun). Fluent Emoji 3D renders them.
_HELD_OUT_TABLE: tuple[tuple[str, str, str], ...] = (
    ("1f429", "poodle", "dog"),
    ("1f408-200d-2b1b", "black cat", "cat"),
    ("1f9f8", "teddy bear", "toy"),
    ("1f392", "backpack", "backpack"),
    ("1f45f", "running shoe", "sneaker"),
    ("2615", "hot beverage", "cup"),
    ("1fad6", "teapot", "teapot"),
    ("1f3fa", "amphora", "vase"),
    ("1f96b", "canned food", "can"),
    ("1f963", "bowl with spoon", "bowl"),
)


def _codepoints(key: str) -> tuple[int, ...]:
    return tuple(int(part, 16) for part in key.split("-"))


def unicode_name(codepoints: tuple[int, ...]) -> str:
    """The Unicode character name of a single-codepoint emoji, lowercased ("RED APPLE" -> "red apple")."""
    return unicodedata.name(chr(codepoints[0])).lower()


def _base_concept(key: str, category: str, cldr: str | None) -> Concept:
    cps = _codepoints(key)
    return Concept(codepoints=cps, name=cldr or unicode_name(cps), category=category)


BASE_CONCEPTS: tuple[Concept, ...] = tuple(_base_concept(*row) for row in _BASE_TABLE)
HELD_OUT_SUBJECTS: tuple[Subject, ...] = tuple(
    Subject(codepoints=_codepoints(key), name=name, category="held-out", class_noun=noun)
    for key, name, noun in _HELD_OUT_TABLE
)
# The default example subjects written under examples/ (a dog, a toy, a backpack, a teapot, a cat).
EXAMPLE_SUBJECTS: tuple[str, ...] = ("poodle", "teddy bear", "backpack", "teapot", "black cat")


def base_concepts(categories: tuple[str, ...] | None = None) -> tuple[Concept, ...]:
    """The base training concepts, optionally only those of the given categories, in table order."""
    if categories is None:
        return BASE_CONCEPTS
    return tuple(c for c in BASE_CONCEPTS if c.category in categories)


def concept_by_name(name: str) -> Concept:
    """Look a base concept or held-out subject up by its name; `KeyError` if there is none."""
    for concept in (*BASE_CONCEPTS, *HELD_OUT_SUBJECTS):
        if concept.name == name:
            return concept
    raise KeyError(name)


def subject_by_name(name: str) -> Subject:
    """Look a held-out subject up by its name; `KeyError` if there is none."""
    for subject in HELD_OUT_SUBJECTS:
        if subject.name == name:
            return subject
    raise KeyError(name)
