"""Named-entity data: CoNLL-style column files, the label list, and sub-word windows that keep every word.

    data = read_column_file("btc/train.conll", "--train_file")           # a ColumnFile: sentences of words + tags
    data = read_column_file("germeval/dev.tsv", "--train_file", tag_column=4)  # GermEval's nested tags
    labels = label_list(data.sentences)                                  # ["O", "B-LOC", "I-LOC", ...]
    check_tags(data, labels, "from --train_file")                        # an unknown tag: one line, exit 2
    rows = sentence_windows(tokenizer, [s.words for s in data.sentences], tag_ids, max_seq_length)
    tags = word_predictions(rows, row_logits, n_sentences, labels)      # one predicted tag per word
    write_predictions(data, tags, "predictions.txt")                     # token, gold and predicted tag per line

Column files: one token per line, columns separated by tabs (or, in a line without a tab, by spaces, as in
CoNLL-2003), a blank line between sentences, `-DOCSTART-` lines skipped. `--data_format germeval` (found by
itself from a first line `#<tab>...` followed by a four-column token line `1<tab>...`): the token is the
second column, the outer tag the third (the nested one the fourth), and lines starting with `#` are comments;
elsewhere `#` is an ordinary token (tweets have hashtags). Tags are BIO (IOB2) or IOB1: O, B-TYPE, I-TYPE.

Windows: a word's label sits on its first sub-token; its other sub-tokens, and the special tokens, carry -100
(ignored by the loss and the metric). A sentence longer than --max_seq_length is cut into windows of whole
words, one after the other without overlap, so every word is scored in exactly one window; a single word
longer than a window keeps its first sub-tokens. A token the tokenizer turns into nothing (an empty or
whitespace token, a control character) is replaced by the unknown token, so that it still gets a prediction.
"""
import dataclasses
import os
from typing import List

from distil.losses import IGNORE_INDEX
from utils import UserError

DOCSTART = "-DOCSTART-"
FORMATS = ("auto", "conll", "germeval")


@dataclasses.dataclass
class Sentence:
    words: List[str]
    tags: List[str]
    lines: List[int]  # each token's line number in the file (from 1), for error messages
    fields: List[List[str]]  # each token line's columns as read
    header: List[str]  # comment lines just before the sentence (GermEval's source line)


@dataclasses.dataclass
class ColumnFile:
    path: str
    sentences: List[Sentence]
    tag_column: int  # 0-based
    separator: str  # "\t", or " " for files without tabs


# ------------------------------------------------------------------------------------------------ reading


def _read_lines(path, flag):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot be read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{flag} {path}: not UTF-8 text (byte {exc.start})") from None
    # Split on line ends only: str.splitlines would also split at the C1 controls some tokens hold.
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def _split(line):
    """Columns of a token line: tab-separated, or space-separated in a line without a tab. Tokens may be
    empty or spaces in tab-separated files (tweets)."""
    return line.split("\t") if "\t" in line else line.split()


def detect_format(lines):
    """'germeval' for a file that opens with a `#` comment line then a four-column token line numbered 1."""
    content = [line for line in lines[:10] if line.strip()]
    if len(content) >= 2 and content[0].startswith("#\t"):
        second = content[1].split("\t")
        if len(second) == 4 and second[0] == "1":
            return "germeval"
    return "conll"


def check_tag(tag, where):
    """BIO / IOB1 tags only: O, B-TYPE or I-TYPE."""
    if tag != "O" and not (len(tag) > 2 and tag[:2] in ("B-", "I-")):
        raise UserError(f"{where}: tag {tag!r} is not O, B-TYPE or I-TYPE (BIO or IOB1 tags)")


