#!/usr/bin/env python3
"""Build the small real-text multi-domain corpus shipped in data/corpus/.

The corpus mimics the setting of Grangier et al. ("Need a Small Specialized
Language Model? Plan Early!"): one broad *generic* mixture (the c4 stand-in,
mostly Linux kernel documentation plus a share of every other source) and five
narrow *specialization domains* (bible, python_docs, postgres_docs, manpages,
fortunes). Each set has train/valid/test splits. A source document goes to
exactly one set and split, so domain documents never appear in generic.

Text comes only from Debian packages installed on this machine:

  package            provides                          tool used
  linux-doc-6.1      kernel docs, HTML (Sphinx)        html.parser
  python3.11-doc     Python docs, HTML (Sphinx)        html.parser
  postgresql-doc-15  PostgreSQL docs, HTML (DocBook)   html.parser
  manpages           man pages, sections 1,4-8         groff (groff-base)
  manpages-dev       man pages, sections 2,3           groff (groff-base)
  bible-kjv-text     King James Bible (compressed)     `bible` (bible-kjv)
  fortunes-min       fortune cookies (3 files)         -
  fortunes           fortune cookies (44 files)        -

Install them with:

  apt-get update
  apt-get install -y linux-doc-6.1 python3.11-doc postgresql-doc-15 \\
      manpages manpages-dev groff-base bible-kjv bible-kjv-text \\
      fortunes fortunes-min

The script uses the standard library only, except the optional token count
(sentencepiece, from the project venv). Run from the repository root:

  .venv/bin/python data/build_corpus.py            # writes data/corpus/

Output: data/corpus/<set>/{train,valid,test}.jsonl.gz (gzip with mtime 0, one
{"id", "text", "source"} object per line), data/corpus/manifest.json, and
data/corpus/licenses/ (the Debian copyright file of each text package).
Given the same package versions, the .jsonl.gz files are byte-identical.
"""

import argparse
import concurrent.futures
import gzip
import hashlib
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "data" / "corpus"
SPLITS = ("train", "valid", "test")

# Packages whose text is in the corpus -> (what they provide, a file that must
# exist). Their Debian copyright files are copied to <out>/licenses/.
TEXT_PACKAGES = {
    "linux-doc-6.1": ("Linux kernel documentation (HTML), bulk of generic",
                      "/usr/share/doc/linux-doc-6.1/html/index.html"),
    "python3.11-doc": ("Python 3.11 documentation (HTML), domain python_docs",
                       "/usr/share/doc/python3.11/html/index.html"),
    "postgresql-doc-15": ("PostgreSQL 15 documentation (HTML), domain postgres_docs",
                          "/usr/share/doc/postgresql-doc-15/html/index.html"),
    "manpages": ("Linux man-pages, sections 1,4-8, domain manpages",
                 "/usr/share/man/man7/man-pages.7.gz"),
    "manpages-dev": ("Linux man-pages, sections 2-3, domain manpages",
                     "/usr/share/man/man2/open.2.gz"),
    "bible-kjv-text": ("King James Bible text, domain bible", "/usr/lib/bible.data"),
    "fortunes-min": ("fortune cookies (fortunes, literature, riddles), domain fortunes",
                     "/usr/share/games/fortunes/fortunes"),
    "fortunes": ("fortune cookies (44 topic files), domain fortunes",
                 "/usr/share/games/fortunes/computers"),
}
# Tools needed to read some of them -> (what for, the program).
TOOL_PACKAGES = {
    "groff-base": ("renders the man pages to plain text", "groff"),
    "bible-kjv": ("the `bible` reader that decompresses bible-kjv-text", "bible"),
}
PACKAGES = {**TEXT_PACKAGES, **TOOL_PACKAGES}  # all checked before reading

