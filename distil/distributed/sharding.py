"""FSDP2: the student and the teacher sharded across ranks, for models that do not fit one GPU under DDP.

    torchrun --nproc_per_node=8 train.py --fsdp --bf16 <flags>                      # both sharded
    torchrun --nproc_per_node=8 train.py --fsdp --bf16 --teacher_replicated <flags> # teacher whole on every rank

DDP (the default) keeps a full copy of everything on every rank. Under `--fsdp` every parameter, gradient and
optimizer state of the student lives on one rank only (1/world_size of each tensor, cut along its first
dimension); each transformer block is gathered just before it runs and freed after, forward and backward. The
teacher is sharded the same way for its forward only (it has no gradients and no optimizer state), or kept
whole on every rank with `--teacher_replicated` when it fits, which saves its all-gathers.

This module makes every sharding decision; the loop (distiller.py) only calls it:
    plan = Fsdp(ctx, bf16=..., shard_teacher=...)
    student_lm = plan.shard_student(student_lm)      # models.RowLogitsLM, the FSDP root of the student
    teacher_lm = plan.shard_teacher(teacher_lm)      # models.TeacherLM
    norm = plan.clip_grad_norm_(params, max_norm)    # the global norm, the same on every rank
    state = plan.gather_state_dict(student_lm)       # full weights on the master's CPU (collective)
The resumable checkpoint (torch.distributed.checkpoint, one file per rank) is in distil/checkpointing.py.

Units: `fully_shard` on each block of the model's layer list (extraction_auto.find_layer_stack), then on the
RowLogitsLM / TeacherLM wrapper as the root, which holds the rest (embeddings, final norm, LM head, the
hidden projection). The wrapper, not the Hugging Face model, is the root because the training forward calls
the model's encoder and its head separately (the head only at the loss rows): the root's hooks must run
around that forward. Tied input/output embeddings sit in the root unit together, as FSDP2 requires.
"""
import warnings

import torch

from distil.distributed.blocks import transformer_blocks
from utils import UserError, logger

# torch.distributed.fsdp and torch.distributed.tensor are imported where a sharded run uses them, so that DDP and
# single-process runs never depend on them (nor on the torch version that provides them).


