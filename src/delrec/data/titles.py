"""Title cleaning: "Godfather, The (1972)" -> "The Godfather (1972)"."""

from __future__ import annotations

import html
import re

# English articles and the common foreign ones MovieLens moves to the end of a title.
ARTICLES = (
    "The", "A", "An",
    "Il", "La", "Le", "Les", "L'", "Lo", "Gli", "I",
    "El", "Los", "Las", "Der", "Die", "Das", "Den", "Det", "De", "Het", "Un", "Une", "O", "Os",
)  # fmt: skip
_ARTICLE_GROUP = "|".join(re.escape(a) for a in ARTICLES)
_TRAILING_ARTICLE = re.compile(rf"^(?P<body>.+?), (?P<article>{_ARTICLE_GROUP})(?P<rest>(?: \(.*\))?)$")
# The same inside an alternative title: "Big Blue, The (Grand bleu, Le) (1988)".
_PAREN_ARTICLE = re.compile(rf"\((?P<body>[^()]+?), (?P<article>{_ARTICLE_GROUP})\)")
_SPACES = re.compile(r"\s+")


def _front(article: str, body: str) -> str:
    joiner = "" if article.endswith("'") else " "  # "L'Apartment", not "L' Apartment"
    return f"{article}{joiner}{body}"


def clean_title(title: str) -> str:
    """Unescape HTML entities, normalise white space and move a trailing article to the front.

    The article is moved only when it stands right before an optional trailing parenthesised part
    (the year, an alternative title), as in MovieLens: "City of Lost Children, The (1995)", and
    likewise at the end of a parenthesised alternative title: "(Grand bleu, Le)" -> "(Le Grand bleu)".
    """
    if "&" in title:  # Amazon titles carry HTML entities ("Crabtree &amp; Evelyn")
        title = html.unescape(title)
    title = _SPACES.sub(" ", title).strip()
    match = _TRAILING_ARTICLE.match(title)
    if match:
        title = _front(match["article"], match["body"]) + match["rest"]
    return _PAREN_ARTICLE.sub(lambda m: f"({_front(m['article'], m['body'])})", title)
