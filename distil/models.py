"""The models of a run: classes by --*_type, loading student, teacher and tokenizer, and the wrappers the
training step calls.

`RowLogitsLM` runs a language model but computes the vocabulary projection, the most expensive matmul of a
small student, only at the positions a loss reads (`split_lm_head` knows where the head of BERT, DistilBERT,
RoBERTa, GPT-2, Llama, Qwen2/3 and Mistral sits; other models run whole and are row-selected afterwards).
"""
import os

import torch

from distil.losses import HeadRows
from utils import UserError, load_pretrained, logger

# type -> (config class, model class, tokenizer class), by name in transformers
MODEL_CLASSES = {
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM", "DistilBertTokenizer"),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", "RobertaTokenizer"),
    "bert": ("BertConfig", "BertForMaskedLM", "BertTokenizer"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "GPT2Tokenizer"),
}


AUTO = "auto"  # any Hugging Face masked LM (with --mlm) or causal LM, through the Auto classes
# any model AutoModel loads, without an LM head (e.g. a sentence-embedding encoder): hidden-state losses only
ENCODER = "encoder"


def model_classes(model_type, mlm=True):
    """(config class, model class, tokenizer class) of a --student_type / --teacher_type."""
    import transformers

    if model_type == AUTO:
        model_class = transformers.AutoModelForMaskedLM if mlm else transformers.AutoModelForCausalLM
        return transformers.AutoConfig, model_class, transformers.AutoTokenizer
    if model_type == ENCODER:
        return transformers.AutoConfig, transformers.AutoModel, transformers.AutoTokenizer
    return tuple(getattr(transformers, name) for name in MODEL_CLASSES[model_type])


def framing_token_ids(ids, mlm, framing=None):
    """Special ids with the ones a causal LM's tokenizer may lack filled in from its others.

    Many decoder tokenizers (Llama, Qwen, Mistral) have no pad token and some no BOS or unknown token: a
    sequence is then framed by EOS, and padding (never seen by a loss) reuses an existing id. framing: the
    [start id, end id] a corpus was binarized with (its metadata, from --start_token / --end_token); the
    chunks of a long sequence are framed with them too (a side that had none keeps the tokenizer's).
    """
    ids = dict(ids)
    start, end = framing or (None, None)
    start_name, end_name = ("cls_token", "sep_token") if mlm else ("bos_token", "eos_token")
    if start is not None:
        ids[start_name] = int(start)
    if end is not None:
        ids[end_name] = int(end)
    if not mlm:
        if "bos_token" not in ids and "eos_token" in ids:
            ids["bos_token"] = ids["eos_token"]
        if "eos_token" not in ids and "bos_token" in ids:
            ids["eos_token"] = ids["bos_token"]
        if "unk_token" not in ids and "eos_token" in ids:
            ids["unk_token"] = ids["eos_token"]
    return ids


def max_input_size(config, tokenizer=None):
    """Longest sequence the model accepts, from its config (and tokenizer), not from a table of hub names."""
    n = 1 << 30
    if config is not None:
        n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if n is None:
            raise UserError(f"cannot tell the maximum input size of a {config.model_type} model")
        if config.model_type in ("roberta", "camembert", "xlm-roberta"):
            n -= config.pad_token_id + 1  # RoBERTa's positions start after the padding index
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max is not None and 0 < tok_max < 1_000_000:
        n = min(n, tok_max)
    return int(n)