def _fsdp_api():
    """(fully_shard, MixedPrecisionPolicy, init_device_mesh), or a UserError naming the torch version."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as exc:
        raise UserError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, see requirements.txt); torch "
                        f"{torch.__version__} does not provide it: {exc}") from None
    return fully_shard, MixedPrecisionPolicy, init_device_mesh


def _is_dtensor(tensor):
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def use_fsdp(requested, ctx):
    """Whether this run shards (--fsdp in a process group). A single process outside torchrun has nothing to
    shard across: the run goes on unsharded (a world of size 1, as without --fsdp), with a warning. Under
    torchrun one process shards over a one-rank group (the same code and collectives as several)."""
    if requested and not ctx.distributed:
        logger.warning("--fsdp with a single process: nothing to shard across, training unsharded (world size 1). "
                       "Launch several processes with torchrun to shard.")
        return False
    return requested


def cast_parameters(module, dtype):
    """Cast the floating-point parameters (not the buffers: e.g. rotary frequencies stay float32)."""
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


class Fsdp:
    """The FSDP2 plan of a run: a 1-D mesh over all ranks (one node or several), mixed precision with --bf16.

    ctx: utils.RunContext (process group initialised); bf16: parameters and compute in bfloat16, gradients
    reduced in float32 (the sharded master weights and the optimizer stay float32); shard_teacher: False to
    keep the teacher whole on every rank (--teacher_replicated).
    """

    def __init__(self, ctx, *, bf16=False, shard_teacher=True):
        self.ctx = ctx
        self.device = ctx.device
        self._fully_shard, self._policy_class, init_device_mesh = _fsdp_api()
        self.mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        self.bf16 = bf16
        self.teacher_sharded = shard_teacher

    def _policy(self):
        if not self.bf16:
            return self._policy_class()
        return self._policy_class(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def shard_student(self, student_lm):
        """Shard a models.RowLogitsLM in place, block by block, then the rest; returns it (now the FSDP root).

        Parameters move to the device unit by unit, so a rank never holds more than one full block on it.
        The blocks free their gathered weights after forward (gathered again for backward); the root keeps
        its own (embeddings, head) from forward to backward, where they are needed again at once.
        """
        policy = self._policy()
        # Some models' last hidden states are a view (GPT-2 reshapes them), which FSDP2 warns about in every run:
        # an in-place change of the output would bypass its backward hook. The losses never change their inputs
        # in place (distil/losses.py), so the warning says nothing here.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(RowLogitsLM|TeacherLM)\) returned a "
                                r"view tensor")
        for block in transformer_blocks(student_lm.model, "FSDP"):
            self._fully_shard(block, mesh=self.mesh, mp_policy=policy)
        self._fully_shard(student_lm, mesh=self.mesh, mp_policy=policy)
        n_local = sum(p.to_local().numel() for p in student_lm.parameters())
        logger.info("FSDP: student sharded over %d ranks (%d parameters on this one)%s.", self.ctx.world_size,
                    n_local, ", bf16 parameters and compute, fp32 gradient reduction" if self.bf16 else "")
        return student_lm

    def shard_teacher(self, teacher_lm):
        """Shard a models.TeacherLM for its forward (or move it whole to the device with --teacher_replicated).

        Every unit, the root included, frees its gathered weights right after forward: there is no backward
        to keep them for. Under --bf16 the teacher is stored in bfloat16 (train.py loads it so).
        """
        if self.bf16:
            cast_parameters(teacher_lm, torch.bfloat16)
        if not self.teacher_sharded:
            logger.info("FSDP: teacher replicated on every rank (--teacher_replicated).")
            return teacher_lm.to(self.device)
        for block in transformer_blocks(teacher_lm.model, "FSDP"):
            self._fully_shard(block, mesh=self.mesh, reshard_after_forward=True)
        self._fully_shard(teacher_lm, mesh=self.mesh, reshard_after_forward=True)
        streamed = getattr(teacher_lm.model, "streamed_weights", None)  # built on the meta device (distil/models.py)
        if streamed is not None:
            streamed.load_shards(teacher_lm, self.device, prefix="model.")
            del teacher_lm.model.streamed_weights
        logger.info("FSDP: teacher sharded over %d ranks for its forward.", self.ctx.world_size)
        return teacher_lm

    @staticmethod
    def clip_grad_norm_(params, max_norm):
        """clip_grad_norm_ over sharded gradients: the global 2-norm (each rank's shard norms combined by one
        all-reduce inside DTensor's full_tensor), the same tensor on every rank, so every rank clips by the
        same factor and agrees on skipping a non-finite step. Returns the norm before clipping."""
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if _is_dtensor(norm):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    @staticmethod
    def gather_state_dict(module, prefix=""):
        """Full (unsharded) weights of `module` on the master, as CPU tensors; {} on the other ranks.

        Collective. Tensors are gathered one at a time and moved to the master's CPU as they come, so no rank
        ever holds a second full copy of the model on its device, and the other ranks hold none at all.
        Only the keys under `prefix` are kept, with the prefix removed.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if full:
            # A tied parameter (output projection = word embeddings) is gathered once per name: make its names
            # share one tensor again, as in the unsharded model's state_dict (save_pretrained then writes it once).
            first_name = {}
            for name, param in module.named_parameters(remove_duplicate=False):
                if name in full:
                    full[name] = full[first_name.setdefault(id(param), name)]
        return {key[len(prefix):]: value for key, value in full.items() if key.startswith(prefix)}

    @staticmethod
    def parameter_statistics(named_parameters):
        """{name: (mean, std)} of sharded parameters, from each rank's shard sums and one all-reduce.

        Collective (every rank calls it); for the TensorBoard parameter curves.
        """
        names, sums = [], []
        first = torch.distributed.get_rank() == 0
        for name, param in named_parameters:
            if _is_dtensor(param):
                local = param.detach().to_local().double()
            else:  # replicated: counted once
                local = param.detach().double().flatten()[: param.numel() if first else 0]
            sums.append(torch.stack([local.sum(), (local * local).sum(), local.new_tensor(local.numel())]))
            names.append(name)
        if not sums:
            return {}
        totals = torch.stack(sums)  # (n_params, 3): sum, sum of squares, count
        torch.distributed.all_reduce(totals)
        out = {}
        for name, (total, squares, count) in zip(names, totals.cpu().tolist()):
            mean = total / max(count, 1)
            var = (squares - count * mean * mean) / (count - 1) if count > 1 else 0.0
            out[name] = (mean, max(var, 0.0) ** 0.5)
        return out
