"""The demo's data: a corpus of English prose that every Python installation has (the standard library's
docstrings and comments), a user's corpus file, the held-out split, and the downstream tasks: docstring or
comment? drawn from the same corpus, or the GLUE task folders of --glue_dir (scripts/demo.py).
"""
import ast
import functools
import os
import random
import re
import sysconfig

# The downstream task of the default corpus: is a paragraph of the standard library a docstring or a comment?
STDLIB_TASK = "docstring_or_comment"
HELDOUT_FRACTION = 0.05
MIN_WORDS = 8
# The stdlib's test suites are half its files but mostly code and fixtures, not prose; skipping them also
# cuts parsing from ~20 s to ~2 s.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


# ============================================================================================ corpus


def _docstrings(source):
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _comment_blocks(source):
    """Runs of consecutive full-line comments, each joined into one paragraph (trailing code comments are
    mostly fragments like `# noqa` or `# type: ignore`, so only whole-line ones are kept)."""
    block = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            text = stripped.lstrip("#").strip()
            if text:
                block.append(text)
                continue
        if block:
            yield " ".join(block)
            block = []
    if block:
        yield " ".join(block)


_WORD = re.compile(r"^[(\"']?[A-Za-z][a-z]*(?:'[a-z]+)?[)\"']?[.,;:!?]?[)\"']?$")


def looks_like_english(line):
    """Mostly plain words and no doctest or code markers: docstrings also hold signatures, tables and code."""
    if any(marker in line for marker in (">>>", "...", "::", "---", "\\")):
        return False
    words = line.split()
    if len(words) < MIN_WORDS:
        return False
    plain = sum(1 for w in words if _WORD.match(w))
    symbols = sum(line.count(c) for c in "=_{}[]<>|*#@$%^~`")
    return plain >= 0.75 * len(words) and symbols <= 2


def stdlib_files(root=None):
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)  # sorted: the same walk on every run
        files.extend(os.path.join(folder, n) for n in sorted(names) if n.endswith(".py"))
    return files


@functools.lru_cache(maxsize=4)  # the corpus step and the downstream task both read it: walk the stdlib once
def stdlib_paragraphs(root=None):
    """(paragraph, kind) for each English paragraph of the standard library's docstrings and comments, kind
    being "docstring" or "comment", deduplicated (a paragraph keeps the kind it first appeared with), in the
    order of the files. The same Python installation always gives the same list."""
    paragraphs, seen = [], set()
    for path in stdlib_files(root):
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            texts = [(text, "docstring") for text in _docstrings(source)]
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # e.g. lib2to3's deliberately broken fixtures
        texts.extend((text, "comment") for text in _comment_blocks(source))
        for text, kind in texts:
            for paragraph in re.split(r"\n\s*\n", text):
                line = " ".join(paragraph.split())
                if line not in seen and looks_like_english(line):
                    seen.add(line)
                    paragraphs.append((line, kind))
    return tuple(paragraphs)


def stdlib_corpus(seed=0, root=None):
    """English paragraphs from the standard library's docstrings and comments: deduplicated, shuffled
    with `seed`."""
    lines = [line for line, _ in stdlib_paragraphs(root)]
    random.Random(seed).shuffle(lines)
    return lines


def read_corpus(path, seed=0):
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [" ".join(line.split()) for line in f]
    lines = [line for line in lines if line]
    random.Random(seed).shuffle(lines)  # a file sorted by topic would otherwise hold out one topic
    return lines


def split_heldout(lines, fraction=HELDOUT_FRACTION):
    """(train, held-out): the first `fraction` of the (already shuffled) lines are held out."""
    n_heldout = max(1, round(fraction * len(lines)))
    return lines[n_heldout:], lines[:n_heldout]


# ============================================================================================ downstream task


def docstring_or_comment_rows(lines, kinds):
    """(paragraph, "docstring" | "comment") for the lines whose kind is known, in their order."""
    return [(line, kinds[line]) for line in lines if line in kinds]


def write_task_tsv(path, rows):
    """sentence<TAB>label lines under a header: the layout run_glue_w_distillation.py reads by default."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for text, label in rows:
            f.write(f"{text.replace(chr(9), ' ')}\t{label}\n")


def find_glue_tasks(glue_dir):
    """[(task name, train file, dev file)] for each GLUE task folder of glue_dir (SST-2/, CoLA/, ... holding
    train.tsv and dev.tsv, or dev_matched.tsv for MNLI), in the order of the Distil* README's table."""
    from tasks.glue import GLUE_ORDER, get_task

    found = {}
    for name in sorted(os.listdir(glue_dir)):
        task = get_task(name)
        folder = os.path.join(glue_dir, name)
        dev = next((os.path.join(folder, n) for n in ("dev.tsv", "dev_matched.tsv")
                    if os.path.isfile(os.path.join(folder, n))), None)
        if task is not None and dev and os.path.isfile(os.path.join(folder, "train.tsv")):
            found[task.name] = (task.name, os.path.join(folder, "train.tsv"), dev)
    return [found[t] for t in GLUE_ORDER if t in found]