# Sizes in whitespace words (≈ 1.3 tokens each; the manifest records the
# measured SentencePiece counts). Domain sets: test, valid, then train are
# filled in a fixed pseudo-random order; what is left of the source joins the
# generic pool, so generic "covers" every domain.
DOMAIN_WORDS = {"test": 55_000, "valid": 55_000, "train": 450_000}
FORTUNE_WORDS = {"test": 40_000, "valid": 40_000, "train": 250_000}
GENERIC_WORDS = {"test": 75_000, "valid": 75_000}  # train: everything left

# Long documents are cut into sections at paragraph breaks: documents over
# MAX_WORDS become parts of about PART_WORDS words.
MAX_WORDS = 3000
PART_WORDS = 1500


@dataclass
class Doc:
    id: str       # "<debian package>/<stable id within the package>"
    text: str
    source: str   # Debian package the text comes from
    unit: str = ""  # id of the natural unit (page, chapter) it belongs to

    @property
    def words(self):
        return len(self.text.split())


# ---------------------------------------------------------------------------
# Debian package helpers (read dpkg's own database: no dpkg-query needed)
# ---------------------------------------------------------------------------

def package_files(pkg):
    """Files installed by a Debian package, from /var/lib/dpkg/info/<pkg>.list."""
    listing = Path("/var/lib/dpkg/info") / f"{pkg}.list"
    if not listing.exists():
        # Some packages are registered with an architecture suffix.
        candidates = sorted(Path("/var/lib/dpkg/info").glob(f"{pkg}:*.list"))
        if not candidates:
            return None
        listing = candidates[0]
    return [Path(line) for line in listing.read_text().splitlines() if line]


def package_versions(pkgs):
    """Installed version of each package, parsed from /var/lib/dpkg/status."""
    versions = {}
    status = Path("/var/lib/dpkg/status").read_text(errors="replace")
    for block in status.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Status): (.*)$", block, re.M))
        if fields.get("Package") in pkgs and "installed" in fields.get("Status", ""):
            versions[fields["Package"]] = fields["Version"]
    return versions


def check_sources():
    """Fail early, with the install command, if a package, one of its files
    (e.g. dropped by a dpkg path-exclude in slim images) or a tool is missing."""
    missing = [pkg for pkg, (_, probe) in TEXT_PACKAGES.items()
               if package_files(pkg) is None or not Path(probe).is_file()]
    missing += [pkg for pkg, (_, tool) in TOOL_PACKAGES.items()
                if shutil.which(tool) is None]
    if missing:
        sys.exit(
            "build_corpus.py: missing Debian package(s) or their files: "
            + " ".join(missing) + "\nInstall them with:\n  apt-get update && "
            "apt-get install -y " + " ".join(missing) + "\n(if already "
            "installed, check /etc/dpkg/dpkg.cfg.d for path-exclude rules "
            "and reinstall)")
    return package_versions(set(PACKAGES))


# ---------------------------------------------------------------------------
# Text cleaning
# ---------------------------------------------------------------------------

