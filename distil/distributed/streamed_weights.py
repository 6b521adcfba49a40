"""Large models without a whole copy per rank in host memory: built on the meta device, weights read later.

Under `--fsdp` every rank would otherwise build the full teacher on its CPU before sharding it (tens of GB per
rank for a multi-billion-parameter model, times the ranks of a node). Instead:

    model = build_on_meta(model_class, config, dtype)        # parameters: shapes only; buffers real
    weights = StreamedWeights.match(model, folder)           # where each parameter is, in the safetensors files
    ... fully_shard(...)                                     # sharding.Fsdp shards the meta parameters
    weights.load_shards(model, device)                       # each rank reads only its rows, memory-mapped

A checkpoint that is not in safetensors, or whose tensor names do not match the model's, is loaded whole as
before (the caller falls back and says so).
"""
import contextlib
import json
import os

import torch

from utils import logger


@contextlib.contextmanager
def parameters_on_meta():
    """Build models whose parameters live on the meta device (shapes only, no memory), their buffers real.

    Buffers (position ids, rotary frequencies) are computed at construction and are not in checkpoints, so
    they must keep their values; parameters get theirs later, shard by shard.
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_on_meta(build, dtype=None):
    """build() (a model constructor) with its parameters on the meta device, floating ones cast to dtype."""
    with parameters_on_meta():
        model = build()
    if dtype is not None:
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    return model


def safetensors_sources(path):
    """{tensor name: file} of a safetensors state-dict file or of a from_pretrained folder's safetensors
    (one file or an index of several); None when there are none (e.g. a .bin checkpoint or a hub name)."""
    from safetensors import safe_open

    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                return {key: os.path.join(path, file) for key, file in json.load(f)["weight_map"].items()}
        path = os.path.join(path, "model.safetensors")
    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        return None
    with safe_open(path, framework="pt") as f:
        return {key: path for key in f.keys()}


def _shard_rows(param):
    """(tensor to fill, first row of the full tensor it holds): a DTensor's local shard along dim 0 (FSDP2 cuts
    like torch.chunk: ceil(n / world) rows per rank, fewer or none at the end), or a whole tensor."""
    if type(param).__name__ != "DTensor":
        return param, 0
    local = param.to_local()
    rank, world = param.device_mesh.get_local_rank(), param.device_mesh.size()
    per_rank = -(-param.shape[0] // world)
    return local, min(rank * per_rank, param.shape[0])


class StreamedWeights:
    """Where each parameter of a model built on the meta device is read from: {parameter name: (file, key)} in
    safetensors files, opened memory-mapped, so a rank reads (and holds) only the rows of its shards."""

    def __init__(self, sources, origin):
        self.sources = sources
        self.origin = origin  # the folder or file, for messages
        self.vocabulary_cut = None  # (checkpoint's vocabulary size, kept size) once cut_vocabulary is called

    def cut_vocabulary(self, full, kept):
        """The model was cut from `full` to its first `kept` vocabulary ids after it was matched (a teacher whose
        vocabulary extends the student's: distil/vocabularies.py): a tensor whose first dimension is `full` in
        the checkpoint and `kept` in the model is read for its first `kept` rows, the ones the model keeps."""
        self.vocabulary_cut = (full, kept)

    def _rows_kept(self, stored, expected):
        """Whether a checkpoint tensor of shape `stored` is one the vocabulary cut shortened to `expected`."""
        if self.vocabulary_cut is None or len(stored) != len(expected) or not stored:
            return False
        return (stored[0], expected[0]) == self.vocabulary_cut and stored[1:] == expected[1:]

    @classmethod
    def match(cls, model, path):
        """The sources of every parameter of `model` in the safetensors at `path`, or None when there are no
        safetensors there or some parameter is not found under its own name (nor with the base model's prefix
        added or removed). A tied parameter is found through any of its names (save_pretrained writes one)."""
        files = safetensors_sources(path)
        if files is None:
            return None
        prefix = getattr(model, "base_model_prefix", "") + "."
        names_of = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(param), []).append(name)
        sources = {}
        for names in names_of.values():
            candidates = [c for n in names for c in (n, n[len(prefix):] if n.startswith(prefix) else None,
                                                     prefix + n)]
            key = next((c for c in candidates if c in files), None)
            if key is None:
                logger.info("%s: no tensor for %s; the model is loaded whole instead.", path, names[0])
                return None
            sources.update({n: (files[key], key) for n in names})
        return cls(sources, path)

    @torch.no_grad()
    def load_shards(self, unit, device, prefix=""):
        """Allocate the (sharded) parameters of `unit` on `device` and fill each from its file, this rank's rows.

        unit: the module that was sharded last (the FSDP root), holding the meta model under `prefix` (e.g.
        "model." in a models.TeacherLM); a plain, unsharded parameter is read whole. Tensors that were already
        real (buffers, a parameter added after the build) keep their values.
        """
        from safetensors import safe_open

        def tensors():
            return [*unit.named_parameters(), *unit.named_buffers()]

        kept = {name: t.detach().clone() for name, t in tensors() if t.device.type != "meta"}
        unit.to_empty(device=device)  # the FSDP root's own _apply re-registers its shards
        with contextlib.ExitStack() as stack:
            opened = {}
            for name, tensor in tensors():
                if name in kept:
                    tensor.copy_(kept[name])
                    continue
                path, key = self.sources[name[len(prefix):]]
                if path not in opened:
                    opened[path] = stack.enter_context(safe_open(path, framework="pt"))
                stored = opened[path].get_slice(key)
                shape, expected = tuple(stored.get_shape()), tuple(tensor.shape)
                if shape != expected and not self._rows_kept(shape, expected):
                    raise ValueError(f"{path}: {key} has shape {shape}, the model expects {expected}")
                # A cut tensor's shard rows are rows of the kept part, which is the checkpoint's first rows.
                target, first = _shard_rows(tensor)
                if target.dim() == 0:
                    target.copy_(opened[path].get_tensor(key))
                elif target.shape[0]:
                    target.copy_(stored[first: first + target.shape[0]])
        logger.info("Weights read shard by shard from %s (memory-mapped safetensors).", self.origin)
