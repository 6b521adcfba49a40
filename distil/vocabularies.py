"""Teacher and student vocabularies: equal, or the teacher's extends the student's (the cheap case).

A teacher whose embedding table only adds ids at the end of the student's (e.g. padded tables, 152,064 vs
151,936 rows; or tokens the teacher's own tokenizer appended, with --tokenizer_name the student's) is accepted:
the ids they share must be the same tokens (compared one by one when the teacher's tokenizer is not the run's),
the run's tokenizer may not hold an id the student lacks (the exported student ships it), and the teacher's
extra output logits are dropped: its LM head and embeddings are cut to the student's size, so every logit,
probability and loss is over the student's ids alone (inputs never hold the dropped ids: the data must fit the
student's vocabulary). Any other difference is refused with one line.
"""
from utils import UserError, logger


def _id_to_token(tokenizer, limit):
    """{id: token} of a tokenizer for the ids below limit."""
    return {i: tok for tok, i in tokenizer.get_vocab().items() if i < limit}


def check_teacher_vocabulary(teacher, student_vocab, tokenizer, student_flag, student_value, teacher_name,
                             teacher_tokenizer=None):
    """Accept the teacher's vocabulary for a student with student_vocab ids, cutting the teacher's extra ids.

    tokenizer: the run's (the student's) tokenizer; teacher_tokenizer: the teacher's own when it is another one
    (its shared ids are then compared token by token). Raises UserError naming the flags when the vocabularies
    are not equal or an extension.
    """
    t_vocab = teacher.config.vocab_size
    if t_vocab == student_vocab:
        return
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
            raise UserError(f"{where}: id {i} is {mine.get(i)!r} for the student's tokenizer and {theirs.get(i)!r} "
                            f"for the teacher's ({len(differ)} shared ids differ); the teacher's vocabulary must "
                            "extend the student's")
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= student_vocab:
        raise UserError(f"{where}: the tokenizer has a token with id {top}, which the student cannot predict")
    teacher.resize_token_embeddings(student_vocab, mean_resizing=False)  # a cut: the kept rows are untouched
    logger.info("The teacher's vocabulary extends the student's: its last %d output logits are dropped (%d -> %d).",
                t_vocab - student_vocab, t_vocab, student_vocab)
