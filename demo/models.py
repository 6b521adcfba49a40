"""The demo's tokenizer and models, made from scratch: a WordPiece vocabulary learnt from the corpus, a small BERT
teacher's config and its DistilBERT student's (scripts/demo.py; the sizes are its presets).
"""
import os

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(lines, folder, vocab_size, max_len):
    """A lowercase WordPiece vocabulary learnt from the training lines, saved as a BertTokenizer folder."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    os.makedirs(folder, exist_ok=True)
    wordpiece.save_model(folder)
    tokenizer = BertTokenizer(os.path.join(folder, "vocab.txt"), do_lower_case=True, model_max_length=max_len)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_model_configs(folder, tokenizer, preset):
    from transformers import BertConfig, DistilBertConfig

    t = preset["teacher"]
    teacher = BertConfig(vocab_size=len(tokenizer), hidden_size=t["hidden"], num_hidden_layers=t["layers"],
                         num_attention_heads=t["heads"], intermediate_size=t["ffn"],
                         max_position_embeddings=preset["max_len"], pad_token_id=tokenizer.pad_token_id,
                         # A few minutes of pretraining is far from overfitting: dropout would only slow it.
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    # The student has the teacher's width (the cosine loss compares hidden states) and fewer layers.
    student = DistilBertConfig(vocab_size=len(tokenizer), dim=t["hidden"], n_layers=len(preset["student_layers"]),
                               n_heads=t["heads"], hidden_dim=t["ffn"], max_position_embeddings=preset["max_len"],
                               sinusoidal_pos_embds=False, pad_token_id=tokenizer.pad_token_id)
    paths = os.path.join(folder, "teacher_config.json"), os.path.join(folder, "student_config.json")
    os.makedirs(folder, exist_ok=True)
    teacher.to_json_file(paths[0])
    student.to_json_file(paths[1])
    return paths

