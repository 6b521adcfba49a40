"""Record the operations that make the host wait for the device (used by test_host_syncs.py, not a test itself).

On CUDA, reading a value computed on the GPU (.item(), bool(), int()), or an operation whose output size
depends on the data (nonzero, boolean indexing, masked_select, unique, ...), blocks the CPU until the GPU
has caught up, so the GPU then idles while Python launches the next kernels. On the CPU these operations
are free, but they can be seen as they happen: this dispatch mode records each one with its Python stack,
so a CPU test can show that a training step would make no such synchronisation on a GPU. Host-side values
read through NumPy (the DataLoader's lengths, host copies of device flags) are not dispatched, so not seen.
"""
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_ALWAYS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal, aten._unique2,
           aten.unique_consecutive, aten.unique_dim, aten.allclose, aten.masked_scatter}
_BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class HostSyncRecorder(TorchDispatchMode):
    """with HostSyncRecorder() as rec: ...; then rec.events is a list of (op name, stack text)."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        hit = packet in _ALWAYS
        if packet in _BOOL_INDEXED and len(args) > 1:
            hit = any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or [])
        if packet is aten.repeat_interleave:
            hit = kwargs.get("output_size") is None
        if hit:
            self.events.append((str(func), "".join(traceback.format_stack()[:-1])))
        return func(*args, **kwargs)
