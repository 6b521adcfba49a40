"""Held-out evaluation of a student (and how closely it follows its teacher).

    python scripts/evaluate.py --model serialization_dir/my_first_training --model_type distilbert --mlm \
        --teacher bert-base-uncased-folder --teacher_type bert \
        --data_file data/binarized_text.valid.bert-base-uncased.bin --output eval.json

Metrics (all token means over the positions the LM loss covers):
    MLM  mlm_loss, pseudo_perplexity = exp(mlm_loss) over a fixed masking of 15% of the real tokens
    CLM  clm_loss, perplexity = exp(clm_loss) over every next-token prediction inside the sequences
    with a teacher: kl_teacher_student = KL(p_teacher || p_student) at temperature 1 and top1_agreement
    (fraction of positions where both argmaxes coincide), over the same positions.

The masking is a pure function of (seed, index of the sequence in the dataset): the numbers do not depend on
the batch size, the batch order, the number of processes, the device, or any global random state, so two
evaluations of the same weights agree exactly and a curve over training measures the weights alone.

train.py calls `evaluate` during training; `count_parameters` and `inference_speed` feed the demo's table.
"""
import argparse
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distiller import IGNORE_INDEX  # noqa: E402
from lm_seqs_dataset import BinarizedCorpus, LmSeqsDataset  # noqa: E402
from utils import UserError, fail, logger, special_token_ids, write_json_atomic  # noqa: E402

_CHUNK_ELEMENTS = 1 << 22  # logits elements turned into fp32 log-probabilities at once (~16 MB)


# ------------------------------------------------------------------------------------------- masking


def fixed_mlm_mask(token_ids, lengths, indices, *, special_ids, mask_id, seed=0, mask_prop=0.15):
    """Deterministic MLM corruption for evaluation: (input ids, labels with IGNORE_INDEX elsewhere).

    token_ids (bs, L) and lengths (bs,) as batch_sequences returns them (CPU); indices: the dataset index
    of each row. In row r, ceil(mask_prop * n) of its n eligible tokens (real, not special) are chosen
    uniformly without replacement by a generator seeded with (seed, indices[r]), and all of them become the
    mask token. Training's 80/10/10 split and count-smoothed weights are left out on purpose: the kept and
    random-replaced positions add noise to the number without measuring anything extra, and uniform weights
    make the loss an unbiased average over the corpus's tokens.
    """
    token_ids = torch.as_tensor(token_ids)
    lengths = torch.as_tensor(lengths)
    ids = token_ids.numpy()
    special = np.fromiter((int(i) for i in special_ids), dtype=np.int64)
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    for row, (index, length) in enumerate(zip(indices, lengths.tolist())):
        eligible = np.flatnonzero(~np.isin(ids[row, :length], special))
        n_pick = math.ceil(mask_prop * len(eligible))
        if n_pick == 0:
            continue
        # SeedSequence mixes (seed, index) into independent streams; seed * K + index would collide.
        rng = np.random.default_rng([int(seed), int(index)])
        picked = eligible[rng.choice(len(eligible), size=n_pick, replace=False)]
        labels[row, picked] = ids[row, picked]
    labels = torch.from_numpy(labels)
    inputs = torch.where(labels != IGNORE_INDEX, torch.full_like(token_ids, mask_id), token_ids)
    return inputs, labels


def clm_eval_labels(token_ids, lengths):
    """Targets of next-token prediction: row r, position i predicts token i + 1 while i + 1 < length."""
    pos = torch.arange(token_ids.size(1))[None, :]
    real = pos < torch.as_tensor(lengths)[:, None]
    labels = token_ids.masked_fill(~real, IGNORE_INDEX)
    return labels[:, 1:]  # (bs, L - 1), aligned with logits[:, :-1]


# ------------------------------------------------------------------------------------------- evaluation


