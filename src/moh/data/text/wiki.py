"""MediaWiki XML dumps -> articles -> plain text (a reasonable strip of wiki markup, not a parser).

``iter_articles(stream)`` yields ``(page id, title, wikitext)`` for main-namespace pages that are not
redirects. ``wiki_to_text(wikitext)`` removes what is not prose: comments, ``<ref>`` notes,
templates ``{{...}}`` and tables ``{|...|}`` (innermost first, so nested ones go too), file /
category / interlanguage links, the trailing reference sections (References, External links, See
also, ...), bold / italic quotes and list markers; it keeps link labels (``[[a|b]]`` -> ``b``),
external link labels and section titles (as their own lines).
"""
from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from typing import IO, Iterator

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_DROP_BLOCK = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|chem|hiero|imagemap|graph)\b[^>]*>.*?</\1>",
                         re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*?/?>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_BOLD_ITALIC = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST = re.compile(r"^[*#:;]+\s*", re.M)
_BLANKS = re.compile(r"\n{3,}")
_SPACES = re.compile(r"[ \t]{2,}")
# link namespaces whose targets are not prose; interlanguage links look like "fr:Titre"
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|wikipedia|wp|wikt|wiktionary|template|help|portal"
                        r"|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
_END_SECTIONS = ("references", "external links", "see also", "further reading", "notes", "bibliography",
                 "sources", "footnotes", "citations", "notes and references")


def iter_articles(stream: IO[bytes]) -> Iterator[tuple[int, str, str]]:
    """(page id, title, wikitext) of every main-namespace, non-redirect page of an XML dump."""
    for _, el in ET.iterparse(stream, events=("end",)):
        if _local(el.tag) != "page":
            continue
        fields = {_local(c.tag): c for c in el}
        text_el = next((c for c in el.iter() if _local(c.tag) == "text"), None)
        text = (text_el.text or "") if text_el is not None else ""
        ns = fields["ns"].text if "ns" in fields else "0"
        if ns == "0" and "redirect" not in fields and not text.lstrip().upper().startswith("#REDIRECT"):
            yield int(fields["id"].text), fields["title"].text or "", text
        el.clear()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _until_stable(pattern: re.Pattern, repl, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link(m: re.Match) -> str:
    inner = m.group(1)
    if _DROP_LINK.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1]


def _cut_end_sections(text: str) -> str:
    for m in _HEADING.finditer(text):
        if m.group(2).strip().lower() in _END_SECTIONS:
            return text[: m.start()]
    return text


def wiki_to_text(wikitext: str) -> str:
    """Plain text of one article's wikitext (see the module doc for what is kept)."""
    t = _COMMENT.sub("", wikitext)
    t = _REF.sub("", t)
    t = _DROP_BLOCK.sub("", t)
    t = _until_stable(_TEMPLATE, "", t)
    t = _until_stable(_TABLE, "", t)
    t = _cut_end_sections(t)
    t = _until_stable(_LINK, _link, t)
    t = _EXT_LINK.sub(lambda m: m.group(1) or "", t)
    t = _TAG.sub("", t)
    t = _BOLD_ITALIC.sub("", t)
    t = _HEADING.sub(lambda m: m.group(2), t)
    t = _MAGIC.sub("", t)
    t = _LIST.sub("", t)
    t = html.unescape(t).replace("\xa0", " ")
    lines = [_SPACES.sub(" ", line).strip() for line in t.split("\n")]
    lines = [line for line in lines if not line.startswith(("|", "!", "{|", "|}"))]  # table debris
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()