def load_student_weights(student, path):
    """Load a state-dict file (.pth/.bin/.safetensors) into `student`; returns (missing, unexpected)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_pretrained(lambda: load_file(path), "--student_pretrained_weights", path, "a state dict")
    else:  # weights_only refuses pickled code
        state = load_pretrained(lambda: torch.load(path, map_location="cpu", weights_only=True),
                                "--student_pretrained_weights", path, "a state dict")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--student_pretrained_weights {path}: expected a dict of parameter name -> tensor")
    own = student.state_dict()
    if not set(state) & set(own):
        raise UserError(f"--student_pretrained_weights {path}: none of its {len(state)} tensors matches a student "
                        f"parameter name (e.g. {next(iter(state), '-')!r} vs {next(iter(own), '-')!r})")
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise UserError(f"--student_pretrained_weights {path}: {key} has shape {tuple(value.shape)}, the student "
                            f"expects {tuple(own[key].shape)}")
    result = student.load_state_dict(state, strict=False)
    # Tied weights (e.g. the output projection shares the word embeddings) are loaded through their twin.
    loaded_ptrs = {t.data_ptr() for k, t in own.items() if k in state}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded_ptrs]
    if missing:
        logger.info("Student weights left at their random initialisation: %s", ", ".join(missing))
    if result.unexpected_keys:
        logger.warning("Ignored tensors of %s that the student does not have: %s", path,
                       ", ".join(result.unexpected_keys))
    return missing, list(result.unexpected_keys)


def build_student(student_type, config_path, *, mlm, pretrained_weights=None, initializer_range=0.02,
                  freeze_pos_embs=False, freeze_token_type_embds=False, gradient_checkpointing=False):
    """The student: from its config (random init at initializer_range), then a state dict or a model folder
    (--student_pretrained_weights) on top; position / token-type embeddings frozen as asked; activations
    recomputed in backward block by block with gradient_checkpointing."""
    config_class, model_class, _ = model_classes(student_type, mlm)
    config = load_pretrained(lambda: config_class.from_pretrained(config_path), "--student_config", config_path,
                             f"a {student_type} config")
    config.initializer_range = initializer_range
    if pretrained_weights and os.path.isdir(pretrained_weights):
        logger.info("Loading the student from the folder %s", pretrained_weights)
        student = load_pretrained(lambda: model_class.from_pretrained(pretrained_weights, config=config),
                                  "--student_pretrained_weights", pretrained_weights, f"a {student_type} model")
    else:
        student = model_class.from_config(config) if student_type in (AUTO, ENCODER) else model_class(config)
        if pretrained_weights:
            logger.info("Loading student weights from %s", pretrained_weights)
            load_student_weights(student, pretrained_weights)
    # transformers 4 froze DistilBERT's position table when sinusoidal_pos_embds is set, and the original runs
    # relied on it (the loaded teacher positions then stayed fixed); transformers 5 leaves it trainable.
    freeze_pos = freeze_pos_embs or getattr(config, "sinusoidal_pos_embds", False)
    for name, param in student.named_parameters():
        if freeze_pos and (name.endswith("position_embeddings.weight") or name.endswith("wpe.weight")):
            param.requires_grad = False
        if freeze_token_type_embds and name.endswith("token_type_embeddings.weight"):
            param.requires_grad = False
    if gradient_checkpointing:
        enable_gradient_checkpointing(student)
    return student


def enable_gradient_checkpointing(model):
    """Keep only each block's input in forward and recompute the block in backward (--gradient_checkpointing):
    activation memory of one block instead of all of them, for about one more forward of compute. The
    non-reentrant implementation, which works under DDP and FSDP and with frozen parameters."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"--gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logger.info("Gradient checkpointing: the student's blocks are recomputed in backward.")


def load_tokenizer(model_type, name, flag, mlm=True):
    """The tokenizer of a --*_type from a folder or hub name; `flag` names the option it came from."""
    _, _, tokenizer_class = model_classes(model_type, mlm)
    tokenizer = load_pretrained(lambda: tokenizer_class.from_pretrained(name), flag, name, f"a {model_type} tokenizer")
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # transformers 5 builds one from an empty folder
        raise UserError(f"{flag} {name}: no tokenizer vocabulary found there, only special tokens")
    return tokenizer


