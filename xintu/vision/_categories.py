"""The ImageNet-1k → album category table: data, in one place.

Each :class:`ClassGroup` names a set of ImageNet class indices (0..999, the order of
:func:`xintu.model.imagenet_labels`) and what their probability mass is evidence
for. The softmax mass of a group, times its ``weight``, is that group's vote. Some
groups vote for a category directly (pets, foods, travel scenery); others are
*evidence* that the rules in :mod:`._classifier` combine with the detectors:

- ``Evidence.PERSON``: classes whose photos almost always show a person (clothing
  worn, ``groom``, ``scuba diver``); ImageNet has no "person" class;
- ``Evidence.SCREEN``: ``website`` (ImageNet's web-site class *is* screenshots) and
  screens photographed from outside (weaker);
- ``Evidence.DOCUMENT``: printed-paper classes that an identity document is most
  often mistaken for (envelope, menu, dust jacket, ...): weak hints only.

Everything not listed votes for nothing and ends up as ``other``. Wild animals are
deliberately *not* pets: a lion at the zoo is ``other``. Indices are checked against
the label names by ``tests/test_classifier.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .._types import Category

__all__ = ["GROUPS", "ClassGroup", "Evidence"]


class Evidence(StrEnum):
    """What a group's mass is evidence for, when it is not a category."""

    PERSON = "person"
    SCREEN = "screen"
    DOCUMENT = "document"


@dataclass(frozen=True, slots=True)
class ClassGroup:
    """ImageNet classes whose probability mass votes for one category or evidence."""

    name: str
    votes: Category | Evidence
    classes: frozenset[int]
    weight: float = 1.0


def _r(first: int, last: int) -> frozenset[int]:
    """Indices first..last inclusive."""
    return frozenset(range(first, last + 1))


def _s(*indices: int) -> frozenset[int]:
    return frozenset(indices)


