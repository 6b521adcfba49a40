"""The transformer blocks of a model: the units FSDP shards one by one (sharding.py) and --compile compiles one by
one (compile_blocks), found by the same rule `extract.py --model_type auto` slices by."""
import torch

from utils import UserError, logger


def transformer_blocks(model, purpose):
    """The model's transformer blocks (the modules of its layer list), or [] with a warning naming `purpose`
    (e.g. "FSDP", "--compile") when there is none to find: the caller then treats the model as one unit."""
    from distil.extraction_auto import find_layer_stack  # the same rule `extract.py --model_type auto` slices by

    try:
        stack = find_layer_stack(model)
    except UserError as exc:
        logger.warning("%s: %s; the whole model is one unit.", purpose, exc)
        return []
    return list(model.get_submodule(stack.path))


def compile_blocks(model):
    """--compile: torch.compile the forward of each transformer block, not the whole model (as torchtitan does).

    Outside the compiled blocks, transformers builds the attention mask eagerly: a causal LM without padding
    then gets none and SDPA runs with is_causal=True (its causal flash kernel). Traced whole, transformers
    builds an explicit (bs, 1, L, L) mask instead. Compiling `forward`, not the module's call, leaves the
    module's hooks eager, which is what lets FSDP2's gather/free hooks run around compiled blocks (--fsdp), and
    keeps the parameter names (no `_orig_mod.` prefix). dynamic=True: lengths and batch sizes vary every batch.
    A model whose block list cannot be found is compiled whole.
    """
    blocks = transformer_blocks(model, "--compile") or [model]
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
    return len(blocks)