def load_teacher(teacher_type, name, mlm=True, flag="--teacher_name", dtype=None, on_meta=False):
    """The frozen teacher (eval mode, no gradients), refused when its checkpoint lacks weights of its class.
    dtype: load the weights in this dtype (default: float32). on_meta (--fsdp): when `name` is a folder of
    safetensors matching the model, build it on the meta device and leave its weights in the files
    (`teacher.streamed_weights`, read shard by shard after sharding: sharding.Fsdp); else load it whole."""
    config_class, model_class, _ = model_classes(teacher_type, mlm)
    if on_meta:
        teacher = _teacher_on_meta(teacher_type, config_class, model_class, name, flag, dtype)
        if teacher is not None:
            return teacher
    kwargs = {"dtype": dtype} if dtype is not None else {}
    teacher, info = load_pretrained(lambda: model_class.from_pretrained(name, output_loading_info=True, **kwargs),
                                    flag, name, f"a {teacher_type} model")
    missing = info.get("missing_keys") or []
    if teacher_type == ENCODER:
        # A pooler is a head too: AutoModel builds BERT's, an MLM checkpoint has none, and the hidden states
        # the losses read never go through it.
        missing = [key for key in missing if not key.startswith("pooler.")]
    if missing:
        # e.g. a checkpoint without its LM head: a randomly initialised head would be a useless teacher
        hint = "" if teacher_type == ENCODER else "; a model without an LM head distils with --teacher_type encoder"
        raise UserError(f"{flag} {name}: the checkpoint lacks {len(missing)} weights of "
                        f"{model_class.__name__} (e.g. {sorted(missing)[0]}){hint}")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _teacher_on_meta(teacher_type, config_class, model_class, name, flag, dtype):
    """The teacher built on the meta device with its StreamedWeights, or None (not a safetensors folder, or its
    tensor names do not match the model's: the caller loads it whole)."""
    from distil.distributed.streamed_weights import StreamedWeights, build_on_meta

    if not os.path.isdir(name):
        return None
    config = load_pretrained(lambda: config_class.from_pretrained(name), flag, name, f"a {teacher_type} config")
    dtype = dtype or getattr(config, "dtype", None)  # as from_pretrained: the checkpoint's dtype by default
    teacher = build_on_meta(lambda: model_class.from_config(config) if teacher_type == AUTO else model_class(config),
                            dtype if isinstance(dtype, torch.dtype) else None)
    weights = StreamedWeights.match(teacher, name)
    if weights is None:
        return None
    teacher.streamed_weights = weights
    teacher.eval()
    teacher.requires_grad_(False)
    logger.info("Teacher built on the meta device: each rank reads only its shards from %s.", name)
    return teacher


# ------------------------------------------------------------------------------------ running the models

_PLAIN_HEAD_CAUSAL_LMS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


def split_lm_head(model):
    """(base, head, base kwargs) with logits == head(base(...).last_hidden_state), or None when unknown.

    Knowing the split lets the loop compute the vocabulary projection, the most expensive matmul of a small
    student, only at the positions a loss reads (non-padding, or only the masked ones).
    """
    from transformers import BertForMaskedLM, DistilBertForMaskedLM, GPT2LMHeadModel, RobertaForMaskedLM

    if isinstance(model, DistilBertForMaskedLM):
        def head(h):
            return model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(h))))
        return model.distilbert, head, {}
    if isinstance(model, BertForMaskedLM):
        return model.bert, model.cls, {}
    if isinstance(model, RobertaForMaskedLM):
        return model.roberta, model.lm_head, {}
    if isinstance(model, GPT2LMHeadModel) or type(model).__name__ in _PLAIN_HEAD_CAUSAL_LMS:
        base = model.transformer if isinstance(model, GPT2LMHeadModel) else model.model
        return base, model.lm_head, {"use_cache": False}  # training: no KV cache to build
    return None


def fusable_head(head):
    """Whether the loss may run `head` itself (losses.HeadRows): a plain torch.nn.Linear (the lm_head of GPT-2,
    Llama, Qwen2/3, Mistral, tied to the embeddings or not) without hooks, since the loss reads its weight and bias
    and never calls its forward. BERT/DistilBERT/RoBERTa MLM heads (a transform and a norm before the projection)
    are not."""
    # a subclass (quantised, adapters) or a hook may change what its forward computes
    return type(head) is torch.nn.Linear and not head._forward_hooks and not head._forward_pre_hooks


def _is_plain_bidirectional(model):
    from transformers import (BertForMaskedLM, BertModel, DistilBertForMaskedLM, DistilBertModel, RobertaForMaskedLM,
                              RobertaModel)

    return isinstance(model, (BertForMaskedLM, DistilBertForMaskedLM, RobertaForMaskedLM, BertModel, DistilBertModel,
                              RobertaModel))


