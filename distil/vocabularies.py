"""Teacher and student vocabularies: equal, or the teacher's extends the student's (the cheap case).

A teacher whose embedding table only adds ids at the end of the student's (e.g. padded tables, 152,064 vs
151,936 rows; or tokens the teacher's own tokenizer appended, with --tokenizer_name the student's) is accepted:
the ids they share must be the same tokens, the run's tokenizer may not hold an id the student lacks (the
exported student ships it), and the teacher's extra output logits are dropped: its LM head and embeddings are
cut to the student's size, so every logit, probability and loss is over the student's ids alone (inputs never
hold the dropped ids: the data must fit the student's vocabulary). Any other difference is refused with one line.

Whenever the run's tokenizer is not the teacher's own (--tokenizer_name), the two token -> id tables are
compared id by id, whatever the sizes: a table of the teacher's size can still give an id another token, and
the teacher would then read the data as other text.
"""
import os

from distil.models import load_tokenizer
from utils import UserError, logger

# Files any Hugging Face tokenizer folder holds at least one of: without them a folder has no tokenizer at all.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def _id_to_token(tokenizer, limit):
    """{id: token} of a tokenizer for the ids below limit."""
    return {i: tok for tok, i in tokenizer.get_vocab().items() if i < limit}


def teacher_tokenizer_to_compare(teacher_type, teacher_name, tokenizer_name, mlm, assume_same_token_ids=False):
    """The teacher's own tokenizer when the run's is another one (--tokenizer_name), for check_teacher_vocabulary
    to compare token by token; None when the run's tokenizer is the teacher's own (no --tokenizer_name).

    A teacher folder without a tokenizer gives nothing to compare with: refused, unless assume_same_token_ids
    (--assume_same_token_ids) takes the run's table to be the teacher's (None, with a warning)."""
    if tokenizer_name is None:
        return None
    if os.path.isdir(teacher_name) and not any(os.path.isfile(os.path.join(teacher_name, name))
                                               for name in _TOKENIZER_FILES):
        if not assume_same_token_ids:
            raise UserError(f"--teacher_name {teacher_name}: no tokenizer there to check that --tokenizer_name "
                            f"{tokenizer_name} gives each token the teacher's id; save the teacher's tokenizer "
                            "there, or add --assume_same_token_ids to go on without the check")
        logger.warning("--assume_same_token_ids: --teacher_name %s has no tokenizer; the token ids of "
                       "--tokenizer_name %s are taken to be the teacher's, unchecked.", teacher_name, tokenizer_name)
        return None
    return load_tokenizer(teacher_type, teacher_name, "--teacher_name", mlm)


def check_teacher_vocabulary(teacher, student_vocab, tokenizer, student_flag, student_value, teacher_name,
                             teacher_tokenizer=None, tokenizer_name=None):
    """Accept the teacher's vocabulary for a student with student_vocab ids, cutting the teacher's extra ids.

    tokenizer: the run's (the student's) tokenizer; teacher_tokenizer: the teacher's own when the run's is
    another one (teacher_tokenizer_to_compare): their token -> id tables are then compared below the
    student's size, whatever the sizes (equal sizes do not make equal tables). tokenizer_name names the run's
    tokenizer in messages. Raises UserError naming the flags when the vocabularies are not equal or an
    extension. A teacher built on the meta device (--fsdp) is told which rows of its checkpoint to read.
    """
    t_vocab = teacher.config.vocab_size
    where = (f"student vocabulary ({student_vocab} tokens, {student_flag} {student_value}) vs the teacher's "
             f"({t_vocab} tokens, --teacher_name {teacher_name})")
    if t_vocab < student_vocab:
        raise UserError(f"{where}: the teacher's is smaller; only a teacher vocabulary that extends the student's "
                        "(extra ids at the end) is supported")
    if teacher_tokenizer is not None and teacher_tokenizer is not tokenizer:
        mine, theirs = _id_to_token(tokenizer, student_vocab), _id_to_token(teacher_tokenizer, student_vocab)
        differ = sorted(i for i in mine.keys() | theirs.keys() if mine.get(i) != theirs.get(i))
        if differ:
            i = differ[0]
            run = f"--tokenizer_name {tokenizer_name}" if tokenizer_name else "the run's tokenizer"
            raise UserError(f"{run}: id {i} is {mine.get(i)!r} there and {theirs.get(i)!r} for the teacher's "
                            f"tokenizer (--teacher_name {teacher_name}); {len(differ)} ids differ, and the teacher "
                            "would read each as another token: use a tokenizer with the teacher's token ids")
    if t_vocab == student_vocab:
        return
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= student_vocab:
        raise UserError(f"{where}: the tokenizer has a token with id {top}, which the student cannot predict")
    teacher.resize_token_embeddings(student_vocab, mean_resizing=False)  # a cut: the kept rows are untouched
    streamed = getattr(teacher, "streamed_weights", None)  # weights still in the checkpoint (--fsdp)
    if streamed is not None:
        streamed.cut_vocabulary(t_vocab, student_vocab)
    logger.info("The teacher's vocabulary extends the student's: its last %d output logits are dropped (%d -> %d).",
                t_vocab - student_vocab, t_vocab, student_vocab)
