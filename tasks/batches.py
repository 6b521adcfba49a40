"""A batch of task rows: padded into tensors (`pad_collate`), and the entries a model's forward takes
(`forward_inputs`). Shared by the training loop (tasks/training.py) and prediction (tasks/evaluation.py)."""
import inspect

import torch

from distil.losses import IGNORE_INDEX
from utils import unwrap


def pad_collate(rows, pad_token_id):
    """List of feature dicts -> dict of tensors; token lists padded to the longest row of the batch.

    Lists are input_ids (padded with pad_token_id), per-token labels (padded with -100, which no loss reads),
    attention_mask and token_type_ids (padded with 0); scalars (labels, positions, indices) become one tensor
    each.
    """
    batch = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], (list, tuple)):
            longest = max(len(v) for v in values)
            pad = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
            batch[key] = torch.tensor([list(v) + [pad] * (longest - len(v)) for v in values])  # (bs, seq_len)
        else:
            batch[key] = torch.tensor(values)  # (bs,)
    return batch


def forward_inputs(model, batch):
    """The batch entries this model's forward takes. Batches carry the tokenizer's segment ids (tokenised with
    return_token_type_ids=True, so a DistilBERT tokenizer's pairs have them too): a BERT teacher gets them, as it
    was fine-tuned with them; DistilBERT takes none; a model with one segment embedding (RoBERTa:
    type_vocab_size 1) keeps its default."""
    model = unwrap(model)
    accepted = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if getattr(model.config, "type_vocab_size", None) not in (0, 1):  # XLNet has no such field: it takes them
        names.append("token_type_ids")
    return {k: batch[k] for k in names if k in batch and k in accepted}
