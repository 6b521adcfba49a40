"""The demo's steps as the user sees them: each repository script run with this interpreter, its command line
printed (shell-pasteable), its output in a log file, a progress line from its metrics.jsonl now and then, and a
failure reported with the step, command and log (scripts/demo.py).
"""
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, above this package


class StepFailed(Exception):
    def __init__(self, step, message, command=None, log=None):
        super().__init__(message)
        self.step, self.command, self.log = step, command, log


class Pipeline:
    def __init__(self, workdir, n_steps, verbose=False):
        self.workdir = workdir
        self.verbose = verbose
        self.timings = {}
        self.n_steps = n_steps
        self.step_no = 0
        self.step_name = None

    def rel(self, path):
        """Paths inside the repository are shown (and passed) relative to it, as a user would type them."""
        path = os.path.abspath(path)
        rel = os.path.relpath(path, REPO)
        return path if rel.startswith("..") else rel

    def begin(self, name):
        self.step_no += 1
        self.step_name = name
        self._t0 = time.time()
        print(f"\n[{self.step_no}/{self.n_steps}] {name}", flush=True)

    def end(self):
        elapsed = time.time() - self._t0
        self.timings[self.step_name] = round(elapsed, 1)
        print(f"    done in {elapsed:.1f}s", flush=True)

    def run(self, script, args, log_name, progress_file=None):
        """Run a repository script with this interpreter; output goes to a log (and the console with
        --verbose). While training, a progress line is printed from the run's metrics.jsonl now and then."""
        cmd = [sys.executable, script, *[str(a) for a in args]]
        shown = "python " + shlex.join(cmd[1:])
        print(_wrap_command(shown), flush=True)
        log_path = os.path.join(self.workdir, "logs", log_name)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        captured = []
        with open(log_path, "w") as log:
            log.write(f"$ {shown}\n")
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace")

            def pump():
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    captured.append(line)
                    if self.verbose:
                        sys.stdout.write("      " + line)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            last_report = time.time()
            while True:
                try:
                    proc.wait(timeout=2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if progress_file and not self.verbose and time.time() - last_report >= 30:
                    last_report = time.time()
                    self._report_progress(progress_file, captured)
            reader.join()
        if proc.returncode != 0:
            raise StepFailed(self.step_name, f"exit status {proc.returncode}", shown, log_path)
        return "".join(captured)

    def _report_progress(self, metrics_path, captured):
        total = optimizer_steps("".join(captured))
        record = _last_metrics(metrics_path)
        if record is not None:
            # "step" counts iterations (batches); the total is in optimizer steps.
            if "optimizer_step" in record:
                where = f"optimizer step {record['optimizer_step']}" + (f"/{total}" if total else "")
            else:
                where = f"iteration {record['step']}"
            print(f"      {where}  train loss {record.get('loss', float('nan')):.3f}  "
                  f"({time.time() - self._t0:.0f}s)", flush=True)


def _wrap_command(command, width=110):
    """Shell-pasteable, one `--flag value` group never split across lines."""
    lines, current = [], "    $"
    for part in re.split(r" (?=--)", command):
        if len(current) + 1 + len(part) > width and current.strip() != "$":
            lines.append(current + " \\")
            current = "       "
        current += " " + part
    return "\n".join(lines + [current])


def optimizer_steps(output):
    found = re.findall(r"(\d+) optimizer steps", output)
    return int(found[-1]) if found else None


def _last_metrics(path):
    try:
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
