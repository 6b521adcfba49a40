"""Running a fine-tuned model over an evaluation set, on every rank, and writing its scores.

    outputs = predict(model, eval_set, ["start_logits", "end_logits"], pad_token_id, batch_size=64, ctx=ctx)
    # {"start_logits": [one (length,) array per row, in eval_set order], ...}  on every rank

Rows are sorted by length and batched (little padding), each rank runs every world_size-th batch, and the
outputs are gathered and put back in the data set's order, so the task script computes its metric on the
whole set whatever the number of processes. Each row's outputs are cut to the row's own length.
"""
import os

import numpy as np
import torch

from tasks.batches import forward_inputs, pad_collate
from utils import write_json_atomic


@torch.no_grad()
def predict(model, dataset, output_names, pad_token_id, batch_size, ctx, amp_dtype=None, per_position=False):
    """{name: [numpy array per row]} for each output of the model named in output_names (e.g. "logits").

    per_position: the outputs are (bs, seq_len) (span logits), each row's cut to its own length; otherwise
    they are (bs, n) and kept whole.
    """
    was_training = model.training
    model.eval()
    order = np.argsort(np.asarray(dataset.lengths), kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine = {name: {} for name in output_names}
    from tqdm import tqdm

    mine_batches = range(ctx.global_rank, len(batches), ctx.world_size)
    try:
        for b in tqdm(mine_batches, desc="Evaluating", unit="batch", disable=not ctx.is_master, mininterval=2):
            indices = [int(i) for i in batches[b]]
            rows = [dataset[i] for i in indices]
            batch = {k: v.to(ctx.device) for k, v in pad_collate(rows, pad_token_id).items()}
            with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(**forward_inputs(model, batch))
            for name in output_names:
                values = out[name].float().cpu().numpy()  # (bs, seq_len) or (bs, n)
                for row, i in enumerate(indices):
                    # A per-position output loses its padding.
                    mine[name][i] = values[row][:len(rows[row]["input_ids"])] if per_position else values[row]
    finally:
        model.train(was_training)
    if ctx.multi_gpu:
        gathered = [None] * ctx.world_size
        torch.distributed.all_gather_object(gathered, mine)
        merged = {name: {} for name in output_names}
        for part in gathered:
            for name in output_names:
                merged[name].update(part[name])
        mine = merged
    return {name: [mine[name][i] for i in range(len(dataset))] for name in output_names}


def write_eval_results(folder, record):
    """folder/eval_results.json (the record: task, metrics, score, model, ...), written atomically."""
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(os.path.join(folder, "eval_results.json"), record)


def mean_confidence(logits):
    """The mean over rows of the largest softmax probability (at temperature 1): how sure a model is of its
    predictions (a teacher that gives near one-hot targets on its training data teaches little beyond the labels).
    logits: (n_rows, n_labels)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.size == 0:
        return float("nan")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    return float(probs.max(axis=-1).mean())

