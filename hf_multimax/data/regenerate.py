"""Regenerate ``en_de.tsv``, the English→German pairs behind ``hf_multimax.data.translation_pairs()``.

Sources (all real translations made by people, under permissive licences; see ``NOTICE.md`` beside this file):

* Django's gettext catalogs (``django/**/locale/de/LC_MESSAGES/django.po``), BSD-3-Clause.
* Sphinx's gettext catalog (``sphinx/locale/de/LC_MESSAGES/sphinx.po``), BSD-2-Clause.
* Babel's CLDR display names of territories and languages (``babel/locale-data/{en,de}.dat``), Unicode licence.

Usage (with django, sphinx and babel importable, e.g. ``pip install django sphinx babel`` in a scratch environment)::

    python hf_multimax/data/regenerate.py            # writes hf_multimax/data/en_de.tsv

The output is deterministic for given package versions: one ``source<TAB>en<TAB>de`` row per unique English string,
sorted by source then English text.
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import pickle
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Placeholders, markup and escapes that make a string a template rather than a sentence or phrase.
TEMPLATE = re.compile(r"%|\{|\}|<|>|\\|`|\bhttps?:|&\w+;")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"`{name}` is not importable; install it (pip install {name}) to regenerate the data")
    return Path(next(iter(spec.submodule_search_locations)))


def read_po(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a .po file: singular forms only, fuzzy and untranslated entries skipped."""
    pairs, entry, field, fuzzy = [], {}, None, False

    def flush() -> None:
        nonlocal entry, fuzzy
        msgid, msgstr = entry.get("msgid", ""), entry.get("msgstr", entry.get("msgstr[0]", ""))
        if msgid and msgstr and not fuzzy and "msgctxt" not in entry:
            pairs.append((msgid, msgstr))
        entry, fuzzy = {}, False

    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            flush()
        elif line.startswith("#,") and "fuzzy" in line:
            fuzzy = True
        elif line.startswith("#"):
            continue
        elif line.startswith('"') and field is not None:
            entry[field] += ast.literal_eval(line)
        else:
            field, _, value = line.partition(" ")
            if field == "msgid" and "msgid" in entry:
                flush()
            entry[field] = ast.literal_eval(value)
    flush()
    return pairs


def read_cldr(babel_dir: Path, locale: str) -> dict:
    with open(babel_dir / "locale-data" / f"{locale}.dat", "rb") as f:
        return pickle.load(f)


def clean(text: str) -> str | None:
    text = " ".join(text.split())
    if not text or TEMPLATE.search(text) or len(text) > 300:
        return None
    return text


def collect() -> list[tuple[str, str, str]]:
    rows: dict[str, tuple[str, str, str]] = {}

    def add(source: str, en: str, de: str) -> None:
        en, de = clean(en), clean(de)
        if en and de and en not in rows:
            rows[en] = (source, en, de)

    django = package_dir("django")
    for path in sorted(django.rglob("locale/de/LC_MESSAGES/django.po")):
        for en, de in read_po(path):
            add("django", en, de)
    sphinx = package_dir("sphinx")
    for en, de in read_po(sphinx / "locale" / "de" / "LC_MESSAGES" / "sphinx.po"):
        add("sphinx", en, de)
    babel = package_dir("babel")
    en_data, de_data = read_cldr(babel, "en"), read_cldr(babel, "de")
    for key in ("territories", "languages"):
        for code in sorted(en_data[key]):
            if code in de_data[key]:
                add("cldr", en_data[key][code], de_data[key][code])
    return sorted(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=HERE / "en_de.tsv", help="where to write the TSV")
    args = parser.parse_args()
    rows = collect()
    with open(args.output, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, escapechar=None)
        writer.writerow(("source", "en", "de"))
        writer.writerows(rows)
    counts = {s: sum(r[0] == s for r in rows) for s in ("django", "sphinx", "cldr")}
    print(f"wrote {len(rows)} pairs to {args.output}: {counts}")


if __name__ == "__main__":
    main()
