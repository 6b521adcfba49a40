"""The loop computes logits only at the rows a loss reads: they must equal the full model's logits there."""
import pytest
import torch

from distil.models import RowLogitsLM, split_lm_head


def _models():
    from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, GPT2Config,
                              GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForMaskedLM)

    small = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    return {
        "bert": BertForMaskedLM(BertConfig(**small)),
        "distilbert": DistilBertForMaskedLM(DistilBertConfig(vocab_size=97, dim=32, n_layers=2, n_heads=2, hidden_dim=37)),
        "roberta": RobertaForMaskedLM(RobertaConfig(**small, pad_token_id=1, max_position_embeddings=40)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=40)),
        "llama": LlamaForCausalLM(LlamaConfig(**small, num_key_value_heads=1)),
    }


@pytest.mark.parametrize("name, attention", [(name, "sdpa") for name in ("bert", "distilbert", "roberta", "gpt2", "llama")]
                         + [(name, "eager") for name in ("bert", "distilbert", "roberta")])
def test_row_logits_equal_full_forward(name, attention):
    """Also checks the 4D mask the wrapper prepares for encoders, in each attention implementation's format."""
    torch.manual_seed(0)
    model = _models()[name].eval()
    model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    assert split_lm_head(model) is not None  # the fast path is the one under test
    ids = torch.randint(5, 97, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 4:] = False
    rows = torch.tensor([0, 3, 10, 12, 17, 22, 25])  # a sparse subset of the 33 flat positions
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        logits, hidden = RowLogitsLM(model)(ids, mask, rows)
    torch.testing.assert_close(logits, full.logits.flatten(0, 1)[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, full.hidden_states[-1], rtol=1e-5, atol=1e-5)


def test_unknown_models_fall_back_to_the_full_forward():
    from transformers import AlbertConfig, AlbertForMaskedLM

    model = AlbertForMaskedLM(AlbertConfig(vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=20)).eval()
    assert split_lm_head(model) is None
    ids = torch.randint(0, 50, (2, 6))
    rows = torch.tensor([1, 7])
    with torch.no_grad():
        logits, _ = RowLogitsLM(model)(ids, torch.ones_like(ids), rows)
        full = model(input_ids=ids).logits
    torch.testing.assert_close(logits, full.flatten(0, 1)[rows])


def test_wrapper_does_not_duplicate_parameters():
    model = _models()["distilbert"]
    assert len(list(RowLogitsLM(model).parameters())) == len(list(model.parameters()))
