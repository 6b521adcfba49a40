"""Shared helpers: logging, seeding, process-group setup, run metadata.

`init_distributed()` is the one place that decides how many processes there are, which device each
one drives and which one is the master. A single `python train.py` is simply a world of size 1.
"""
import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import re
import socket
import sys

import numpy as np
import torch

logging.basicConfig(
    format="%(asctime)s - %(levelname)s - %(name)s - PID: %(process)d - %(message)s",
    datefmt="%m/%d/%Y %H:%M:%S",
    level=logging.INFO,
)
logger = logging.getLogger("distil")


class UserError(Exception):
    """A problem with the user's input (a flag, a file): reported as one line, exit status 2."""


def first_line(exc):
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_pretrained(load, flag, name, what, cache_dir=None):
    """load() (a from_pretrained call, or any reader of a file the user named), any failure reported as the
    one-line UserError `flag name: cannot load what (reason)`. A malformed folder fails in many ways (JSON, a
    safetensors header, a size mismatch, an unknown model type): every one is the input's fault. A hub name
    that cannot be fetched is said at once (check_hub_name); cache_dir: the run's --cache_dir, if any."""
    check_hub_name(flag, name, cache_dir)
    try:
        return load()
    except Exception as exc:
        raise UserError(f"{flag} {name}: cannot load {what} ({first_line(exc)})") from None


# -- model names on the Hugging Face hub ----------------------------------------------------------------------
# A name that is no local path goes to the hub. Without network, transformers retries for minutes and then
# fails with a message that hides the cause (e.g. "no vocabulary found" for a tokenizer): decide up front.
HUB_TIMEOUT_S = 3
_TRUE = {"1", "on", "yes", "true"}
_FILE_SUFFIXES = (".json", ".bin", ".pt", ".pth", ".safetensors", ".gguf", ".txt", ".model", ".pickle", ".npy")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def hub_offline():
    """Whether the user asked for no hub access (huggingface_hub's and transformers' variables)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_cache_has(name, cache_dir=None):
    from huggingface_hub import constants

    folder = "models--" + name.replace("/", "--")
    return any(os.path.isdir(os.path.join(root, folder)) for root in (cache_dir, constants.HF_HUB_CACHE) if root)


@functools.lru_cache(maxsize=None)
def hub_unreachable():
    """None when a TCP connection to the hub (or the https proxy that would carry it) opens within HUB_TIMEOUT_S,
    else why not (one check per process)."""
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = next((os.environ[v] for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(v)), None)
    target = urlparse(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else endpoint
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as exc:
        return f"{target.hostname}:{port}: {exc.strerror or exc or type(exc).__name__}"
    return None


def check_hub_name(flag, name, cache_dir=None):
    """When `name` is not a local path but reads as a hub repository id, make sure it can be had: from the local
    hub cache under HF_HUB_OFFLINE, else from a hub that answers. A one-line UserError otherwise, at once."""
    if not isinstance(name, str) or os.path.exists(name) or name.endswith(_FILE_SUFFIXES) or not _REPO_ID.match(name):
        return
    if hub_offline():
        if not _hub_cache_has(name, cache_dir):
            raise UserError(f"{flag} {name}: no such local folder, and HF_HUB_OFFLINE is set: it is not in the hub "
                            "cache either; give a local folder or download it on a machine with network first")
        return
    reason = hub_unreachable()
    if reason:
        cached = " or set HF_HUB_OFFLINE=1 to load it from the hub cache" if _hub_cache_has(name, cache_dir) else ""
        raise UserError(f"{flag} {name}: no such local folder, and the Hugging Face hub cannot be reached "
                        f"({reason}); give a local folder{cached}")


@contextlib.contextmanager
def user_input(flag, errors=(ValueError, OSError)):
    """Inside, reading the input of `flag` may fail on a missing or malformed file: such an error becomes a
    one-line UserError that names the flag (this project's readers start their messages with the path)."""
    try:
        yield
    except UserError:
        raise
    except errors as exc:
        raise UserError(f"{flag} {first_line(exc)}") from None


def fail(message):
    """Print a one-line error and exit non-zero. For scripts' entry points only."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def amp_dtype(bf16=False, fp16=False):
    """The compute dtype of a run's --bf16 / --fp16 (autocast for training and evaluation, storage of the frozen
    teacher); None: float32."""
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else None


def _env_int(name, default):
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Where this process stands in the run: what init_distributed decided, read by everything after it."""
    world_size: int = 1
    global_rank: int = 0
    local_rank: int = 0
    n_nodes: int = 1
    node_id: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # a process group is initialised (several processes, or torchrun with one)

    @property
    def is_master(self):
        """Rank 0: the one process that writes files and logs at INFO level."""
        return self.global_rank == 0

    @property
    def multi_gpu(self):
        """More than one process (the original's name, whatever the device)."""
        return self.world_size > 1


