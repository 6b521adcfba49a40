"""Pairing a task run's models with the task: reading a fine-tuned head in the task's label order."""
import pytest
import torch

from tasks.models import label_permutation
from utils import UserError

TASK = ("entailment", "neutral", "contradiction")


def test_label_permutation_reads_a_head_in_the_task_order():
    # A head whose outputs are (contradiction, entailment, neutral), as a config loaded from disk has it.
    id2label = {0: "contradiction", 1: "entailment", 2: "neutral"}
    perm = label_permutation(id2label, TASK, "--teacher_name_or_path t")
    logits = torch.tensor([[5.0, 1.0, 2.0]])  # the model's scores for contradiction, entailment, neutral
    in_task_order = logits[..., perm]
    assert [TASK[i] for i in in_task_order.argmax(-1).tolist()] == ["contradiction"]
    assert in_task_order.tolist() == [[1.0, 2.0, 5.0]]  # entailment, neutral, contradiction
    assert label_permutation({"1": "entailment", "0": "contradiction", "2": "neutral"}, TASK, "x") == perm


def test_label_permutation_accepts_the_task_order_and_generic_names():
    assert label_permutation(dict(enumerate(TASK)), TASK, "x") is None
    assert label_permutation({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, TASK, "x") is None
    assert label_permutation({0: "Entailment", 1: "NEUTRAL", 2: "contradiction"}, TASK, "x") is None
    assert label_permutation({0: "NEGATIVE", 1: "POSITIVE"}, ("positive", "negative"), "x") == [1, 0]


@pytest.mark.parametrize("id2label", [{0: "yes", 1: "maybe", 2: "no"}, {0: "entailment", 1: "neutral"},
                                      {0: "entailment", 1: "entailment", 2: "contradiction"},
                                      {0: "LABEL_1", 1: "LABEL_0", 2: "LABEL_2"}])
def test_label_permutation_refuses_names_it_cannot_match(id2label):
    with pytest.raises(UserError, match=r"^--model_name_or_path m: the model's labels \(.*\) are not the task's "
                                        r"\(entailment, neutral, contradiction\)"):
        label_permutation(id2label, TASK, "--model_name_or_path m")


def test_clamp_takes_a_negative_position_limit_as_none():
    """XLNet's relative positions have no limit: its config says max_position_embeddings = -1."""
    import argparse

    from transformers import BertConfig, BertForQuestionAnswering, XLNetConfig, XLNetForQuestionAnsweringSimple

    from tasks.models import clamp_max_seq_length

    class Tokenizer:
        model_max_length = int(1e30)  # a tokenizer saved without a limit

    xlnet = XLNetForQuestionAnsweringSimple(XLNetConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, d_inner=20))
    assert xlnet.config.max_position_embeddings == -1
    args = argparse.Namespace(max_seq_length=384)
    clamp_max_seq_length(args, Tokenizer(), xlnet, None)
    assert args.max_seq_length == 384
    bert = BertForQuestionAnswering(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=20,
                                               max_position_embeddings=64))
    clamp_max_seq_length(args, Tokenizer(), xlnet, bert)
    assert args.max_seq_length == 64
