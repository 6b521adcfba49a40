"""Conversations: reading chat data, rendering it with the tokenizer's chat template, and which tokens a loss reads.

Input records (one JSON object a line, or the rows of a local json / jsonl / parquet `datasets` file) hold either
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}     (TRL's conversational form)
or  {"prompt": "..." or [messages], "completion": "..." or [messages]}                 (TRL's prompt-completion form)
A string prompt is one user turn, a string completion one assistant turn.

The loss mask marks the tokens of every assistant turn (its content and the template's end-of-turn token, so that
the student learns to stop; not the whitespace the template puts between turns). Where the template marks the
assistant's text with `{% generation %}` the tokenizer's own `return_assistant_tokens_mask` gives the mask. Other
templates are rendered once per assistant turn: the conversation up to that turn with the generation prompt, and
up to its end; the text between the two is the turn's span. A template that renders a prefix differently from
the whole conversation (some drop earlier turns' reasoning) makes the spans ambiguous: that is refused rather than
masked wrongly.
"""
import json
import os
import re

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


class ConversationError(ValueError):
    """A record that is not a conversation we can train on; the message names the file and line."""


# ------------------------------------------------------------------------------------------------ reading


def _message_list(value, where, field):
    if isinstance(value, str):
        return None
    if not isinstance(value, list) or not value:
        raise ConversationError(f"{where}: '{field}' must be a non-empty list of messages or a string")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ConversationError(f"{where}: '{field}' message {i} is not an object with string 'role' and "
                                    "'content'")
        if message["role"] not in ROLES:
            raise ConversationError(f"{where}: '{field}' message {i} has role {message['role']!r} (expected one "
                                    f"of {', '.join(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_messages(record, where, messages_column="messages"):
    """The record's conversation as a list of {'role', 'content'} (checked), from `messages_column` or from
    prompt / completion."""
    if not isinstance(record, dict):
        raise ConversationError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if messages_column in record:
        return _message_list(record[messages_column], where, messages_column) or \
            _fail_string(where, messages_column)
    if "prompt" in record:
        prompt = _message_list(record["prompt"], where, "prompt") or \
            [{"role": "user", "content": record["prompt"]}]
        completion = record.get("completion")
        if completion is None:
            return prompt
        return prompt + (_message_list(completion, where, "completion") or
                         [{"role": "assistant", "content": completion}])
    raise ConversationError(f"{where}: no '{messages_column}' and no 'prompt' / 'completion' field "
                            f"(keys: {', '.join(sorted(record)) or 'none'})")


def _fail_string(where, field):
    raise ConversationError(f"{where}: '{field}' must be a list of messages, not a string")


def split_prompt(messages):
    """(prompt messages, reference answer or None): everything before the last assistant turn, and that turn's
    text. A conversation without an assistant turn is all prompt."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return messages[:i], messages[i]["content"]
    return messages, None


def read_records(path, flag="--file_path"):
    """Yield (where, record): JSON Lines (where = 'path:line'), a JSON array, or a parquet file (where =
    'path: row n'). Blank lines are skipped; a line that is not JSON is an error naming its number."""
    if not os.path.isfile(path):
        raise ConversationError(f"{flag} {path}: no such file")
    if path.endswith(".parquet"):
        import datasets

        try:
            rows = datasets.load_dataset("parquet", data_files=path, split="train")
        except Exception as exc:  # a broken parquet fails in pyarrow in many ways
            raise ConversationError(f"{flag} {path}: cannot read it as parquet ({str(exc).splitlines()[0]})") \
                from None
        for i, row in enumerate(rows):
            yield f"{path}: row {i}", row
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.read(1 << 12).lstrip()
    if first.startswith("["):  # one JSON array of records
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConversationError(f"{flag} {path}: not valid JSON ({exc})") from None
        for i, record in enumerate(records):
            yield f"{path}: record {i}", record
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ConversationError(f"{path}:{line_no}: not a JSON object ({exc})") from None
            yield f"{path}:{line_no}", record


# ---------------------------------------------------------------------------------------------- rendering


def check_chat_template(tokenizer, flag, name):
    if not getattr(tokenizer, "chat_template", None):
        raise ConversationError(f"{flag} {name}: the tokenizer has no chat template (chat_template in "
                                "tokenizer_config.json or chat_template.jinja); conversations cannot be rendered")


def has_generation_markers(tokenizer):
    """Whether the chat template marks the assistant's text with {% generation %} (return_assistant_tokens_mask)."""
    return bool(_GENERATION_MARKER.search(tokenizer.chat_template or ""))


def _apply(tokenizer, messages, where, **kwargs):
    """tokenizer.apply_chat_template, its failures (a template that raises on a role or an order it does not
    support, in jinja's own exception types) reported as this record's error."""
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as exc:
        raise ConversationError(f"{where}: the chat template cannot render this conversation "
                                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _render(tokenizer, messages, where, add_generation_prompt=False):
    return _apply(tokenizer, messages, where, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages, where=""):
    """(rendered text, [(start, end) character span of each assistant turn]) by rendering conversation prefixes.

    A turn's span runs from the end of the prefix rendered with the generation prompt to the end of the prefix
    that includes the turn, less trailing whitespace (the template's separator between turns, not the answer)."""
    text = _render(tokenizer, messages, where)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if k == 0:  # transformers renders no empty conversation: where the template's preamble ends is unknown
            raise ConversationError(f"{where}: the conversation opens with an assistant turn; put a system or user "
                                    "turn first, or binarize with --train_on all")
        before = _render(tokenizer, messages[:k], where, add_generation_prompt=True)
        through = _render(tokenizer, messages[: k + 1], where)
        if not through.startswith(before) or not text.startswith(through):
            raise ConversationError(f"{where}: the chat template renders a conversation's beginning differently "
                                    f"from the whole (assistant turn {k}); its assistant spans cannot be derived. "
                                    "Add {% generation %} markers to the template, or --train_on all")
        end = len(through.rstrip())
        spans.append((len(before), max(end, len(before))))
    return text, spans


def _mask_from_spans(offsets, spans):
    """A token is masked when its characters overlap a span (as return_assistant_tokens_mask decides)."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    return mask


def render_with_mask(tokenizer, messages, where="", train_on="assistant"):
    """(token ids, loss mask (bool per token), turn ends) of one conversation rendered with the chat template.

    turn_ends: for each assistant turn, the number of tokens up to its last masked token: where a conversation
    may be cut and still end on a whole answer. train_on='all': every token is a target."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError(f"{where}: the conversation has no assistant turn (nothing to train on)")
    if train_on == "all":
        ids = list(_apply(tokenizer, messages, where, tokenize=True, return_dict=True)["input_ids"])
        return ids, np.ones(len(ids), dtype=bool), [len(ids)]
    if has_generation_markers(tokenizer):
        out = _apply(tokenizer, messages, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), np.asarray(out["assistant_masks"], dtype=bool)
    else:
        text, spans = assistant_char_spans(tokenizer, messages, where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, mask = list(enc["input_ids"]), _mask_from_spans(enc["offset_mapping"], spans)
    if not mask.any():
        raise ConversationError(f"{where}: the assistant turns render to no token")
    # a turn ends where a run of masked tokens ends
    edges = np.flatnonzero(np.diff(np.concatenate([mask.astype(np.int8), [0]])) == -1) + 1
    return ids, mask, [int(e) for e in edges]


def fit_length(ids, mask, turn_ends, max_len):
    """The conversation cut after its last assistant turn that fits in max_len tokens, or None when even the
    first does not: never a cut through an answer."""
    if len(ids) <= max_len:
        return ids, mask
    fitting = [end for end in turn_ends if end <= max_len]
    if not fitting:
        return None
    return ids[: fitting[-1]], mask[: fitting[-1]]


def end_of_turn_ids(tokenizer):
    """Token ids that end an assistant turn: the tokenizer's EOS and, when the template closes a turn with a
    special token of its own (<|im_end|>, <|eot_id|>), that token: generation stops at any of them."""
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
    ids, mask, _ = render_with_mask(tokenizer, probe, where="end-of-turn probe")
    last = ids[int(np.flatnonzero(mask)[-1])]
    if last in set(tokenizer.all_special_ids):
        stop.add(int(last))
    if not stop:
        raise ConversationError("the tokenizer has no EOS token and its template ends a turn with no special token: "
                                "generation would never stop")
    return sorted(stop)


def prompt_ids(tokenizer, messages):
    """The prompt rendered for generation: the messages and the template's assistant header."""
    return list(_apply(tokenizer, messages, "prompt", tokenize=True, return_dict=True,
                       add_generation_prompt=True)["input_ids"])