def init_distributed(n_gpu=1, local_rank=-1):
    """The RunContext of this process; initialises the process group when there are several processes, or one
    launched by torchrun (a one-rank group).

    Works with `torchrun` (RANK, LOCAL_RANK, WORLD_SIZE in the environment) and with the README's
    `python -m torch.distributed.launch` recipe (the same variables, plus N_GPU_NODE / N_NODES /
    NODE_RANK, which we only use for logging). NCCL drives GPUs; gloo lets a CPU-only machine run
    several processes, which is how the tests exercise the distributed code. n_gpu is --n_gpu (0: CPU),
    local_rank the --local_rank flag of the old launcher (-1: not given).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    global_rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", local_rank if local_rank >= 0 else 0)
    use_cuda = n_gpu > 0 and torch.cuda.is_available()
    if n_gpu > 0 and not torch.cuda.is_available():
        logger.warning("--n_gpu %d asked for GPUs but CUDA is not available: training on the CPU.", n_gpu)
    if world_size > 1 and use_cuda and n_gpu != world_size:
        logger.info("--n_gpu %d differs from WORLD_SIZE %d: WORLD_SIZE wins.", n_gpu, world_size)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    ctx = RunContext(world_size=world_size, global_rank=global_rank, local_rank=local_rank,
                     n_nodes=_env_int("N_NODES", _env_int("NNODES", 1)),
                     node_id=_env_int("NODE_RANK", _env_int("GROUP_RANK", 0)),
                     device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))

    # Under torchrun a single process gets a process group too: DDP or FSDP over one rank runs the collectives
    # (NCCL on a GPU) that several ranks would, which is how a one-GPU machine checks that path.
    launched = "TORCHELASTIC_RUN_ID" in os.environ
    if (ctx.multi_gpu or launched) and not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": ctx.device} if use_cuda else {}
        torch.distributed.init_process_group(backend=backend, init_method="env://", **kwargs)
    ctx = dataclasses.replace(ctx, distributed=torch.distributed.is_available() and torch.distributed.is_initialized())
    logger.info(f"--- Global rank: {ctx.global_rank} - world size {ctx.world_size}, node {ctx.node_id}/{ctx.n_nodes}, "
                f"local rank {ctx.local_rank}, device {ctx.device}, host {socket.gethostname()}")
    if not ctx.is_master:
        logging.getLogger("distil").setLevel(logging.WARNING)
    return ctx


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (the model itself when it has none)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def cleanup_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def git_info(path=None):
    """Commit and branch of the code that ran, or a note saying why they are unknown."""
    try:
        import git

        repo = git.Repo(path or os.path.dirname(os.path.abspath(__file__)), search_parent_directories=True)
        return {"repo_id": str(repo), "repo_sha": str(repo.head.object.hexsha),
                "repo_branch": str(repo.active_branch) if not repo.head.is_detached else "detached",
                "dirty": repo.is_dirty()}
    except Exception as exc:  # not a checkout, git missing: metadata only, never fatal
        return {"unavailable": f"{type(exc).__name__}: {exc}"}


def append_jsonl(path, record):
    """One JSON line appended to a metrics.jsonl: the machine-readable twin of TensorBoard."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_json_atomic(path, payload):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_report(prefix, text, payload):
    """PREFIX.md (the markdown text) and PREFIX.json (the numbers), each replaced whole, folders made as needed:
    the --output of the scripts that print a table."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp = f"{prefix}.md.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, f"{prefix}.md")
    write_json_atomic(f"{prefix}.json", payload)


SPECIAL_TOKEN_NAMES = ("cls_token", "sep_token", "bos_token", "eos_token", "pad_token", "unk_token", "mask_token")


def special_token_ids(tokenizer):
    """{'cls_token': 101, ...} for the special tokens this tokenizer defines, under the original's names."""
    ids = {name: getattr(tokenizer, name + "_id", None) for name in SPECIAL_TOKEN_NAMES}
    return {name: int(i) for name, i in ids.items() if i is not None}


def refuse_gguf(path, flag):
    """A .gguf file where a model folder is expected: name the command that converts it."""
    if path is not None and str(path).lower().endswith(".gguf"):
        raise UserError(f"{flag} {path}: a GGUF file; convert it into a model folder first with "
                        f"python scripts/convert_gguf.py --gguf_file {path} --dump_folder <folder>")
