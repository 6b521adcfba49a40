"""Measuring helpers shared by the benchmarks (scripts/benchmark.py, experiments/bench_preprocessing.py) and the
CUDA tests: peak memory while something runs, CPU tensor allocations, host synchronisations on a GPU.
"""
import ctypes
import gc
import threading

import psutil
import torch


def release_freed_host_memory():
    """Give freed heap memory back to the OS so RSS starts from what is really live.

    glibc keeps freed blocks below its (dynamic, up to 32 MB) mmap threshold in the heap; without a trim,
    memory freed by the previous run would hide the next run's growth.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS figures are then a little less exact
        pass


class PeakSampler:
    """Samples a process's memory in a background thread (psutil calls release the GIL while reading /proc)."""

    def __init__(self, read, interval=0.005):
        self.read, self.interval = read, interval
        self.start_value = self.peak = read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.read())
            except psutil.Error:  # the process ended
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        try:
            self.peak = max(self.peak, self.read())
        except psutil.Error:
            pass
        return False


def cpu_alloc_peak(fn):
    """Peak bytes of CPU tensor memory live at once while fn() runs, counting only what fn allocates.

    tracemalloc does not see torch's allocator and torch has no CPU counterpart of
    torch.cuda.max_memory_allocated, but the profiler with profile_memory=True records every allocation and
    free of the CPU allocator. Walking those events in time order and keeping a running sum gives the peak
    of live bytes (frees of tensors that existed before fn are not reported, so the sum starts at zero).
    Uses the profiler's event tree, a semi-private API; returns None when it is not there.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        from torch._C._profiler import _EventType

        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
                events.append((e.start_time_ns, e.extra_fields.alloc_size))
            stack.extend(e.children)
    except (AttributeError, ImportError, RuntimeError):
        return None
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_sync_warnings(fn):
    """Run fn() under CUDA's sync debug mode; the warning of each host synchronisation it made.

    tests/test_host_syncs.py checks the training step on the CPU; this confirms it on the device itself.
    """
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


class SavedForBackward:
    """The bytes autograd keeps for backward from the forwards run inside this context: the distinct storages its
    saved-tensor hooks see (a view and its base count once), the given parameters' own storages left out (weights
    are not activations). What a training step must hold at the end of its forward besides weights, gradients and
    optimizer state: the activation part of its memory floor."""

    def __init__(self, parameters=()):
        self._weights = {p.untyped_storage().data_ptr() for p in parameters}
        self._storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._weights:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self):
        return sum(self._storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
