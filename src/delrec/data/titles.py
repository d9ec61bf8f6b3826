"""Title cleaning: "Godfather, The (1972)" -> "The Godfather (1972)"."""

from __future__ import annotations

import re

# English articles and the common foreign ones MovieLens moves to the end of a title.
ARTICLES = (
    "The", "A", "An",
    "Il", "La", "Le", "Les", "L'", "Lo", "Gli", "I",
    "El", "Los", "Las", "Der", "Die", "Das", "Den", "Det", "De", "Het", "Un", "Une", "O", "Os",
)  # fmt: skip
_TRAILING_ARTICLE = re.compile(
    r"^(?P<body>.+?), (?P<article>" + "|".join(re.escape(a) for a in ARTICLES) + r")(?P<rest>(?: \(.*\))?)$"
)
_SPACES = re.compile(r"\s+")


def clean_title(title: str) -> str:
    """Normalise white space and move a trailing article to the front.

    The article is moved only when it stands right before an optional trailing parenthesised part
    (the year, an alternative title), as in MovieLens: "City of Lost Children, The (1995)".
    """
    title = _SPACES.sub(" ", title).strip()
    match = _TRAILING_ARTICLE.match(title)
    if match:
        article = match["article"]
        joiner = "" if article.endswith("'") else " "
        title = f"{article}{joiner}{match['body']}{match['rest']}"
    return title