def read_column_file(path, flag, data_format="auto", tag_column=None, token_column=None, with_tags=True):
    """The sentences of a column file. tag_column / token_column: column numbers counted from 1 (defaults: the
    last column and the first for CoNLL; 3 and 2 for GermEval). Any malformed line is a UserError naming the
    file and the line. with_tags=False: unlabelled text, a line needs only its token; tags, if any, are not
    read (each sentence's tags are None)."""
    lines = _read_lines(path, flag)
    if data_format == "auto":
        data_format = detect_format(lines)
    germeval = data_format == "germeval"
    if token_column is None:
        token_column = 2 if germeval else 1
    default_tag = 3 if germeval else None  # None: the last column
    if tag_column is not None and tag_column < 1 or token_column < 1:
        raise UserError(f"--tag_column / --token_column count columns from 1, got {tag_column} / {token_column}")
    sentences, current, header = [], None, []
    separator = None
    for number, line in enumerate(lines, start=1):
        where = f"{flag} {path}: line {number}"
        if germeval and line.startswith("#"):
            header.append(line)
            continue
        if not line.strip() and "\t" not in line:  # a blank line ends the sentence
            if current is not None:
                sentences.append(current)
            current = None
            continue
        fields = _split(line)
        if fields and fields[0] == DOCSTART:
            continue
        separator = separator or ("\t" if "\t" in line else " ")
        if not with_tags:
            if len(fields) < token_column:
                raise UserError(f"{where}: {len(fields)} column(s), but the token is in column {token_column} "
                                f"(--token_column); is the format right (--data_format)?")
            tag = None
        else:
            tag_at = (tag_column or default_tag or len(fields)) - 1
            needed = max(tag_at, token_column - 1) + 1
            if len(fields) < needed or len(fields) < 2:
                column = f"--tag_column {tag_at + 1}" if tag_at + 1 >= needed else f"--token_column {token_column}"
                raise UserError(f"{where}: {len(fields)} column(s), but a token line needs a token and a tag "
                                f"({column}); is the format right (--data_format, --tag_column)?")
            tag = fields[tag_at]
            check_tag(tag, where)
        if current is None:
            current = Sentence([], [], [], [], header)
            header = []
        current.words.append(fields[token_column - 1])
        current.tags.append(tag)
        current.lines.append(number)
        current.fields.append(fields)
    if current is not None:
        sentences.append(current)
    if not sentences:
        raise UserError(f"{flag} {path}: no token lines (one token{' and its tag' if with_tags else ''} per line, a "
                        f"blank line between sentences)")
    return ColumnFile(path, sentences, (tag_column or default_tag or 0) - 1, separator or "\t")


def hub_sentences(dataset, source, tokens_column="tokens", tags_column="ner_tags"):
    """Sentences of a hub data set (a datasets.Dataset with a list-of-words column and a list-of-tags column,
    tags as strings or as ids of a ClassLabel), for the same pipeline as the files."""
    for column in (tokens_column, tags_column):
        if column not in dataset.column_names:
            raise UserError(f"{source}: no column {column!r} (columns: {', '.join(dataset.column_names)}); name "
                            f"it with --{'tokens' if column == tokens_column else 'tag'}_column")
    feature = dataset.features[tags_column]
    inner = getattr(feature, "feature", None)
    names = getattr(inner, "names", None)
    sentences = []
    for row, (words, tags) in enumerate(zip(dataset[tokens_column], dataset[tags_column]), start=1):
        if names is not None:
            tags = [names[t] for t in tags]
        elif tags and not isinstance(tags[0], str):
            raise UserError(f"{source}: column {tags_column!r} holds tag ids without names; the tags must be "
                            f"strings or a ClassLabel sequence")
        if len(words) != len(tags):
            raise UserError(f"{source}: row {row}: {len(words)} words but {len(tags)} tags")
        for tag in tags:
            check_tag(tag, f"{source}: row {row}")
        if words:
            fields = [[word, tag] for word, tag in zip(words, tags)]
            sentences.append(Sentence(list(words), list(tags), [row] * len(words), fields, []))
    if not sentences:
        raise UserError(f"{source}: no sentences")
    return ColumnFile(source, sentences, 1, "\t")


# ------------------------------------------------------------------------------------------------ labels


def sort_labels(tags):
    """O first, then by entity type, B- before I- (a stable order whatever the file's)."""
    return sorted(set(tags), key=lambda t: (t != "O", t[2:], t[:2]))


def label_list(sentences):
    return sort_labels(tag for s in sentences for tag in s.tags)