def _shard(dataset, batch_size, max_batches, world_size, rank):
    """This rank's dataset indices, longest first (less padding), cut into batches."""
    n = len(dataset)
    if max_batches is not None:
        # A global budget, so the evaluated set (and the result) does not depend on the number of ranks.
        n = min(n, max_batches * batch_size)
    indices = np.arange(rank, n, world_size)
    lengths = getattr(dataset, "lengths", None)
    lengths = np.asarray(lengths)[indices] if lengths is not None else np.array([dataset[i][1] for i in indices])
    indices = indices[np.argsort(-lengths, kind="stable")]
    return [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]


def _collate(dataset, indices):
    batch = [dataset[int(i)] for i in indices]
    if hasattr(dataset, "batch_sequences"):
        return dataset.batch_sequences(batch)
    lengths = torch.tensor([b[1] for b in batch])
    out = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
    for row, (ids, n) in enumerate(batch):
        out[row, :n] = torch.as_tensor(ids[:n])
    return out, lengths


def _position_sums(s_logits, t_logits, targets):
    """[sum CE, n, sum KL(t||s), n argmax agree] over the rows of flat logits whose target is not ignored."""
    vocab = s_logits.size(-1)
    s_flat = s_logits.reshape(-1, vocab)
    t_flat = t_logits.reshape(-1, t_logits.size(-1)) if t_logits is not None else None
    targets = targets.reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    sums = torch.zeros(4, dtype=torch.float64, device=s_logits.device)
    sums[1] = rows.numel()
    step = max(1, _CHUNK_ELEMENTS // vocab)
    for i in range(0, rows.numel(), step):
        r = rows[i: i + step]
        log_p_s = F.log_softmax(s_flat[r].float(), dim=-1)
        sums[0] += F.nll_loss(log_p_s, targets[r], reduction="sum").double()
        if t_flat is not None:
            t_chunk = t_flat[r].float()
            log_p_t = F.log_softmax(t_chunk, dim=-1)
            sums[2] += (log_p_t.exp() * (log_p_t - log_p_s)).sum().double()
            sums[3] += (log_p_s.argmax(-1) == t_chunk.argmax(-1)).sum().double()
    return sums


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _set_eval(*models):
    """eval() on every model; returns what restores each submodule's own mode (frozen parts may differ)."""
    modes = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    return modes


def _exp(x):
    return math.exp(x) if x < 700 else math.inf


@torch.no_grad()
def evaluate(model, dataset, *, mlm, batch_size, device, special_tok_ids, vocab_size=None, teacher=None, seed=0,
             mask_prop=0.15, max_batches=None, world_size=1, rank=0):
    """Evaluate `model` (and its agreement with `teacher`) on `dataset`; see the module docstring.

    dataset: items (token ids, length), e.g. LmSeqsDataset. special_tok_ids: {name: id} as
    utils.special_token_ids returns (MLM needs 'mask_token'; every listed id is excluded from masking).
    vocab_size: if given, logits are cut to their first vocab_size columns (models whose embedding matrix
    was padded beyond the tokenizer). max_batches: evaluate only the first max_batches * batch_size
    sequences of the dataset (all ranks together). With world_size > 1 every rank must call this: rank r
    takes the sequences i % world_size == r, and when torch.distributed is initialised the sums are
    all-reduced so that every rank returns the same global numbers.

    Returns {'mlm_loss', 'pseudo_perplexity'} (MLM) or {'clm_loss', 'perplexity'} (CLM), plus
    'kl_teacher_student' and 'top1_agreement' with a teacher, 'n_tokens' and 'n_sequences'.
    """
    model = _unwrap(model)
    teacher = _unwrap(teacher) if teacher is not None else None
    device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mlm and "mask_token" not in special_tok_ids:
        raise ValueError("MLM evaluation needs special_tok_ids['mask_token']")
    special = sorted(set(special_tok_ids.values()))
    modes = _set_eval(model, teacher)
    try:
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # CE, n tokens, KL, agreements, sequences
        for indices in _shard(dataset, batch_size, max_batches, world_size, rank):
            token_ids, lengths = _collate(dataset, indices)
            attn = torch.arange(token_ids.size(1))[None, :] < lengths[:, None]
            if mlm:
                inputs, targets = fixed_mlm_mask(token_ids, lengths, indices, special_ids=special,
                                                 mask_id=special_tok_ids["mask_token"], seed=seed,
                                                 mask_prop=mask_prop)
            else:
                inputs, targets = token_ids, clm_eval_labels(token_ids, lengths)
            inputs, attn = inputs.to(device), attn.to(device)
            targets = targets.to(device)
            # Same call as training: CLM pads on the right, where a causal model cannot look anyway.
            mask = attn if mlm else None
            s_logits = model(input_ids=inputs, attention_mask=mask).logits
            t_logits = teacher(input_ids=inputs, attention_mask=mask).logits if teacher is not None else None
            if vocab_size is not None:
                s_logits = s_logits[..., :vocab_size]
                t_logits = t_logits[..., :vocab_size] if t_logits is not None else None
            if not mlm:
                s_logits = s_logits[:, :-1]
                t_logits = t_logits[:, :-1] if t_logits is not None else None
            if t_logits is not None and t_logits.size(-1) != s_logits.size(-1):
                raise ValueError(f"student logits have {s_logits.size(-1)} columns, the teacher's "
                                 f"{t_logits.size(-1)}; pass vocab_size to compare the shared vocabulary")
            sums[:4] += _position_sums(s_logits, t_logits, targets)
            sums[4] += len(indices)
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
    finally:
        for module, training in modes:
            module.training = training

    ce, n, kl, agree, n_seq = sums.tolist()
    name = "mlm" if mlm else "clm"
    loss = ce / n if n else math.nan
    out = {f"{name}_loss": loss, "pseudo_perplexity" if mlm else "perplexity": _exp(loss) if n else math.nan,
           "n_tokens": int(n), "n_sequences": int(n_seq)}
    if teacher is not None:
        out["kl_teacher_student"] = kl / n if n else math.nan
        out["top1_agreement"] = agree / n if n else math.nan
    return out


# ------------------------------------------------------------------------------------------- size and speed


def count_parameters(model, trainable_only=False):
    """Number of parameters; a tensor shared by two modules (tied embeddings) counts once, as
    Module.parameters() yields it once."""
    return sum(p.numel() for p in _unwrap(model).parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def inference_speed(model, dataset, batch_size, device, n_batches, warmup=1):
    """Forward passes per second, in sequences/s, over the first n_batches batches of dataset (in order).

    Batches are built and moved to the device before the clock starts, and `warmup` batches run first
    (kernel selection, allocator growth), so the number measures the model alone.
    """
    model = _unwrap(model)
    device = torch.device(device)
    n = len(dataset)
    if n == 0 or n_batches < 1:
        raise ValueError("inference_speed needs a non-empty dataset and n_batches >= 1")
    batches = []
    for b in range(warmup + n_batches):
        indices = [(b * batch_size + j) % n for j in range(batch_size)]  # wrap around a small dataset
        token_ids, lengths = _collate(dataset, indices)
        attn = torch.arange(token_ids.size(1))[None, :] < lengths[:, None]
        batches.append((token_ids.to(device), attn.to(device)))
    modes = _set_eval(model)
    try:
        for token_ids, attn in batches[:warmup]:
            model(input_ids=token_ids, attention_mask=attn)
        _sync(device)
        start = time.perf_counter()
        for token_ids, attn in batches[warmup:]:
            model(input_ids=token_ids, attention_mask=attn)
        _sync(device)
        elapsed = time.perf_counter() - start
    finally:
        for module, training in modes:
            module.training = training
    return n_batches * batch_size / elapsed


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a (student) model on a binarized corpus.")
    parser.add_argument("--model", required=True, help="Model folder (from_pretrained), e.g. a training dump_path.")
    parser.add_argument("--model_type", required=True, choices=["bert", "distilbert", "roberta", "gpt2", "auto"])
    parser.add_argument("--teacher", default=None, help="Teacher folder: adds KL and top-1 agreement.")
    parser.add_argument("--teacher_type", default=None, choices=["bert", "distilbert", "roberta", "gpt2", "auto"],
                        help="Default: bert for a distilbert model, else --model_type.")
    parser.add_argument("--tokenizer", default=None,
                        help="Tokenizer folder (default: the model folder, else the teacher folder).")
    parser.add_argument("--data_file", required=True, help="Binarized corpus (scripts/binarized_data.py).")
    parser.add_argument("--mlm", action="store_true",
                        help="Masked LM evaluation (the default for bert/distilbert/roberta; gpt2 is causal).")
    parser.add_argument("--mask_prop", type=float, default=0.15, help="Proportion of real tokens masked (MLM).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the fixed MLM masking.")
    parser.add_argument("--max_batches", type=int, default=None,
                        help="Evaluate only the first max_batches * batch_size sequences.")
    parser.add_argument("--speed_batches", type=int, default=0,
                        help="Also time this many forward batches (sequences/s); 0: skip.")
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--output", default=None, help="Write the results to this JSON file.")
    return parser.parse_args(argv)


def _check_args(args):
    mlm_type = args.mlm if args.model_type == "auto" else args.model_type != "gpt2"  # auto: --mlm decides
    if args.mlm and not mlm_type:
        raise UserError("--mlm does not apply to --model_type gpt2 (a causal LM)")
    args.mlm = mlm_type
    if args.teacher_type is None:
        args.teacher_type = "bert" if args.model_type == "distilbert" else args.model_type
    if args.teacher is not None and args.teacher_type != "auto" and (args.teacher_type != "gpt2") != mlm_type:
        raise UserError(f"--teacher_type {args.teacher_type} and --model_type {args.model_type} are not both "
                        "masked or both causal LMs")
    if args.batch_size < 1:
        raise UserError("--batch_size must be >= 1")
    if args.max_batches is not None and args.max_batches < 1:
        raise UserError("--max_batches must be >= 1")
    if args.speed_batches < 0:
        raise UserError("--speed_batches must be >= 0")
    if not 0 < args.mask_prop <= 1:
        raise UserError("--mask_prop must be in (0, 1]")
    for flag in ("model", "teacher", "tokenizer"):
        path = getattr(args, flag)
        if path is not None and not os.path.isdir(path):
            raise UserError(f"--{flag} {path}: no such folder")
    if args.output is not None and os.path.isdir(args.output):
        raise UserError(f"--output {args.output} is a folder")


def _load_config(path, model_type, flag, mlm=True):
    import train

    config_class, _, _ = train.model_classes(model_type, mlm)
    try:
        return config_class.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{flag} {path}: cannot load a {model_type} config ({str(exc).splitlines()[0]})") from None


def _load_model(path, model_type, config, flag, mlm=True):
    import train

    _, model_class, _ = train.model_classes(model_type, mlm)
    try:
        return model_class.from_pretrained(path, config=config)
    except (OSError, ValueError) as exc:
        raise UserError(f"{flag} {path}: cannot load a {model_type} model ({str(exc).splitlines()[0]})") from None


def _load_tokenizer(args):
    import train

    candidates = [(args.tokenizer, "--tokenizer", args.model_type)]
    if args.tokenizer is None:
        candidates = [(args.model, "--model", args.model_type), (args.teacher, "--teacher", args.teacher_type)]
    errors = []
    for path, flag, model_type in candidates:
        if path is None:
            continue
        _, _, tokenizer_class = train.model_classes(model_type, args.mlm)
        try:
            return tokenizer_class.from_pretrained(path)
        except (OSError, ValueError, TypeError) as exc:
            errors.append(f"{flag} {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    if args.tokenizer is not None:
        raise UserError(f"cannot load a tokenizer ({'; '.join(errors)})")
    raise UserError(f"no tokenizer in --model {args.model}" + (f" nor --teacher {args.teacher}" if args.teacher else "")
                    + "; pass --tokenizer")


def run(args):
    import train
    import transformers

    _check_args(args)
    transformers.utils.logging.disable_progress_bar()  # stderr stays for warnings and the error line
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:  # first: the cheapest input to get wrong, and it needs no model
        corpus = BinarizedCorpus.open(args.data_file)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"--data_file {exc}") from None
    # Configs before weights: a mismatch is reported without loading either model.
    config = _load_config(args.model, args.model_type, "--model")
    t_config = _load_config(args.teacher, args.teacher_type, "--teacher") if args.teacher else None
    vocab = config.vocab_size
    if t_config is not None and t_config.vocab_size != vocab:
        raise UserError(f"vocabulary mismatch: --model {args.model} has {vocab} tokens, --teacher {args.teacher} "
                        f"has {t_config.vocab_size}")
    tokenizer = _load_tokenizer(args)
    special = train.framing_token_ids(special_token_ids(tokenizer), args.mlm)
    if args.mlm and "mask_token" not in special:
        raise UserError("the tokenizer has no mask token, needed for MLM evaluation")
    if corpus.max_token_id >= vocab:
        raise UserError(f"--data_file {args.data_file}: token id {corpus.max_token_id} is outside the model's "
                        f"vocabulary of {vocab}; was it binarized with another tokenizer?")
    max_len = min(train.max_input_size(config, tokenizer),
                  train.max_input_size(t_config) if t_config is not None else 1 << 30)
    params = SimpleNamespace(max_model_input_size=max_len, mlm=args.mlm, special_tok_ids=special)
    dataset = LmSeqsDataset(params=params, data=corpus)
    if len(dataset) == 0:
        raise UserError(f"--data_file {args.data_file}: no sequence left after filtering (at least 12 tokens needed)")

    model = _load_model(args.model, args.model_type, config, "--model", args.mlm).to(device)
    teacher = _load_model(args.teacher, args.teacher_type, t_config, "--teacher", args.mlm).to(device) if t_config else None
    results = evaluate(model, dataset, mlm=args.mlm, batch_size=args.batch_size, device=device,
                       special_tok_ids=special, vocab_size=vocab, teacher=teacher, seed=args.seed,
                       mask_prop=args.mask_prop, max_batches=args.max_batches)
    record = {"model": args.model, "model_type": args.model_type, "teacher": args.teacher,
              "data_file": args.data_file, "mlm": args.mlm, "seed": args.seed, "batch_size": args.batch_size,
              "max_batches": args.max_batches, "n_parameters": count_parameters(model), **results}
    if teacher is not None:
        record["teacher_n_parameters"] = count_parameters(teacher)
    if args.speed_batches:
        record["sequences_per_second"] = inference_speed(model, dataset, args.batch_size, device, args.speed_batches)
    return record


def _print_table(record):
    keys = ["n_parameters", "n_sequences", "n_tokens", "mlm_loss", "pseudo_perplexity", "clm_loss", "perplexity",
            "kl_teacher_student", "top1_agreement", "teacher_n_parameters", "sequences_per_second"]
    rows = [(k, record[k]) for k in keys if k in record]
    width = max(len(k) for k, _ in rows)
    print(f"{'model':<{width}}  {record['model']}")
    for key, value in rows:
        text = f"{value:,}" if isinstance(value, int) else f"{value:.6g}"
        print(f"{key:<{width}}  {text}")


def main(argv=None):
    args = parse_args(argv)
    record = run(args)
    _print_table(record)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        # allow_nan stays on: an empty evaluation reports NaN rather than failing after the work is done.
        write_json_atomic(args.output, record)
        logger.info("Results written to %s", args.output)
    return record


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        fail(str(exc))