# Typographic characters that groff and Sphinx produce for ASCII input; mapping
# them back keeps code, options and quotes readable and the vocabulary small.
TYPOGRAPHY = str.maketrans({
    "\u2010": "-", "\u2011": "-", "\u2212": "-", "\u00ad": "",
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
    "\u00a0": " ", "\u200b": "", "\ufeff": "", "\u00b6": "",
})
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text):
    """Normalize whitespace: no tabs or control characters, no trailing
    spaces, at most one blank line in a row, no blank lines at either end.
    Indentation is kept (it carries the structure of code and verse) but
    indentation common to all lines is removed."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(TYPOGRAPHY)
    text = CONTROL.sub("", text.expandtabs(8))
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return textwrap.dedent(text).strip("\n")


def split_long(doc):
    """Cut a document longer than MAX_WORDS into ~PART_WORDS-word sections at
    paragraph breaks (blank lines), so that no single page dominates a split."""
    if doc.words <= MAX_WORDS:
        return [doc]
    parts, current, count = [], [], 0
    for para in doc.text.split("\n\n"):
        current.append(para)
        count += len(para.split())
        if count >= PART_WORDS:
            parts.append("\n\n".join(current))
            current, count = [], 0
    if current:
        if parts and count < PART_WORDS // 3:
            parts[-1] += "\n\n" + "\n\n".join(current)  # avoid a tiny tail
        else:
            parts.append("\n\n".join(current))
    return [Doc(f"{doc.id}#{i}", text, doc.source)
            for i, text in enumerate(parts, 1)]


# ---------------------------------------------------------------------------
# HTML pages -> plain text (stdlib html.parser)
# ---------------------------------------------------------------------------

VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input",
             "link", "meta", "param", "source", "track", "wbr"}
BLOCK_TAGS = {"p", "div", "section", "article", "h1", "h2", "h3", "h4", "h5",
              "h6", "li", "dt", "dd", "pre", "table", "tr", "blockquote", "ul",
              "ol", "dl", "caption", "figure", "figcaption", "title", "body",
              "br", "hr", "tbody", "thead"}
SKIP_TAGS = {"script", "style", "head", "nav"}
# Navigation, permalinks and tables of contents are not running text.
SKIP_CLASSES = {"headerlink", "navheader", "navfooter", "toc", "toctree-wrapper",
                "sphinxsidebar", "related", "footer", "rst-footer-buttons",
                "wy-breadcrumbs", "wy-nav-side", "wy-side-scroll",
                "contents", "local-toc"}


class HTMLText(html.parser.HTMLParser):
    """Collects the visible text of a page, optionally only inside the element
    whose attribute `main=(name, value)` matches (the article body)."""

    def __init__(self, main=None):
        super().__init__(convert_charrefs=True)
        self.main = main
        self.stack = []   # (tag, skip, is_main, is_pre) for every open element
        self.out = []

    def _state(self):
        skip = any(e[1] for e in self.stack)
        inside = self.main is None or any(e[2] for e in self.stack)
        pre = any(e[3] for e in self.stack)
        return skip, inside, pre

    def _break(self):
        skip, inside, _ = self._state()
        if not skip and inside:
            self.out.append("\n\n")

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in BLOCK_TAGS:
            self._break()
        if tag in VOID_TAGS:
            return
        classes = set((attrs.get("class") or "").split())
        skip = tag in SKIP_TAGS or bool(classes & SKIP_CLASSES) \
            or attrs.get("role") == "navigation"
        is_main = self.main is not None and attrs.get(self.main[0]) == self.main[1]
        self.stack.append((tag, skip, is_main, tag == "pre"))
        if tag in ("td", "th"):
            self.handle_data(" ")

    def handle_endtag(self, tag):
        if tag in VOID_TAGS or all(e[0] != tag for e in self.stack):
            return  # stray end tag
        while self.stack:
            if self.stack.pop()[0] == tag:
                break
        if tag in BLOCK_TAGS:
            self._break()

    def handle_data(self, data):
        skip, inside, pre = self._state()
        if skip or not inside:
            return
        if not pre:
            data = re.sub(r"\s+", " ", data)
            if not self.out or self.out[-1].endswith("\n"):
                data = data.lstrip()
        self.out.append(data)

    def text(self):
        text = "".join(self.out)
        text = re.sub(r"[ \t]+\n", "\n", text)
        return clean_text(text)


def html_to_text(path, main=None):
    parser = HTMLText(main)
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return parser.text()


def html_docs(pkg, root, keep, main=None):
    """One document per HTML page of `pkg` under `root` accepted by keep(rel)."""
    docs = []
    for path in sorted(package_files(pkg)):
        if path.suffix != ".html" or not path.is_file() or root not in path.parents:
            continue
        rel = path.relative_to(root).as_posix()
        if keep(rel):
            docs.append(Doc(f"{pkg}/{rel}", html_to_text(path, main), pkg))
    return docs


def load_linux_docs():
    root = Path("/usr/share/doc/linux-doc-6.1/html")
    # Translations are not English; index/search pages are not running text.
    skip = re.compile(r"^(translations/|_|genindex|search|py-modindex)")
    return html_docs("linux-doc-6.1", root, lambda rel: not skip.match(rel),
                     main=("itemprop", "articleBody"))


def load_python_docs():
    root = Path("/usr/share/doc/python3.11/html")
    # whatsnew/changelog.html is a raw commit log, bigger than the rest of
    # whatsnew together; the index pages are lists of links.
    skip = re.compile(r"^(_|genindex|py-modindex|search|contents\.html|"
                      r"whatsnew/changelog\.html)")
    return html_docs("python3.11-doc", root, lambda rel: not skip.match(rel),
                     main=("role", "main"))


def load_postgres_docs():
    root = Path("/usr/share/doc/postgresql-doc-15/html")
    return html_docs("postgresql-doc-15", root,
                     lambda rel: rel != "bookindex.html")


# ---------------------------------------------------------------------------
# Man pages -> plain text (groff)
# ---------------------------------------------------------------------------

# Left-adjusted (no justification spaces), no hyphenation, wide lines, no
# overstrike/SGR escapes: plain UTF-8 text as `man` would show it.
GROFF = ["groff", "-t", "-mandoc", "-Tutf8", "-P-cbou", "-rHY=0", "-rLL=100n"]


def render_man(path):
    source = gzip.decompress(path.read_bytes())
    if source.lstrip().startswith(b".so "):
        return None  # an alias of another page
    result = subprocess.run(GROFF, input=b".ad l\n" + source,
                            capture_output=True, check=False)
    lines = result.stdout.decode("utf-8", errors="replace").strip("\n").split("\n")
    # Drop the running header (first line) and footer (last line).
    lines = lines[1:-1]
    # groff indents the body by 7 columns; headings sit at column 0.
    lines = [line[min(7, len(line) - len(line.lstrip(" "))):] for line in lines]
    return clean_text("\n".join(lines))


def load_manpages(jobs):
    pages = []
    for pkg in ("manpages", "manpages-dev"):
        for path in sorted(package_files(pkg)):
            if (re.fullmatch(r"man\d", path.parent.name) and path.suffix == ".gz"
                    and path.is_file() and not path.is_symlink()):
                pages.append((pkg, path))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        texts = pool.map(lambda item: render_man(item[1]), pages)
        return [Doc(f"{pkg}/{path.parent.name}/{path.name[:-3]}", text, pkg)
                for (pkg, path), text in zip(pages, texts) if text]


# ---------------------------------------------------------------------------
# Bible chapters (bible-kjv reads the compressed bible-kjv-text data)
# ---------------------------------------------------------------------------

def load_bible():
    out = subprocess.run(["bible", "-l", "100000", "Gen1:1-Rev22:21"],
                         capture_output=True, text=True, check=True).stdout
    docs, title, verses = [], None, []

    def flush():
        if title:
            book, chapter = title.rsplit(" ", 1)
            text = title + "\n\n" + "\n".join(verses)
            docs.append(Doc(f"bible-kjv-text/{book.replace(' ', '_')}/{chapter}",
                            clean_text(text), "bible-kjv-text"))

    for line in out.split("\n"):
        if re.fullmatch(r"[1-3]? ?[A-Z][A-Za-z ]+ \d+", line):  # "1 Kings 3"
            flush()
            title, verses = line, []
        elif line.strip():
            verses.append(line.strip())  # "12 And he said, ..."
    flush()
    if len(docs) != 1189:
        sys.exit(f"build_corpus.py: expected 1189 Bible chapters, got {len(docs)}")
    return docs


# ---------------------------------------------------------------------------
# Fortunes: one cookie per document ('%' lines separate cookies)
# ---------------------------------------------------------------------------

FORTUNE_DIR = Path("/usr/share/games/fortunes")


def load_fortunes():
    docs = []
    for pkg in ("fortunes-min", "fortunes"):
        for path in sorted(package_files(pkg)):
            if (path.parent != FORTUNE_DIR or path.suffix or path.is_symlink()
                    or not path.is_file() or path.name == "ascii-art"):
                continue  # .dat indexes, .u8 links, pictures
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            cookies = re.split(r"^%\s*$", text, flags=re.M)
            for i, cookie in enumerate(cookies):
                docs.append(Doc(f"{pkg}/{path.name}/{i}", clean_text(cookie), pkg))
    return docs


# ---------------------------------------------------------------------------
# Splitting into sets
# ---------------------------------------------------------------------------

MIN_WORDS = {"fortunes": 4, "fortunes-min": 4}  # cookies are short by nature
DEFAULT_MIN_WORDS = 30  # fewer: a stub or navigation page


def order_key(key, salt=""):
    """A fixed pseudo-random order (sha256 of the id): deterministic shuffle.
    A different salt gives an independent order."""
    return hashlib.sha256((salt + key).encode()).hexdigest()


def text_hash(text):
    return hashlib.sha256(text.encode()).hexdigest()


def prepare(docs, seen):
    """Drop near-empty texts and texts already in `seen` (exact duplicates,
    across all sources), cut long documents into sections, and group the
    sections by natural unit (page, chapter, cookie) in a fixed random order."""
    units = {}
    for doc in sorted(docs, key=lambda d: d.id):
        if doc.words < MIN_WORDS.get(doc.source, DEFAULT_MIN_WORDS):
            continue
        for part in split_long(doc):
            digest = text_hash(part.text)
            if digest not in seen:
                seen.add(digest)
                part.unit = doc.id
                units.setdefault(doc.id, []).append(part)
    return [units[key] for key in sorted(units, key=order_key)]


def fill(units, budgets):
    """Deal whole units, in order, to the first split of `budgets` (words)
    that is not yet full. A unit bigger than a fifth of a split's budget skips
    that split, so one huge page cannot swamp a small valid or test set.
    Returns the assignment and the units left over."""
    assigned = {name: [] for name in budgets}
    words = dict.fromkeys(budgets, 0)
    rest = []
    for unit in units:
        size = sum(d.words for d in unit)
        for name, budget in budgets.items():
            if words[name] < budget and size <= budget // 5:
                assigned[name].extend(unit)
                words[name] += size
                break
        else:
            rest.append(unit)
    return assigned, rest


def build_sets(sources):
    """sources: {domain name, or None for generic-only: [docs]}
    -> {set name: {split: [docs]}}. Each unit lands in exactly one split of
    one set; a domain source's leftover units join the generic pool."""
    sets, generic_pool, seen = {}, [], set()
    for name, docs in sources.items():
        if not docs:
            sys.exit(f"build_corpus.py: no documents read for {name or 'generic'}")
        units = prepare(docs, seen)
        if name is None:
            generic_pool.extend(units)
            continue
        budgets = FORTUNE_WORDS if name == "fortunes" else DOMAIN_WORDS
        sets[name], rest = fill(units, budgets)
        generic_pool.extend(rest)
    # A fresh order: the leftovers of a domain are the *end* of its order, so
    # reusing it would keep them out of generic valid/test.
    generic_pool.sort(key=lambda unit: order_key(unit[0].unit, "generic"))
    generic, rest = fill(generic_pool, GENERIC_WORDS)
    generic["train"] = [d for unit in rest for d in unit]
    sets["generic"] = generic
    # Within a file, order documents pseudo-randomly (mixes the sources).
    return {name: {split: sorted(split_docs, key=lambda d: order_key(d.id))
                   for split, split_docs in splits.items()}
            for name, splits in sets.items()}


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def write_jsonl_gz(path, docs):
    """gzip with mtime 0 and no file name: byte-identical across builds."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0,
                       compresslevel=9) as gz:
        for doc in docs:
            record = {"id": doc.id, "text": doc.text, "source": doc.source}
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def count_tokens(sets, workdir):
    """Train a 32k SentencePiece BPE on a sample of generic train and count the
    tokens of every split: the 'estimated tokens' of the manifest."""
    try:
        import sentencepiece as spm
    except ImportError:
        return None
    sample = Path(workdir) / "sample.txt"
    with sample.open("w") as f:
        for doc in sets["generic"]["train"][::3]:
            f.write(doc.text + "\n")
    spm.SentencePieceTrainer.train(
        input=str(sample), model_prefix=str(Path(workdir) / "spm"),
        vocab_size=32000, model_type="bpe", character_coverage=0.9995,
        input_sentence_size=2_000_000, shuffle_input_sentence=False,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(Path(workdir) / "spm.model"))
    return {(name, split): sum(len(ids) for ids in sp.encode([d.text for d in docs]))
            for name, splits in sets.items() for split, docs in splits.items()}


def write_corpus(sets, out, versions, tokens):
    files = {}
    for name in sorted(sets):
        for split in SPLITS:
            docs = sets[name][split]
            path = out / name / f"{split}.jsonl.gz"
            write_jsonl_gz(path, docs)
            words = sum(d.words for d in docs)
            files[f"{name}/{split}.jsonl.gz"] = {
                "docs": len(docs),
                "bytes": path.stat().st_size,
                "text_bytes": sum(len(d.text.encode()) for d in docs),
                "words": words,
                "est_tokens": tokens[name, split] if tokens else round(1.3 * words),
                "sources": count_by_source(docs),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
    manifest = {
        "description": "Multi-domain real-text corpus; see data/README.md",
        "built_by": "data/build_corpus.py",
        "est_tokens_method": (
            "SentencePiece BPE, vocab 32000, trained on every third generic "
            "train document" if tokens else "1.3 x whitespace words"),
        "packages": {p: versions.get(p) for p in sorted(PACKAGES)},
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def copy_licences(out):
    """Ship each text package's Debian copyright file next to the data: the
    licences (GPL-2, PSF, PostgreSQL, BSD, man-pages copyleft) ask that
    copies keep the copyright and permission notices."""
    folder = out / "licenses"
    folder.mkdir(parents=True, exist_ok=True)
    for pkg in sorted(TEXT_PACKAGES):
        shutil.copyfile(Path("/usr/share/doc") / pkg / "copyright",
                        folder / f"{pkg}.copyright")
    # The copyright files refer to this one instead of including it.
    shutil.copyfile("/usr/share/common-licenses/GPL-2", folder / "GPL-2")


def count_by_source(docs):
    counts = {}
    for doc in docs:
        counts[doc.source] = counts.get(doc.source, 0) + doc.words
    return {source: counts[source] for source in sorted(counts)}


def report(manifest):
    print(f"{'file':32} {'docs':>7} {'words':>10} {'tokens':>10} {'gz MB':>7}")
    total = 0
    for name, info in manifest["files"].items():
        total += info["bytes"]
        print(f"{name:32} {info['docs']:7d} {info['words']:10d} "
              f"{info['est_tokens']:10d} {info['bytes'] / 1e6:7.2f}")
    print(f"total compressed: {total / 1e6:.2f} MB")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output directory (default: data/corpus)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel groff processes for the man pages")
    parser.add_argument("--no-spm", action="store_true",
                        help="estimate tokens as 1.3 x words instead of "
                             "training a SentencePiece model")
    args = parser.parse_args(argv)

    versions = check_sources()
    sources = {
        None: load_linux_docs(),
        "bible": load_bible(),
        "python_docs": load_python_docs(),
        "postgres_docs": load_postgres_docs(),
        "manpages": load_manpages(args.jobs),
        "fortunes": load_fortunes(),
    }
    sets = build_sets(sources)
    tokens = None
    if not args.no_spm:
        with tempfile.TemporaryDirectory() as workdir:
            tokens = count_tokens(sets, workdir)
    copy_licences(args.out)
    report(write_corpus(sets, args.out, versions, tokens))


if __name__ == "__main__":
    main()