def parse_labels(value):
    """--labels: a comma-separated list, or a file with one label per line."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
    else:
        labels = [label.strip() for label in value.split(",") if label.strip()]
    for label in labels:
        check_tag(label, f"--labels {value}")
    if len(set(labels)) != len(labels) or not labels:
        raise UserError(f"--labels {value}: give each label once (got {len(labels)} label(s), "
                        f"{len(set(labels))} distinct)")
    return labels


def check_tags(data, labels, origin):
    """Every tag of `data` is one of `labels`; the first that is not is one line naming its file and line."""
    known = set(labels)
    for s in data.sentences:
        for tag, line in zip(s.tags, s.lines):
            if tag not in known:
                raise UserError(f"{data.path}: line {line}: tag {tag!r} is not among the {len(labels)} labels "
                                f"{origin}; give them all with --labels")


# ------------------------------------------------------------------------------------------------ windows


def _piece_counts(tokenizer, sentences):
    """How many sub-tokens each word becomes (special tokens left out), one list per sentence."""
    encoded = tokenizer(sentences, is_split_into_words=True, add_special_tokens=False)
    out = []
    for i, words in enumerate(sentences):
        counts = [0] * len(words)
        for word in encoded.word_ids(i):
            counts[word] += 1
        out.append(counts)
    return out


def visible_words(tokenizer, sentences):
    """(sentences with each word the tokenizer turns into nothing replaced by the unknown token, piece counts)."""
    counts = _piece_counts(tokenizer, sentences)
    placeholder = tokenizer.unk_token or tokenizer.pad_token
    fixed = [[w if n else placeholder for w, n in zip(words, c)] for words, c in zip(sentences, counts)]
    if fixed != sentences:
        counts = _piece_counts(tokenizer, fixed)
    return fixed, [[max(n, 1) for n in c] for c in counts]


def sentence_windows(tokenizer, sentences, tag_ids, max_seq_length):
    """Rows of input_ids / attention_mask (/ token_type_ids) / labels for the sentences, and their place:
    `sentence` (index) and `first_word` (the window's first word). tag_ids: per sentence, each word's label
    id (None: predicting without tags). Every word is scored once, at its first sub-token."""
    room = max_seq_length - tokenizer.num_special_tokens_to_add(pair=False)
    if room < 1:
        raise UserError(f"--max_seq_length {max_seq_length} leaves no room for a word next to the special tokens")
    sentences, counts = visible_words(tokenizer, sentences)
    chunks, places = [], []  # the words of each window; (sentence, first word)
    for index, (words, sizes) in enumerate(zip(sentences, counts)):
        start = 0
        while start < len(words):
            end, used = start + 1, sizes[start]
            while end < len(words) and used + sizes[end] <= room:
                used += sizes[end]
                end += 1
            chunks.append(words[start:end])
            places.append((index, start))
            start = end
    # A lone word longer than the room is cut by the truncation: its first sub-tokens, which carry its label, stay.
    encoded = tokenizer(chunks, is_split_into_words=True, truncation=True, max_length=max_seq_length)
    rows = {key: list(encoded[key]) for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded}
    rows.update(labels=[], sentence=[index for index, _ in places], first_word=[start for _, start in places])
    for r, (index, start) in enumerate(places):
        labels, seen = [], set()
        for word in encoded.word_ids(r):
            first = word is not None and word not in seen
            seen.add(word)
            labels.append((tag_ids[index][start + word] if tag_ids is not None else 0) if first else IGNORE_INDEX)
        if len(seen - {None}) != len(chunks[r]):
            raise RuntimeError(f"window {r}: {len(chunks[r])} words, {len(seen - {None})} of them tokenised")
        rows["labels"].append(labels)
    return rows


def word_predictions(rows, row_logits, n_sentences, labels):
    """Each word's predicted tag: the arg-max at its first sub-token, read from the window that scores it.

    rows: the sentence_windows output (labels mark the scored positions); row_logits: one (length, n_labels)
    array per row, in task label order."""
    out = [[] for _ in range(n_sentences)]
    order = sorted(range(len(row_logits)), key=lambda r: (rows["sentence"][r], rows["first_word"][r]))
    for r in order:
        scored = [i for i, label in enumerate(rows["labels"][r]) if label != IGNORE_INDEX]
        sentence = out[rows["sentence"][r]]
        if len(sentence) != rows["first_word"][r]:  # windows follow each other word by word: a gap is a bug
            raise RuntimeError(f"window {r} starts at word {rows['first_word'][r]}, {len(sentence)} words done")
        sentence.extend(labels[int(row_logits[r][i].argmax())] for i in scored)
    return out


# ------------------------------------------------------------------------------------------------ writing


def write_predictions(data, predictions, path):
    """The CoNLL evaluation layout: one line per word, `token gold predicted` (the input's separator: a tab, or a
    space for a file without tabs), a blank line between sentences; comment and -DOCSTART- lines left out. What
    conlleval reads (its last two columns), a diff of the last two columns shows the errors, and this reader
    reads it back (token first, the predicted tag last)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for s, tags in zip(data.sentences, predictions):
            for word, gold, tag in zip(s.words, s.tags, tags):
                f.write(data.separator.join((word, gold, tag)) + "\n")
            f.write("\n")
    os.replace(tmp, path)
