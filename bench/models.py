"""The benchmark's models (scripts/benchmark.py): the configurations and size presets, the teacher and student
built with random weights from configs (no network), their special ids, and the model FLOPs of a step against the
device's peak (MFU).
"""
import torch

CONFIGS = ("bert_mlm", "bert_mlm_restrict", "gpt2_clm")
BERT_SPECIAL = {"pad_token": 0, "unk_token": 100, "cls_token": 101, "sep_token": 102, "mask_token": 103}
# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name(); the first match
# wins, so a variant comes before its family: "NVIDIA H200 NVL" (PCIe card, lower clocks) is not an SXM H200.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("GH200", 989e12),
                   ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12))

# Model sizes. "tiny" is sized for a 2-core CPU (a default run of all configurations in ~1-2 minutes) but
# keeps the real vocabularies, because the vocabulary-sized tensors are what the loss code is about.
PRESETS = {
    "tiny": dict(vocab_bert=30522, vocab_gpt2=50257, hidden=256, heads=4, ffn=1024, teacher_layers=6,
                 student_layers=3, batch_size=8, seq_len=128, steps=3, warmup=1, loss_steps=2),
    "base": dict(vocab_bert=30522, vocab_gpt2=50257, hidden=768, heads=12, ffn=3072, teacher_layers=12,
                 student_layers=6, batch_size=16, seq_len=512, steps=20, warmup=5, loss_steps=10),
    # For --fsdp_ranks on GPUs: a 6.7B teacher and a 2.6B student (GPT-2 shapes). Under DDP a rank would hold
    # 2.6B x 16 bytes (fp32 weights, gradients, AdamW moments) + 6.7B x 4 bytes (fp32 teacher) = 69 GB
    # before activations: more than an 80 GB GPU has room for at this batch.
    "xl": dict(vocab_bert=30522, vocab_gpt2=50257, hidden=4096, heads=32, ffn=16384, teacher_layers=32,
               student_layers=12, batch_size=4, seq_len=1024, steps=5, warmup=2, loss_steps=2),
}


def build_models(config_name, size, args):
    """(teacher, student, student_type) with random weights, built from configs (no network)."""
    from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, GPT2Config,
                              GPT2LMHeadModel)

    p = dict(PRESETS[size])
    for key in ("hidden", "heads", "ffn", "teacher_layers", "student_layers"):
        if getattr(args, key, None) is not None:
            p[key] = getattr(args, key)
    seq_len = args.seq_len or p["seq_len"]
    positions = max(512, seq_len)
    if config_name.startswith("bert"):
        vocab = args.vocab_size or p["vocab_bert"]
        teacher = BertForMaskedLM(BertConfig(
            vocab_size=vocab, hidden_size=p["hidden"], num_hidden_layers=p["teacher_layers"],
            num_attention_heads=p["heads"], intermediate_size=p["ffn"], max_position_embeddings=positions))
        student = DistilBertForMaskedLM(DistilBertConfig(
            vocab_size=vocab, dim=p["hidden"], n_layers=p["student_layers"], n_heads=p["heads"], hidden_dim=p["ffn"],
            max_position_embeddings=positions))
        return teacher, student, "distilbert"
    vocab = args.vocab_size or p["vocab_gpt2"]
    common = dict(vocab_size=vocab, n_embd=p["hidden"], n_head=p["heads"], n_inner=p["ffn"],
                  n_positions=max(1024, seq_len), bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=p["teacher_layers"], **common))
    student = GPT2LMHeadModel(GPT2Config(n_layer=p["student_layers"], **common))
    return teacher, student, "gpt2"


def special_ids(config_name, vocab):
    if config_name.startswith("bert"):
        return dict(BERT_SPECIAL)
    eos = vocab - 1  # GPT-2's <|endoftext|> is its last id; it also pads, as in the original
    return {"bos_token": eos, "eos_token": eos, "unk_token": eos}


def matmul_params(model):
    """Parameters that take part in a matmul per token: all but the position / token-type tables.

    The word-embedding table counts once, for the (tied) output projection; the lookup itself is free.
    An untied head is counted by itself, and the input table then not at all.
    """
    n = 0
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    input_table = model.get_input_embeddings().weight
    for name, param in model.named_parameters():
        if any(k in name for k in ("position", "wpe", "token_type")):
            continue
        if param is input_table and not tied:
            continue
        n += param.numel()
    return n


def model_shape(model):
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers", None) or c.n_layer
    dim = getattr(c, "hidden_size", None) or getattr(c, "dim", None) or c.n_embd
    return layers, dim


def head_matmul_params(model):
    """Matmul parameters of the LM head alone (the part RowLogitsLM runs only at the loss rows): the model's
    matmul_params minus those of its encoder (models.split_lm_head); all of them when the head cannot be split."""
    from distil.models import split_lm_head

    split = split_lm_head(model)
    if split is None:
        return matmul_params(model)
    input_table = model.get_input_embeddings().weight
    base = sum(p.numel() for name, p in split[0].named_parameters()
               if p is not input_table and not any(k in name for k in ("position", "wpe", "token_type")))
    return matmul_params(model) - base


def step_flops(teacher, student, batches, head_rows=None):
    """FLOPs the steps on these batches execute (padding included: the models compute it).

    Per token: teacher forward 2*N_t, student forward + backward 6*N_s, with N the matmul parameters
    (matmul_params). Attention scores and weighted sum add 2*2*S*d per token per layer forward (S the
    padded length, d the hidden size): 4*L_t*S*d_t for the teacher, 3x that for the student,
    12*L_s*S*d_s. Softmaxes, norms, losses and the optimizer are not counted. head_rows: for each batch,
    the number of rows at which both LM heads run (ours: the loss rows, e.g. only the masked ones with
    --restrict_ce_to_mask); None: every position (the reference, and the usual "model FLOPs").
    """
    n_t, n_s = matmul_params(teacher), matmul_params(student)
    h_t, h_s = head_matmul_params(teacher), head_matmul_params(student)
    (l_t, d_t), (l_s, d_s) = model_shape(teacher), model_shape(student)
    total = 0
    for i, (ids, *_) in enumerate(batches):
        bs, s = ids.shape
        rows = bs * s if head_rows is None else head_rows[i]
        total += bs * s * (2 * (n_t - h_t) + 6 * (n_s - h_s) + 4 * l_t * s * d_t + 12 * l_s * s * d_s)
        total += rows * (2 * h_t + 6 * h_s)
    return total


def peak_flops_of(device_name):
    """The dense bf16 peak of a CUDA device by its name (PEAK_BF16_FLOPS), or None when unknown."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def device_peak_flops(device, override):
    if override:
        return override
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))
