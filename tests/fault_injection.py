"""Run train.main with a fault injected at a chosen iteration (used by test_resume.py, not a test itself).

Environment: FAULT = kill | term | nan | nan_forever, FAULT_ITER = iteration (1-based, counted over the run),
FAULT_RANK = which rank (default 0), FINAL_WEIGHTS_DIR = where each rank saves its final student (optional).
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import distiller  # noqa: E402
import train  # noqa: E402

FAULT = os.environ.get("FAULT", "")
AT = int(os.environ.get("FAULT_ITER", "0"))
RANK = int(os.environ.get("FAULT_RANK", "0"))
MY_RANK = int(os.environ.get("RANK", "0"))

original_compute_losses = distiller.Distiller.compute_losses
original_iter = distiller.Distiller.iter


def compute_losses(self, *args, **kwargs):
    losses = original_compute_losses(self, *args, **kwargs)
    iteration = self.n_total_iter + 1  # the iteration being computed
    poisoned = (FAULT == "nan" and iteration == AT) or (FAULT == "nan_forever" and iteration >= AT)
    if poisoned and MY_RANK == RANK:
        losses = {k: v * float("nan") for k, v in losses.items()}
    return losses


def iter_with_signal(self, bar=None):
    original_iter(self, bar)
    if self.n_total_iter == AT and MY_RANK == RANK:
        if FAULT == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif FAULT == "term":
            os.kill(os.getpid(), signal.SIGTERM)


distiller.Distiller.compute_losses = compute_losses
distiller.Distiller.iter = iter_with_signal

if __name__ == "__main__":
    try:
        result = train.main(sys.argv[1:])
        out = os.environ.get("FINAL_WEIGHTS_DIR")
        if out:
            torch.save(result.student.state_dict(), os.path.join(out, f"rank{MY_RANK}.pt"))
    except (train.UserError, ValueError, FileNotFoundError, train.TrainingError) as exc:
        train.fail(str(exc))
    finally:
        train.cleanup_distributed()
