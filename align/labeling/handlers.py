"""What the labelling app does, as pure functions of (store, session, inputs): tested without a browser.

The app (align/labeling/app.py) is layout only and calls these. A session is the dict `sign_in`
returns (the app gets it from the request's signed cookie, align/labeling/auth.py); a task view is
what `next_task` returns: the prompt and the responses in the order this annotator sees them
(shuffled per annotator, blind: no model names), plus `order`, the canonical index of each
shown response. `submit`, `save_draft` and `skip` name their task by id (a page names it by an opaque
handle, `task_handle`, which `task_of` reads back among the annotator's own tasks: an id would tell gold
tasks apart): the server rebuilds the view from the store, so neither a replayed request nor a stale page
can rank another task; a page sends back the view's `order_tag` too, so ranks given in an order the
server no longer shows are refused, never saved against the wrong responses (`check_order`).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import random
import re
import unicodedata
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from align.labeling.store import ASSIGNMENT_TTL, FLAGS, Store, _check_ranks, unsafe_flag, unsafe_replies

MAX_RATIONALE = 5000  # characters: a reason, not a document (it is saved at each keystroke, exported with the pair)
# At most this many characters of a prompt or response go to the page: a 1 MB response must not
# freeze the annotator's browser. The stored text is never cut.
SHOWN_CHARS = 20_000


class AuthError(Exception):
    """Shown to the user as it is."""


class StaleOrder(Exception):
    """A page's ranks were given in an order the server no longer shows (`check_order`); shown to the user as it
    is, on submit and on a draft alike: nothing was saved."""


LETTERS = "ABCDEFGH"  # the responses' letters on the page, in shown order (app.py lays them out)


class NotOpen(PermissionError):
    """A submit of a task this annotator was given that is no longer open for them (skipped, or handed to someone
    else): the page moves on to their next task with the message, rather than staying on one it cannot rank."""


STALE_ORDER = "this task's order changed since the page was drawn (the app was updated): reload; nothing was saved"


def sign_in(store: Store, name: str, password: str) -> dict[str, Any]:
    session = store.authenticate(name or "", password or "")
    if session is None:
        raise AuthError("unknown user or wrong password")
    return session


def _require(session: dict[str, Any] | None) -> dict[str, Any]:
    if not session or "annotator_id" not in session:
        raise AuthError("sign in first")
    return session


def check_page_account(session: dict[str, Any], opened_by: str | None) -> None:
    """AuthError when the page a call comes from was drawn for another account than the session's: the cookie
    is the browser's, so signing in as someone else in one tab changes whose calls every tab makes (the
    server's other check of that, a page session's owner, is in memory and gone after a restart). A page drawn
    for nobody (loaded signed out) claims no account."""
    name = _require(session)["name"]
    if opened_by and opened_by != name:
        raise AuthError(f"this page was opened by {opened_by}; you are signed in as {name}: reload to rank as {name}")


def shown_order(task_id: int, annotator_id: int, k: int, seed: int = 0, *, key: bytes) -> list[int]:
    """The same shuffle for an annotator every time they see a task; another for each annotator. Keyed with the
    store's secret (`key`, Store.secret): seeded with the task, annotator and seed alone, anyone could work out
    the order from values that are no secret (task ids go 1, 2, ...), and an A/B task's first response is
    the policy's, its second the baseline's: the shuffle said which side was which."""
    order = list(range(k))
    random.Random(hmac.new(key, f"shown-order:{seed}:{task_id}:{annotator_id}".encode(), hashlib.sha256).digest()
                  ).shuffle(order)
    return order


def order_tag(task_id: int, annotator_id: int, order: list[int], *, key: bytes) -> str:
    """A short fingerprint of the order a page shows a task in, which the page sends back with its ranks
    (`check_order`). Keyed with the store's secret and bound to the task and annotator: it tells nothing of the
    order (an A/B task has only two, and a plain hash of them, or the same tag on every task shown in one of
    them, would say which side is which)."""
    text = f"order-tag:{task_id}:{annotator_id}:{','.join(map(str, order))}"
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:8]


def task_handle(task_id: int, annotator_id: int, *, key: bytes) -> str:
    """What an annotator's page calls a task by (its hidden field; `task_of` reads it back): the task's id would say
    which tasks are gold (ordinary ones come in id order, gold ones from a fixed set, out of sequence). Keyed with
    the store's secret and bound to the annotator: it tells nothing of the id, and is no use on another's page."""
    return hmac.new(key, f"task-handle:{task_id}:{annotator_id}".encode(), hashlib.sha256).hexdigest()[:16]


def task_of(store: Store, session: dict[str, Any], handle: Any) -> int:
    """The id of the task a page calls `handle` (`task_handle`): one of the tasks this annotator was given,
    whatever became of it (a repeated submit is "already saved", a skipped task says so); PermissionError for any
    other handle, ValueError for none (a page with no task)."""
    session = _require(session)
    if not handle or not isinstance(handle, str):
        raise ValueError("there is no task to submit")
    if not re.fullmatch(r"[0-9a-f]{16}", handle):  # before the scan: a 1 MB one cost a second per annotator's task
        raise PermissionError("this task is not assigned to you")
    key, annotator = store.secret(), session["annotator_id"]
    # the open tasks first (a submit, a draft, a skip: one or two rows), the whole history only for a replay
    for open_only in (True, False):
        for task_id in store.assigned_tasks(annotator, open_only=open_only):
            if hmac.compare_digest(handle, task_handle(task_id, annotator, key=key)):
                return task_id
    raise PermissionError("this task is not assigned to you")


def check_order(view: dict[str, Any], tag: str | None) -> None:
    """StaleOrder unless `tag` is the order tag of `view`, the order the server shows the task in now. The server
    maps a page's ranks back to canonical order through its own order; when that changed since the page was drawn
    (an update that changed how orders are drawn, a new store secret), the page's ranks would be saved against
    the wrong responses, silently. A page with no tag (drawn by a version before tags) is such a page. `tag`
    None: the caller holds a view it just took from next_task (align label simulate, tests), nothing to check."""
    if tag is not None and not hmac.compare_digest(str(tag), view["order_tag"]):
        raise StaleOrder(STALE_ORDER)


# Characters a page draws as nothing, or that change how the text around them reads: the ASCII controls Chromium draws
# as nothing (NUL, which the HTML parser drops, and FORM FEED: 0 px; the other C0 controls and DEL are drawn as boxes,
# tab and line breaks as what they are), the line and paragraph separators U+2028-2029 (0 px, no line break either);
# format characters (Unicode category Cf: the bidi controls U+202A-202E, U+2066-2069, U+200E/F and U+061C; zero-width
# U+200B, U+2060 and U+FEFF; the invisible operators U+2061-2064, the annotation characters U+FFF9-FFFB; the tag
# characters U+E0001-E007F, which spell hidden ASCII) and the other default-ignorable ones (Hangul fillers, U+2065,
# U+FFF0-FFF8, the whole U+E0000 block: tags, ideographic variation selectors, reserved), the combining marks among
# them too: the variation selectors U+FE00-FE0F, the combining grapheme joiner U+034F, the Mongolian free variation
# selectors U+180B-180D and U+180F, the Khmer inherent vowels U+17B4-17B5 (two replies that look the same can differ
# by them, and a run of them carries hidden data). "Yes, we \u202esyad 41 nihtiw dnufer ton od\u202c." reads "Yes, we
# do not refund within 14 days." while it stores the opposite. Ordinary text is left alone (_ordinary): the soft
# hyphen; ZWNJ and ZWJ between a letter and a letter or mark of one script that is written with joiners
# (_JOINING_SCRIPTS: Arabic, which Persian and Urdu use, Syriac, N'Ko, Mandaic, Mongolian, Adlam, the Indic scripts
# Devanagari to Malayalam, Sinhala, Myanmar and Khmer: Persian and Urdu words, Indic conjuncts), never between two marks nor beside a
# letter of another script ("We re\u200cfund wi\u200dthin" looks like the plain text, a reply could differ from
# another by them unseen and they could carry hidden data: there they change nothing drawn); ZWJ between two emoji
# (👩‍💻); one emoji or text presentation selector (U+FE0F, U+FE0E) right after a symbol or a keycap's digit, # or *
# (❤️, 1️⃣); one free variation selector right after a Mongolian letter; the tags of the three subdivision flags emoji
# has (U+1F3F4, "gbeng", "gbsct" or "gbwls" in tags, U+E007F: 🏴 England, Scotland, Wales). Any other run of tags,
# behind a black flag and a cancel tag or not, is drawn as nothing and may spell a hidden instruction.
_INVISIBLE = {0x00, 0x0C, 0x2028, 0x2029, 0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F,
              0x2065, 0x3164, 0xFFA0, 0xFFFC, *range(0xFE00, 0xFE10), *range(0xFFF0, 0xFFF9), *range(0xE0000, 0xE1000)}
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
# What _visible looks at: all but the ASCII a page draws as it is (the controls it draws as nothing: NUL, FORM FEED)
_SCANNED = re.compile(r"[^\x01-\x0b\x0d-\x7f]+")
_SOFT_HYPHEN, _ZWNJ, _ZWJ, _VS15, _VS16 = "\u00ad", "\u200c", "\u200d", "\ufe0e", "\ufe0f"
# Emoji that take a presentation selector and are not symbols (So): a keycap's base, ‼ ⁉ ℹ ↔ ◻ ◼ ◽ ◾ ⤴ ⤵ 〰 〽
_EMOJI_NOT_SO = set("#*0123456789\u203c\u2049\u2139\u2194\u25fb\u25fc\u25fd\u25fe\u2934\u2935\u3030\u303d")
_MONGOLIAN_FVS = "\u180b\u180c\u180d\u180f"
# Scripts whose text is written with ZWNJ and ZWJ (cursive joining, Unicode's ArabicShaping.txt, and the Brahmic
# conjuncts of Indic and Sinhala), by code point blocks: (first, last, script). A joiner is ordinary between a
# letter and a letter or mark of one of them (_ordinary).
_JOINING_SCRIPTS = (
    (0x0600, 0x06FF, "Arabic"), (0x0750, 0x077F, "Arabic"), (0x0870, 0x08FF, "Arabic"), (0xFB50, 0xFDFF, "Arabic"),
    (0xFE70, 0xFEFF, "Arabic"), (0x10EC0, 0x10EFF, "Arabic"), (0x0700, 0x074F, "Syriac"), (0x0860, 0x086F, "Syriac"),
    (0x07C0, 0x07FF, "N'Ko"), (0x0840, 0x085F, "Mandaic"), (0x1800, 0x18AF, "Mongolian"),
    (0x11660, 0x1167F, "Mongolian"), (0x1E900, 0x1E95F, "Adlam"),
    (0x0900, 0x097F, "Devanagari"), (0xA8E0, 0xA8FF, "Devanagari"), (0x1CD0, 0x1CFF, "Devanagari"),  # Vedic signs
    (0x11B00, 0x11B5F, "Devanagari"), (0x0980, 0x09FF, "Bengali"), (0x0A00, 0x0A7F, "Gurmukhi"),
    (0x0A80, 0x0AFF, "Gujarati"), (0x0B00, 0x0B7F, "Oriya"), (0x0B80, 0x0BFF, "Tamil"), (0x0C00, 0x0C7F, "Telugu"),
    (0x0C80, 0x0CFF, "Kannada"), (0x0D00, 0x0D7F, "Malayalam"), (0x0D80, 0x0DFF, "Sinhala"),
    (0x1000, 0x109F, "Myanmar"), (0xA9E0, 0xA9FF, "Myanmar"), (0xAA60, 0xAA7F, "Myanmar"),
    (0x1780, 0x17FF, "Khmer"), (0x19E0, 0x19FF, "Khmer"),
)
_EMOJI_TAGS = re.compile("\U0001F3F4(?:" + "|".join("".join(chr(0xE0000 + ord(c)) for c in flag)
                                                      for flag in ("gbeng", "gbsct", "gbwls")) + ")\U000E007F")


def _joining_script(char: str) -> str | None:
    """The script of `char` if it is one written with joiners (_JOINING_SCRIPTS), else None."""
    point = ord(char)
    return next((script for first, last, script in _JOINING_SCRIPTS if first <= point <= last), None)


# Where a code point this Python's Unicode data does not know (unassigned, or newer than it) is right to left in a
# browser: Unicode's default bidi class of those blocks (DerivedBidiClass.txt, R and AL). Such a code point is drawn
# as a box, yet turns the numbers and signs beside it around as a Hebrew letter would: "30 - 14" between two U+05FF
# was drawn "14 - 30", and it had no marker (unicodedata gives it no direction). (first, last)
_RTL_BLOCKS = ((0x0590, 0x08FF), (0xFB1D, 0xFDCF), (0xFDF0, 0xFDFF), (0xFE70, 0xFEFF), (0x10800, 0x10FFF),
               (0x1E800, 0x1EFFF))


def _hidden(char: str) -> bool:
    kind, point = unicodedata.category(char), ord(char)
    return point in _INVISIBLE or kind == "Cf" or (
        kind == "Cn" and any(first <= point <= last for first, last in _RTL_BLOCKS))


def _ordinary(char: str, before: str, after: str) -> bool:
    """Whether hidden `char` between `before` and `after` ("" at an end) is part of ordinary text (_INVISIBLE)."""
    if char == _SOFT_HYPHEN:
        return True
    if char in (_VS15, _VS16):  # one, on the symbol it sets the look of
        return bool(before) and (unicodedata.category(before) == "So" or before in _EMOJI_NOT_SO)
    if char in _MONGOLIAN_FVS:
        return "\u1820" <= before <= "\u18aa"
    if char not in (_ZWNJ, _ZWJ) or not before or not after:
        return False
    kind, next_kind = unicodedata.category(before), unicodedata.category(after)
    # a joiner between two marks joins nothing: between marks it hid data and restarted the count of marks; nor
    # does one beside a letter of a script written without joiners (Latin, ASCII): there it changes nothing drawn
    if kind[0] in "LM" and next_kind[0] in "LM" and "L" in (kind[0], next_kind[0]):
        return _joining_script(before) is not None and _joining_script(before) == _joining_script(after)
    # An emoji ZWJ sequence: the emoji before may end in a skin tone (Sk) or the emoji presentation selector.
    return char == _ZWJ and (kind in ("So", "Sk") or before == _VS16) and next_kind == "So"


# Combining marks kept on one character: no script needs more (Vietnamese 2, pointed Hebrew 4), while a letter with
# hundreds of them is one unbreakable glyph that towers over, or runs across, the text beside it.
MAX_MARKS = 4


_ASCII_LETTERS = re.compile(r"[A-Za-z]")
# Where the page starts a new line: the HTML parser reads "\r\n" and "\r" as "\n"
_LINE_BREAK = re.compile(r"(\r\n?|\n)")


def _strong(char: str) -> str:
    """"L" or "R" for a character drawn in a direction of its own (bidi class L; R or AL), else "". A format
    character is shown as a marker (_hidden), so it has none: an RLM cannot turn a line around."""
    kind = unicodedata.bidirectional(char)
    if kind not in ("L", "R", "AL") or unicodedata.category(char) == "Cf":
        return ""
    return "L" if kind == "L" else "R"


def _direction(text: str, default: str = "ltr") -> str:
    """"rtl" when `text`, a line or a whole text, reads right to left: most of its letters are Hebrew or Arabic,
    or it starts with a Hebrew or Arabic letter and ends with one or with such a sign, with two such words at one
    end or that sign last (an Arabic sentence around English names: "هل جربت Settings > Sync > Sync now؟", not
    an English one around two foreign words: "שלום means peace, and in Arabic it is سلام"); "ltr" otherwise;
    `default` when it has no letters.
    A line does not take its direction from its first character (dir="auto" with unicode-bidi: plaintext did): a
    right-to-left character that looks like a hyphen, U+05BE, at the start of a line of English turned the line
    right to left and drew its words in reverse order, and "שלום means hello" put the English on the left."""
    count = {"L": len(_ASCII_LETTERS.findall(text)), "R": 0}
    for char in "".join(_NON_ASCII.findall(text)):
        if side := _strong(char):
            count[side] += 1
    if not count["L"] + count["R"]:
        return default
    if count["R"] > count["L"]:
        return "rtl"
    first = next((_strong(c) for c in text if unicodedata.category(c)[0] == "L" and _strong(c)), "")
    end = next((c for c in reversed(text) if _strong(c)), "")
    if not first == _strong(end) == "R":
        return "ltr"
    # Framed by Hebrew or Arabic: an Arabic sentence around English names opens or closes with two of its words
    # or ends with its own sign (؟); an English sentence around one foreign word at each end ("שלום means peace,
    # and in Arabic it is سلام") does not, and reads left to right
    words = [kind for word in text.split() if (kind := {_strong(c) for c in word} - {""})]
    lead = next((i for i, kind in enumerate(words) if kind != {"R"}), len(words))
    trail = next((i for i, kind in enumerate(reversed(words)) if kind != {"R"}), len(words))
    return "rtl" if max(lead, trail) >= 2 or unicodedata.category(end)[0] not in "LM" else "ltr"


def _rtl_letter(char: str) -> bool:
    return bool(char) and unicodedata.bidirectional(char) in ("R", "AL") and unicodedata.category(char)[0] in "LM"


def _turns(text: str, at: int) -> bool:
    """Whether `text[at]`, in left-to-right text, is a right-to-left character that is no letter (U+05BE ־ looks like
    a hyphen, U+05C3 ׃ like a colon) with no right-to-left letter beside it: it turns the numbers and signs beside it
    around. One that ends or starts a Hebrew or Arabic word is how that word is written (the Arabic question mark in
    "مساعدتك؟", the Urdu full stop, the geresh of "ג׳", the maqaf of "ב־14"), the letter beside it is seen, and a
    currency sign (﷼, ؋) is a glyph of its own: none of them is a marker. The letter before may carry marks (vowel
    points, harakat)."""
    kind = unicodedata.category(text[at])
    if unicodedata.bidirectional(text[at]) not in ("R", "AL") or kind[0] in "LM" or kind == "Sc":
        return False
    start = at
    while start and unicodedata.category(text[start - 1])[0] == "M":
        start -= 1
    return not (_rtl_letter(text[start - 1:start]) or _rtl_letter(text[at + 1:at + 2]))


_DIGITS = ("EN", "AN")
_NUMBER_JOINERS = ("ES", "CS")  # one of them between two digits is part of the number (1-14, 1:1, 1,000)


def _numbers_turned(line: str) -> bool:
    """Whether a left-to-right line holds two numbers a browser draws in the other order than stored: numbers the
    Unicode bidi algorithm gives to a right-to-left run (after a Hebrew or Arabic letter or sign with no Latin
    letter between, or written in Arabic-Indic digits) with only spaces, signs or right-to-left text between them.
    "from day ا1 - 14ا" is drawn "from day ا14 - 1ا": the alef looks like an l, the yod like an apostrophe, two
    letters or a letter and a sign do it as well, so no one character can be marked; the line above the reply says
    it instead. One number among Hebrew words ("Hebrew: ב־14 ימים") is drawn where a Hebrew reader expects it."""
    strong, turned, i = "L", 0, 0
    while i < len(line):
        kind = unicodedata.bidirectional(line[i])
        if kind == "L":
            strong, turned = "L", 0
        elif kind in ("R", "AL"):
            strong = "R"
        elif kind in _DIGITS:
            if kind == "AN" or strong == "R":
                turned += 1
                if turned == 2:
                    return True
            else:  # a number after a Latin letter reads left to right, as a Latin letter does
                turned = 0
            while i + 1 < len(line) and (unicodedata.bidirectional(line[i + 1]) in _DIGITS or (
                    unicodedata.bidirectional(line[i + 1]) in _NUMBER_JOINERS and i + 2 < len(line)
                    and unicodedata.bidirectional(line[i + 2]) in _DIGITS)):
                i += 1  # the rest of this number
        i += 1
    return False


def _visible(escaped: str, rtl: bool = False) -> tuple[str, int, int]:
    """(`escaped` with each hidden character as a marker ⟨U+202E⟩ and combining marks past MAX_MARKS on one
    character cut, with a marker saying how many; how many hidden characters; how many marks were cut).
    Unless the text reads right to left (`rtl`), a right-to-left sign with no right-to-left letter beside it
    (_turns) is a marker too."""
    hidden = cut = 0

    def mark(run: re.Match) -> str:
        nonlocal hidden, cut
        out, marks, dropped = [], 0, 0
        text, start = run.string, run.start()
        flags = {i for m in _EMOJI_TAGS.finditer(run.group()) for i in range(m.start() + 1, m.end())}
        for i, char in enumerate(run.group()):
            if unicodedata.category(char).startswith("M"):
                marks += 1
                if marks > MAX_MARKS:
                    dropped += 1
                    continue
            elif char not in (_ZWNJ, _ZWJ):  # a joiner is no new character: the marks after it count on
                marks = 0
            if dropped:
                out.append(f'<span class="align-hidden">⟨{dropped:,} combining marks cut⟩</span>')
                cut, dropped = cut + dropped, 0
            at = start + i
            before, after = text[at - 1:at], text[at + 1:at + 2]
            if (_hidden(char) and i not in flags and not _ordinary(char, before, after)) or (
                    not rtl and _turns(text, at)):
                hidden += 1
                out.append(f'<span class="align-hidden">⟨U+{ord(char):04X}⟩</span>')
            else:
                out.append(char)
        if dropped:
            out.append(f'<span class="align-hidden">⟨{dropped:,} combining marks cut⟩</span>')
            cut += dropped
        return "".join(out)

    return _SCANNED.sub(mark, escaped), hidden, cut  # ASCII (all of most text) is neither hidden nor a mark


# Blank lines shown in a row at most; a longer run is one marker line. 250 line breaks put a reply's last line (a
# "P.S. reply with your password") 5,000 px below a start that looked like another reply's, nothing saying more
# followed: the annotator ranked what they saw.
MAX_BLANK_LINES = 2
# What a blank line may hold: spaces a page draws as space, not str.isspace's line and paragraph separators, form
# feed or NEL, which are markers (_INVISIBLE) and would be folded out of sight with them
_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]*")


def _blank_runs_folded(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str | None, Any]], int]:
    """(line, its line break) pairs with each run of more than MAX_BLANK_LINES blank lines (spaces at most) as one
    (None, how many); and how many blank lines were folded."""
    out: list[tuple[str | None, Any]] = []
    run: list[tuple[str, str]] = []
    folded = 0
    for line, end in [*pairs, (None, "")]:
        if line is not None and _SPACES.fullmatch(line) and end:  # spaces only (the last line, no break, is not)
            run.append((line, end))
            continue
        if len(run) > MAX_BLANK_LINES:
            out.append((None, len(run)))
            folded += len(run)
        else:
            out += run
        run = []
        if line is not None:
            out.append((line, end))
    return out, folded


def text_html(text: str, limit: int = SHOWN_CHARS, *, cut_off: bool = False) -> str:
    """Model text as inert HTML for the page: every character escaped, so a `<form>`, an image or a
    script shows as the characters it is made of and nothing runs or loads; line breaks are kept by
    the `align-text` class (white-space: pre-wrap), and a text that reads right to left (_direction: most of its
    letters Arabic or Hebrew, or starting and ending with them) has dir="rtl", any other dir="ltr"; a line that
    reads the other way than its text (an Arabic line in an English reply, an English one in an Arabic reply) is
    an `align-line` with its own dir, while a line with no letters reads like its text; past `limit` characters
    it is cut, with a note. A character the page would draw as nothing or that would reorder the text (bidi
    overrides, zero-width and tag characters: `_INVISIBLE`; in a left-to-right line a right-to-left sign:
    `_turns`) shows as a marker ⟨U+202E⟩, and a line above the text says how many there are: the annotator reads
    what is stored, not what those characters make of it. Combining marks past MAX_MARKS on one character are
    cut, with a marker saying how many, and the line says so too.
    `cut_off`: the sampler stopped the reply at its length limit (align sample's `finished` false),
    which the note says, so the annotator ranks it as unfinished (guidelines.md)."""
    direction, lines = _direction(text[:limit]), _LINE_BREAK.split(text[:limit])
    body, hidden, cut, turned = [], 0, 0, 0
    pairs, folded = _blank_runs_folded(list(zip(lines[::2], [*lines[1::2], ""], strict=True)))
    for line, end in pairs:
        if line is None:  # a run of blank lines, folded
            body.append(f'<span class="align-hidden">⟨{end:,} blank lines⟩</span>\n')
            continue
        line_direction = _direction(line, direction)
        drawn, line_hidden, line_cut = _visible(html.escape(line), rtl=line_direction == "rtl")
        hidden, cut = hidden + line_hidden, cut + line_cut
        turned += line_direction != "rtl" and _numbers_turned(line)
        body.append((f'<span class="align-line" dir="{line_direction}">{drawn}</span>'
                     if line_direction != direction else drawn) + end)
    warnings = ([f'holds {hidden:,} hidden or direction character{"s" * (hidden != 1)}, shown as ⟨U+…⟩'] * bool(hidden)
                + [f"{cut:,} combining marks past {MAX_MARKS} on one character are not shown"] * bool(cut)
                + [f"numbers beside Hebrew or Arabic text in {turned:,} line{'s' * (turned != 1)} may be drawn in another "
                   "order than they are written (1 - 14 drawn as 14 - 1)"] * bool(turned)
                + [f"{folded:,} blank lines in runs of more than {MAX_BLANK_LINES} are folded into ⟨N blank lines⟩: read "
                   "on past them"] * bool(folded))
    shown = f'<p class="align-warn">⚠️ {"; ".join(warnings)}</p>' if warnings else ""
    # An empty or blank reply (a policy that ended its turn at once) drew an empty card, read as a page that
    # failed to load: said in words, after what is stored (its spaces and line breaks, escaped like the rest).
    empty = '<span class="align-cut">(empty response)</span>' if not text.strip() else ""
    shown += f'<div class="align-text" dir="{direction}">{"".join(body)}{empty}</div>'
    if len(text) > limit:
        shown += (f'<p class="align-cut">[cut here: {len(text) - limit:,} more characters are not shown; '
                  "the stored text is whole]</p>")
    if cut_off:
        shown += '<p class="align-cut">[cut off at the length limit: the reply did not end here]</p>'
    return shown


def _view(store: Store, annotator_id: int, task_id: int, seed: int) -> dict[str, Any]:
    task = store.task(task_id)
    k, key = len(task["responses"]), store.secret()
    order = shown_order(task_id, annotator_id, k, seed, key=key)
    return {"task_id": task_id, "handle": task_handle(task_id, annotator_id, key=key), "kind": task["kind"],
            "prompt": task["prompt"],
            "responses": [task["responses"][i]["text"] for i in order], "order": order, "k": k,
            # the page sends it back with its ranks: check_order
            "order_tag": order_tag(task_id, annotator_id, order, key=key),
            # cut at the sampler's max_new_tokens (align sample's mark; unknown counts as ended)
            "cut_off": [(task["responses"][i].get("meta") or {}).get("finished") is False for i in order]}


def next_task(store: Store, session: dict[str, Any], *, overlap: int = 1, gold_rate: float = 0.0, seed: int = 0,
              batch: str | None = None, new: bool = True) -> dict[str, Any] | None:
    """The task to show this annotator (Store.assign: an open one first; `new` false: only an open one)."""
    session = _require(session)
    task_id = store.assign(session["annotator_id"], overlap=overlap, gold_rate=gold_rate, seed=seed, batch=batch,
                           new=new)
    if task_id is None:
        return None
    view = _view(store, session["annotator_id"], task_id, seed)
    draft = store.draft(session["annotator_id"], task_id)
    notes = store.draft_notes(session["annotator_id"], task_id) or {"flags": [], "rationale": ""}
    flagged = unsafe_replies(notes["flags"])
    return {**view, "progress": store.progress(session["annotator_id"], batch=batch),
            # a saved partial ranking in shown order (None where unranked), so a reload loses nothing
            "draft": [draft[i] or None for i in view["order"]] if draft else None,
            "draft_flags": notes["flags"], "draft_rationale": notes["rationale"],
            # the responses the draft flags unsafe, in shown order (the store holds canonical indices)
            "draft_unsafe": [i in flagged for i in view["order"]]}


def _open_view(store: Store, session: dict[str, Any], task_id: Any, seed: int) -> tuple[dict[str, Any], str]:
    """(view, assignment status) of a task this annotator was given; PermissionError for any other task."""
    if isinstance(task_id, float) and task_id.is_integer():
        task_id = int(task_id)  # a number box sends 12.0
    if not isinstance(task_id, int) or isinstance(task_id, bool):
        raise ValueError("there is no task to submit")
    if not 0 < task_id < 2**31:  # no task has such an id (PostgreSQL's integer; SQLite raised OverflowError past 2^63)
        raise PermissionError(f"task {task_id} is not assigned to you")
    status = store.assignment_status(session["annotator_id"], task_id)
    if status is None:
        raise PermissionError(f"task {task_id} is not assigned to you")
    return _view(store, session["annotator_id"], task_id, seed), status


def to_canonical(task: dict[str, Any], ranks_shown: list[int]) -> list[int]:
    canonical = [0] * task["k"]
    for shown, original in enumerate(task["order"]):
        canonical[original] = ranks_shown[shown]
    return canonical


def pairwise_verdict(ranks_shown: list[int | None] | None, flags: list[str]) -> str | None:
    """The A/B verdict a draft's ranks of two (in shown order) and flags stand for; None when none was given."""
    shown = tuple(ranks_shown or [])[:2]
    if shown == (1, 1):
        return "both_bad" if "all_bad" in flags else "tie"
    return {(1, 2): "A", (2, 1): "B"}.get(shown)


def pairwise_ranks(choice: str) -> tuple[list[int], list[str]]:
    """An A/B verdict as ranks over the two shown responses (+ flags)."""
    table = {"A": ([1, 2], []), "B": ([2, 1], []), "tie": ([1, 1], []), "both_bad": ([1, 1], ["all_bad"])}
    if choice in (None, ""):  # submitted with no verdict picked: said as the page's buttons say it
        raise ValueError("choose A better, B better, Tie or Both bad")
    if choice not in table:
        raise ValueError(f"choose one of: A better, B better, Tie, Both bad (got {choice!r})")
    return table[choice]


def _whole(value: Any) -> Any:
    """A rank as an int when it is a whole number in any form ("2", 2.0 from a number box); else as given."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


ALREADY_SAVED = "Already saved (kept your first submission)."
OTHER_RANKING = ("Not saved: this task was already submitted, from another tab or window, with a different "
                 "ranking, which is kept. Next task.")
OTHER_UNSAFE = ("Not saved: this task was already submitted, from another tab or window, with other replies flagged "
                "unsafe, which are kept. Next task.")


def unsafe_flags(task: dict[str, Any], unsafe_shown: list[Any] | None) -> list[str]:
    """The unsafe:<i> flags (i canonical, `to_canonical`'s mapping) of the responses ticked unsafe in shown order
    (one box per slot the page lays out: the ones past the task's k must be unticked)."""
    shown = [bool(on) for on in unsafe_shown or []]
    if any(shown[task["k"]:]):
        raise ValueError(f"this task has {task['k']} responses: no response {LETTERS[shown.index(True, task['k'])]} "
                         "to flag unsafe")
    return [unsafe_flag(task["order"][i]) for i, on in enumerate(shown[:task["k"]]) if on]


def page_touched(task: dict[str, Any], touched: Collection[str] | str | None) -> set[str]:
    """The flags (unsafe:<i>, i canonical; all_bad) and "rationale" of what the page says the annotator changed on it,
    given in shown terms: "unsafe-<letter>", "all_bad", "rationale", comma-separated. A token it does not know (a
    page of another version, a forged request) is left out: that box's draft is kept as before."""
    tokens = touched[:200].split(",") if isinstance(touched, str) else list(touched or [])
    spoken = set()
    for token in tokens[:len(LETTERS) + 2]:
        token = str(token).strip()
        if token in ("all_bad", "rationale"):
            spoken.add(token)
        elif token.startswith("unsafe-") and len(token) == 8 and token[-1] in LETTERS.lower()[:task["k"]]:
            spoken.add(unsafe_flag(task["order"][LETTERS.lower().index(token[-1])]))
    return spoken


def _fit(ranks_shown: list[Any], k: int) -> list[Any]:
    """The first k ranks; the page sends one per response slot it lays out, and the slots past k must be empty."""
    ranks = list(ranks_shown)
    if any(r not in (None, "") for r in ranks[k:]):
        raise ValueError(f"give every response a rank: {len(ranks)} ranks for {k} responses")
    return ranks[:k]


def submit(store: Store, session: dict[str, Any], task_id: int, ranks_shown: list[Any] | None = None, *,
           verdict: str | None = None, all_bad: bool = False, unsafe: bool = False, rationale: str = "",
           seconds: float = 0.0, seed: int = 0, order_tag: str | None = None,
           unsafe_shown: list[Any] | None = None, touched: Collection[str] | str | None = None) -> dict[str, Any]:
    """Validate and save this annotator's ranking of task `task_id`, given in the order they were shown it
    (an A/B task takes the `verdict` of `pairwise_ranks` instead of ranks); `order_tag` is the one of the view
    the ranks were given in (the page's: "" when it had none), StaleOrder when that is no longer the task's order.
    `unsafe_shown`: a tick per response in shown order, saved as unsafe:<i> with i canonical (`unsafe_flags`);
    `unsafe` flags the ranking without naming a reply (what the app wrote before per-reply flags).
    `touched`: what the annotator changed on the submitting page (`page_touched`): its value there is kept over the
    draft's, which may not have heard of the change yet; the rest of the draft is kept with the page's (keep_draft).

    The task must be one they were given. Idempotent: a repeat (double click, replayed request)
    keeps the first submitted ranking and changes nothing, whatever task is open by then.
    """
    session = _require(session)
    task, status = _open_view(store, session, task_id, seed)
    check_order(task, order_tag)  # before any mapping: even a repeat's ranks are compared in canonical order
    if status == "submitted":
        return _repeat(store, session, task, ranks_shown, verdict, unsafe_shown)
    if status == "skipped":
        raise NotOpen("this task was skipped; it is no longer yours to rank")
    if status == "expired":
        # The page moves on to the next task with this note: no "press Skip" (it would skip that one). Expired is
        # also a ranking an admin discarded (Store.discard), so the 30 minutes are a likely cause, not a certainty.
        raise NotOpen("this task was handed to someone else (an assignment lapses after "
                      f"{ASSIGNMENT_TTL // 60} minutes open, or an admin withdrew it) and is no longer yours to rank; "
                      "your next task is below")
    if task["kind"] == "pairwise":
        ranks, verdict_flags = pairwise_ranks(verdict)
        all_bad = "all_bad" in verdict_flags  # the verdict says it (the page's own box is hidden on an A/B task)
    else:
        ranks = [_whole(r) for r in _fit(ranks_shown or [], task["k"])]
        missing = [LETTERS[i] for i, r in enumerate(ranks) if r is None or r == ""]
        if len(missing) == len(ranks):
            raise ValueError("give every response a rank (1 = best; equal ranks are ties)")
        if missing:  # the letters the page shows (A, B, ...), so the annotator sees at once which card is left
            named = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
            raise ValueError(f"give every response a rank: rank {named} too (1 = best; equal ranks are ties)")
        _check_ranks(ranks, task["k"])
    flags = [f for f, on in zip(FLAGS, (all_bad, unsafe), strict=True) if on] + unsafe_flags(task, unsafe_shown)
    _check_rationale(rationale)
    # What the draft holds is kept with the page's (keep_draft): an unsafe tick, "all bad" (on a ranking: an A/B
    # task's verdict says it) or a rationale made in another tab, which this page never showed, is never lost. A box
    # the annotator changed on this page is saved as it shows it (spoken): the draft of an untick may land after the
    # submit (each event has a queue of its own), and the draft's tick was kept over it. Read here only to say what
    # was kept.
    keep = ("unsafe", "rationale") + (("all_bad",) if task["kind"] != "pairwise" else ())
    spoken = page_touched(task, touched)
    notes = store.draft_notes(session["annotator_id"], task["task_id"]) or {}
    notes["flags"] = [f for f in notes.get("flags") or [] if f not in spoken]
    if "rationale" in spoken:
        notes["rationale"] = ""
    created = store.save_ranking(session["annotator_id"], task["task_id"], to_canonical(task, ranks), flags=flags,
                                 rationale=(rationale or "").strip(), seconds=seconds, keep_draft=keep, spoken=spoken)
    if not created:  # another submit of this task landed first
        return _repeat(store, session, task, ranks_shown, verdict, unsafe_shown)
    kept = []
    added = sorted(task["order"].index(i) for i in unsafe_replies(notes.get("flags")) - unsafe_replies(flags)
                   if i in task["order"])
    if added:
        kept.append(" and ".join(LETTERS[i] for i in added) + " flagged unsafe")
    if "all_bad" in keep and "all_bad" in (notes.get("flags") or []) and not all_bad:
        kept.append("all bad ticked")
    if not (rationale or "").strip() and (notes.get("rationale") or "").strip():
        kept.append("the rationale")
    if kept:
        said = kept[0] if len(kept) == 1 else ", ".join(kept[:-1]) + " and " + kept[-1]
        return {"ok": True, "created": True, "message": f"Saved, with {said} as set in another tab. Next task."}
    return {"ok": True, "created": True, "message": "Saved. Next task."}


def _check_rationale(rationale: str | None) -> None:
    if rationale is not None and len(rationale.strip()) > MAX_RATIONALE:
        raise ValueError(f"a rationale has at most {MAX_RATIONALE} characters (this one has {len(rationale.strip())}): "
                         "shorten it to submit")


def _repeat(store: Store, session: dict[str, Any], task: dict[str, Any], ranks_shown, verdict,
            unsafe_shown=None) -> dict[str, Any]:
    """The answer to a submit of a task already submitted: a repeat of the same ranking (a double click, a
    retried request) is "already saved"; a different one (a second tab), in its ranks or in which replies it
    flags unsafe, is said not to be saved."""
    try:
        ranks = pairwise_ranks(verdict)[0] if task["kind"] == "pairwise" else \
            [_whole(r) for r in _fit(ranks_shown or [], task["k"])]
        mine = to_canonical(task, ranks)
        if any(r in (None, "") for r in ranks):
            mine = None
    except (ValueError, TypeError):
        mine = None
    kept = store.submitted_ranks(session["annotator_id"], task["task_id"])
    if mine is not None and kept is not None and mine != kept:
        return {"ok": True, "created": False, "conflict": True, "message": OTHER_RANKING}
    try:
        ticked = unsafe_replies(unsafe_flags(task, unsafe_shown))
    except ValueError:
        ticked = None
    kept_flags = store.submitted_flags(session["annotator_id"], task["task_id"])
    if ticked is not None and kept_flags is not None and ticked != unsafe_replies(kept_flags):
        return {"ok": True, "created": False, "conflict": True, "message": OTHER_UNSAFE}
    return {"ok": True, "created": False, "message": ALREADY_SAVED}


def save_draft(store: Store, session: dict[str, Any], task_id: int, ranks_shown: list[Any], *,
               all_bad: bool | None = None, unsafe: bool | None = None, rationale: str | None = None,
               verdict: str | None = None, seed: int = 0, order_tag: str | None = None,
               unsafe_reply: tuple[int, bool] | None = None) -> bool:
    """Keep a partial ranking of an open task, with its flags and rationale (no validation beyond types): a
    reload shows nothing lost. A flag or the rationale given as None leaves the saved one as it is (the page
    sends each from its own box only: a rank set in a second tab cannot clear them); "" clears the rationale.
    `unsafe_reply` (shown index, ticked): one response's unsafe box, saved as unsafe:<canonical index>; the
    other responses' flags stay as saved.
    `order_tag` as for submit: a draft in an order the task is no longer shown in is StaleOrder, nothing written.

    False (nothing written) once the task is submitted, skipped or expired: a late draft never touches it.
    """
    session = _require(session)
    task, status = _open_view(store, session, task_id, seed)
    if status != "assigned":
        return False
    check_order(task, order_tag)
    if task["kind"] == "pairwise":  # an A/B task's verdict, as the ranks of two (and both bad as all_bad)
        ranks_shown, flagged = pairwise_ranks(verdict) if verdict else ([0, 0], [])
        all_bad = "all_bad" in flagged if verdict else None
    ranks = [_whole(r) if r not in (None, "") else 0 for r in _fit(ranks_shown, task["k"])]
    if len(ranks) != task["k"] or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= task["k"]
                                          for r in ranks):
        raise ValueError(f"a draft of this task needs {task['k']} ranks from 0 (not ranked yet) "
                         f"to {task['k']}")
    given = {f: on for f, on in zip(FLAGS, (all_bad, unsafe), strict=True) if on is not None}
    if unsafe_reply is not None:
        shown, on = unsafe_reply
        if not isinstance(shown, int) or isinstance(shown, bool) or not 0 <= shown < task["k"]:
            raise ValueError(f"this task has {task['k']} responses: no response {shown!r} to flag unsafe")
        given[unsafe_flag(task["order"][shown])] = bool(on)
    _check_rationale(rationale)
    return store.save_ranking(session["annotator_id"], task["task_id"], to_canonical(task, ranks),
                              flags=[f for f, on in given.items() if on], flags_set=list(given),
                              rationale=None if rationale is None else rationale.strip(), status="draft")


LATE_DRAFT = {
    "submitted": "Not saved: this task was already submitted (from this tab or another), so a rank, flag or rationale "
                 "set on it now changes nothing. Reload the page for your next task.",
    "skipped": "Not saved: this task was skipped and is no longer yours to rank. Reload the page for your next task.",
    "expired": f"Not saved: this task was handed to someone else (an assignment lapses after {ASSIGNMENT_TTL // 60} "
               "minutes open, or an admin withdrew it); it is no longer yours to rank. Press Skip (or reload the page) "
               "for your next task.",
}


def late_draft_note(store: Store, session: dict[str, Any], task_id: int, ranks_shown: list[Any], *,
                    verdict: str | None = None, seed: int = 0, unsafe_reply: tuple[int, bool] | None = None,
                    all_bad: bool | None = None, rationale: str | None = None) -> str | None:
    """What to tell the page whose draft save_draft refused (the task no longer open to this annotator): a rank,
    flag or rationale set there is lost, said at once, not at the submit. None for a draft that only repeats the
    ranking submitted (its ranks, and what it says of its reply's unsafe flag, all_bad or the rationale, as
    save_draft takes them): a rank set just before the submit in the same page, whose draft landed after it."""
    session = _require(session)
    task, status = _open_view(store, session, task_id, seed)
    if status == "submitted":
        try:
            shown = pairwise_ranks(verdict)[0] if task["kind"] == "pairwise" and verdict else \
                [_whole(r) if r not in (None, "") else 0 for r in _fit(ranks_shown, task["k"])]
            mine = to_canonical(task, shown) if len(shown) == task["k"] else None
        except (ValueError, TypeError):
            mine = None
        kept = store.submitted_ranks(session["annotator_id"], task["task_id"])
        same_tick = True
        if unsafe_reply is not None:
            shown, on = unsafe_reply
            flagged = unsafe_replies(store.submitted_flags(session["annotator_id"], task["task_id"]))
            same_tick = (isinstance(shown, int) and not isinstance(shown, bool) and 0 <= shown < task["k"]
                         and (task["order"][shown] in flagged) == bool(on))
        if all_bad is not None or rationale is not None:  # a draft of its own box carries no ranks
            notes = store.submitted_notes(session["annotator_id"], task["task_id"]) or {"flags": [], "rationale": ""}
            if all_bad is not None and ("all_bad" in notes["flags"]) != bool(all_bad):
                same_tick = False
            if rationale is not None and (rationale or "").strip() != (notes["rationale"] or "").strip():
                same_tick = False
        if mine is not None and kept is not None and same_tick and \
                all(r in (0, k) for r, k in zip(mine, kept, strict=True)):
            return None
    return LATE_DRAFT.get(status)


def skip(store: Store, session: dict[str, Any], task_id: int) -> None:
    """Pass an open task on to someone else; a repeat, or a task already submitted, changes nothing."""
    session = _require(session)
    task, _ = _open_view(store, session, task_id, 0)
    store.skip(session["annotator_id"], task["task_id"])


def _require_admin(session: dict[str, Any] | None) -> dict[str, Any]:
    session = _require(session)
    if not session.get("is_admin"):
        raise PermissionError("the admin view is for admins (align label users add NAME --admin)")
    return session


PLAYGROUND_CLOSED = ("The Playground is closed to annotators while A/B tasks (align eval human=true) wait for "
                     "verdicts: its models would give those tasks' answers and show which model wrote each side.")


def playground_open(store: Store, session: dict[str, Any] | None, *, overlap: int = 1) -> bool:
    """Whether this account may use the Playground now: an admin always, an annotator only while no blind A/B task
    is open (Store.blind_tasks_open). An A/B task's answers are its models' greedy ones (align eval), so asking the
    Playground's same models its prompt at temperature 0 gives them back, and names each side."""
    session = _require(session)
    return bool(session.get("is_admin")) or not store.blind_tasks_open(overlap)


def export_flagged(export_dir: str | Path | None) -> str:
    """The `flagged` setting (keep / drop) of the export in `export_dir` (its config.yaml, which the Export button
    runs with too), else the export's default, keep: the admin tab measures the rankings that export reads."""
    import yaml

    try:
        settings = yaml.safe_load((Path(export_dir) / "config.yaml").read_text()) if export_dir else None
    except (OSError, yaml.YAMLError):
        settings = None
    flagged = settings.get("flagged") if isinstance(settings, dict) else None
    return flagged if flagged in ("keep", "drop") else "keep"


def admin_stats(store: Store, session: dict[str, Any], *, overlap: int = 1, flagged: str = "keep") -> dict[str, Any]:
    """Progress, throughput, gold accuracy, reliability and agreement; `pending` counts rankings still needed at
    `overlap`. Reliability is what `align export` estimates (align.labeling.agreement.annotator_reliability): each
    annotator's estimated accuracy with its 95 % interval, the weight their votes get and their gold accuracy
    (its share of their votes on gold tasks' pairs that match the gold answer); `warnings` are its
    sentences on annotators it trusts against their gold answers (Reliability.warnings), which `align export`
    only logs: here the admin, who can check those rankings and add gold tasks, sees them. Both, and agreement,
    read the rankings the export reads (rankings_for_reliability, with the export's `flagged`): never the A/B
    verdicts of align eval human=true, whose "A" and "B" are the shown sides, no ranks of answers."""
    _require_admin(session)
    from align.labeling.agreement import agreement_summary, annotator_reliability, rankings_for_reliability

    rows = store.submitted_rankings()
    read = rankings_for_reliability(rows, flagged=flagged)
    estimate = annotator_reliability(read, store.gold_answers())
    reliability = estimate.annotators
    people = store.annotator_activity()
    for p in people:
        r = reliability.get(p["name"])
        # the estimate's own (the reliability table align export writes): the same rankings, pairs and ties, so the
        # column agrees with est_accuracy's warnings beside it (read apart, A/B verdicts and flagged rows counted)
        p["gold_accuracy"] = round(r["gold_accuracy"], 3) if r and r["gold_accuracy"] is not None else None
        p["est_accuracy"] = round(r["accuracy"], 3) if r else None
        p["accuracy_95"] = f"{r['interval'][0]:.2f}–{r['interval'][1]:.2f}" if r else None
        p["weight"] = round(r["weight"], 2) if r else None
    batches = store.batch_counts()
    for b in batches:
        b["pending"] = store.pending_count(b["batch"], overlap)
    return {"per_annotator": people, "per_batch": batches, "warnings": estimate.warnings,
            "agreement": agreement_summary([r for r in read if not r["is_gold"]]),
            "totals": {"tasks": sum(b["tasks"] for b in batches), "rankings": len(rows),
                       "annotators": sum(p["done"] > 0 for p in people)}}


def export(session: dict[str, Any], run_export: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The admin's Export button: `run_export` is `align export` on the run's preferences folder (align/labeling/cli.py)."""
    _require_admin(session)
    return run_export()