def hidden_projection(s_dim, t_dim, seed):
    """The learned student -> teacher hidden-size projection of --hidden_projection, initialised from `seed`
    alone: the same weights on every rank. DDP would broadcast rank 0's anyway, but FSDP shards each rank's own
    tensor, so ranks that drew differently (each rank's generator is seeded apart) would mix their draws."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Linear(s_dim, t_dim, bias=False)


class RowLogitsLM(torch.nn.Module):
    """Wraps a LM: forward returns (logits at the selected flat rows (n, vocab), last hidden states).

    DDP wraps this module (not the bare model) so gradient hooks see the forward that really runs.
    Models whose head cannot be split run whole and their logits are selected afterwards; a bare encoder
    (bare=True) has no head and gives no logits. With fuse_head, a model whose head is a plain linear
    projection (fusable_head) gives losses.HeadRows (the hidden rows and the head) in place of the logits, for
    the training loss to project chunk by chunk; the caller decides whether it may (not under FSDP).
    """

    def __init__(self, model, hidden_projection=None, blocks=None, bare=False, fuse_head=False):
        super().__init__()
        self.model = model
        self.hidden_projection = hidden_projection  # student dim -> teacher dim, for the hidden-state losses
        self.blocks = tuple(blocks) if blocks else None  # whose outputs the intermediate-layer loss reads
        self._bare = bare  # a model without an LM head (--*_type encoder): no logits to compute
        self._split = (None if self._bare else split_lm_head(model),)  # a tuple: not registered twice as submodules
        split = self._split[0]  # None for a bare encoder or a head that cannot be split
        self.fused_head = fuse_head and split is not None and fusable_head(split[1])  # forward gives HeadRows
        self._prepare_mask = _is_plain_bidirectional(model)

    def forward(self, input_ids, attention_mask, rows=None):
        """(logits at rows, last hidden states), plus the outputs of `blocks` (a tuple of (bs, seq, dim)) when
        the wrapper was given some; logits are None for a bare encoder, losses.HeadRows with fused_head. Without
        rows, the wrapped model's own forward and output.

        The second form is how the held-out evaluation runs a model sharded with FSDP (distributed/sharding.py): the
        wrapper is the root of the sharded model, so the model must be called through it.
        """
        if rows is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask)
        split = self._split[0]
        if attention_mask is not None and self._prepare_mask:
            attention_mask = self.prepared_attention_mask(attention_mask)
        layers = None
        all_states = {"output_hidden_states": True} if self.blocks else {}
        if self._bare:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **all_states)
            logits, hidden = None, out.last_hidden_state
        elif split is None:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            logits, hidden = out.logits.flatten(0, 1)[rows], out.hidden_states[-1]
        else:
            base, head, kwargs = split
            out = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs, **all_states)
            hidden = out.last_hidden_state  # (bs, seq, dim)
            if self.fused_head:  # the loss projects (losses._FusedHeadLoss), as autocast would have here
                device = hidden.device.type
                dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
                logits = HeadRows(hidden.flatten(0, 1)[rows], head.weight, head.bias, dtype)
            else:
                logits = head(hidden.flatten(0, 1)[rows])  # (n, vocab)
        if self.blocks:
            layers = tuple(out.hidden_states[block + 1] for block in self.blocks)  # [0] is the embeddings' output
        if self.hidden_projection is not None:
            hidden = self.hidden_projection(hidden)  # (bs, seq, teacher dim)
            if layers is not None:
                layers = tuple(self.hidden_projection(layer) for layer in layers)
        return (logits, hidden) if layers is None else (logits, hidden, layers)

    def prepared_attention_mask(self, attention_mask):
        """The 4D mask the encoder would build from the 2D one, built without checking for padding first.

        Given a 2D mask, transformers tests `mask.all()` to drop it when nothing is padded: a device
        synchronisation in every forward. The caller knows that on the host (and passes no mask then);
        a prepared 4D mask is used as it is.
        """
        from transformers.masking_utils import create_bidirectional_mask

        bs, seq = attention_mask.shape
        shape_only = torch.empty((bs, seq, 0), dtype=self.model.dtype, device=attention_mask.device)
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=shape_only,
                                         attention_mask=attention_mask, allow_is_bidirectional_skip=False)


class TeacherLM(RowLogitsLM):
    """RowLogitsLM for the frozen teacher: the same forward, without autograd.

    Its own forward (a distinct code object) also gives a compiled teacher its own compilation cache, so
    the teacher's and the student's graphs do not evict each other (they differ at least in grad mode).
    """

    def forward(self, input_ids, attention_mask, rows=None):
        with torch.no_grad():
            return super().forward(input_ids, attention_mask, rows)