GROUPS: tuple[ClassGroup, ...] = (
    # --- pets ----------------------------------------------------------------------
    ClassGroup("dogs", Category.PETS, _r(151, 268)),  # Chihuahua .. Mexican hairless
    ClassGroup("cats", Category.PETS, _r(281, 285)),  # tabby .. Egyptian Mau
    ClassGroup(
        "small_pets",
        Category.PETS,
        _s(
            1,  # goldfish
            87,  # African grey parrot
            88,  # macaw
            89,  # sulphur-crested cockatoo
            90,  # lorikeet
            330,  # cottontail rabbit
            331,  # hare (pet rabbits are often called hares)
            332,  # Angora rabbit
            333,  # hamster
            338,  # guinea pig
            339,  # sorrel (horse)
            35,  # mud turtle
            37,  # box turtle
            38,  # banded gecko
            39,  # green iguana
        ),
    ),
    # Dogs and cats that ImageNet mistakes for their wild cousins (huskies as
    # wolves, a tabby as a lynx): half a vote.
    ClassGroup(
        "pet_lookalikes",
        Category.PETS,
        _s(269, 270, 271, 272, 273, 286, 287),  # wolves, coyote, dingo, cougar, lynx
        weight=0.5,
    ),
    # --- foods ---------------------------------------------------------------------
    ClassGroup(
        "dishes",
        Category.FOODS,
        _r(923, 957) | _r(959, 969) | _s(987),  # plate .. pomegranate, carbonara ..
        # eggnog (without hay, 958), corn
    ),
    # Places, vessels and drinks that are usually photographed with food in them.
    ClassGroup(
        "food_context",
        Category.FOODS,
        _s(
            415,  # bakery
            440,  # beer bottle
            441,  # beer glass
            467,  # butcher shop
            469,  # cauldron
            504,  # coffee mug
            509,  # candy store
            521,  # Crock Pot
            544,  # Dutch oven
            567,  # frying pan
            572,  # goblet
            659,  # mixing bowl
            762,  # restaurant
            809,  # soup bowl
            868,  # tray
            907,  # wine bottle
            909,  # wok
        ),
        weight=0.6,
    ),
    # --- travel scenery ------------------------------------------------------------
    ClassGroup(
        "landscapes",
        Category.TRAVEL_SCENERY,
        _s(970, 972, 973, 974, 975, 976, 977, 978, 979, 980, 984),
        # mountain, cliff, coral reef, geyser, lakeshore, promontory, sandbar, beach,
        # valley, volcano, rapeseed field
    ),
    ClassGroup(
        "landmarks",
        Category.TRAVEL_SCENERY,
        _s(
            406,  # altar
            425,  # barn
            437,  # lighthouse
            442,  # bell tower
            449,  # boathouse
            460,  # breakwater
            483,  # castle
            497,  # church
            500,  # cliff dwelling
            525,  # dam
            536,  # dock
            538,  # dome
            562,  # fountain
            576,  # gondola
            580,  # greenhouse
            649,  # megalith
            663,  # monastery
            668,  # mosque
            682,  # obelisk
            698,  # palace
            718,  # pier
            727,  # planetarium
            821,  # through arch bridge
            825,  # stone wall
            832,  # stupa
            839,  # suspension bridge
            853,  # thatched roof
            858,  # tile roof
            863,  # totem pole
            873,  # triumphal arch
            884,  # vaulted or arched ceiling
            888,  # viaduct
            900,  # water tower
            913,  # shipwreck
            915,  # yurt
        ),
    ),
    # Boats and sights that travel photos often show, but not only travel photos.
    ClassGroup(
        "travel_context",
        Category.TRAVEL_SCENERY,
        _s(
            484,  # catamaran
            510,  # container ship
            628,  # ocean liner
            724,  # pirate ship
            780,  # schooner
            814,  # motorboat
            871,  # trimaran
            914,  # yawl
            912,  # split-rail fence
            716,  # picket fence
            755,  # radio telescope
            743,  # prison
            476,  # carousel
        ),
        weight=0.5,
    ),
    # --- evidence: a person is in the picture --------------------------------------
    ClassGroup(
        "person_classes",
        Evidence.PERSON,
        _s(
            981,  # baseball player
            982,  # bridegroom
            983,  # scuba diver
            399,  # abaya
            400,  # academic gown
            411,  # apron
            433,  # swimming cap
            439,  # bearskin hat
            445,  # bikini
            451,  # bolo tie
            452,  # poke bonnet
            457,  # bow tie
            459,  # bra
            474,  # cardigan
            501,  # cloak
            515,  # cowboy hat
            518,  # crash helmet
            552,  # feather boa
            560,  # football helmet
            568,  # fur coat
            578,  # gown
            601,  # hoop skirt
            608,  # jeans
            610,  # T-shirt
            614,  # kimono
            617,  # lab coat
            629,  # lipstick
            638,  # leotard / jersey
            639,  # one-piece bathing suit
            643,  # mask
            652,  # military uniform
            655,  # miniskirt
            667,  # graduation cap
            679,  # necklace
            689,  # overskirt
            697,  # pajamas
            735,  # poncho
            775,  # sarong
            796,  # balaclava
            808,  # sombrero
            824,  # stole
            834,  # suit
            836,  # sunglasses
            837,  # sunglasses
            841,  # sweatshirt
            842,  # swim trunks
            869,  # trench coat
            887,  # vestment
            903,  # wig
            906,  # Windsor tie
        ),
    ),
    # --- evidence: a screen ---------------------------------------------------------
    ClassGroup("website", Evidence.SCREEN, _s(916)),  # web pages: screenshots
    ClassGroup(
        "screens",
        Evidence.SCREEN,
        _s(
            487,  # mobile phone
            527,  # desktop computer
            590,  # hand-held computer
            620,  # laptop computer
            664,  # monitor
            681,  # notebook computer
            782,  # CRT monitor / screen
            851,  # television
            917,  # comic book
            918,  # crossword
        ),
        weight=0.5,
    ),
    # --- evidence: printed paper an ID card is mistaken for -------------------------
    ClassGroup(
        "documents",
        Evidence.DOCUMENT,
        _s(
            446,  # ring binder
            458,  # brass memorial plaque
            549,  # envelope
            692,  # packet
            893,  # wallet
            921,  # dust jacket
            922,  # menu
            919,  # street sign
        ),
    ),
)
