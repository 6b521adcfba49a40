"""What a rerunnable multi-seed measurement shares (experiments/ablation.py, experiments/instruction_distillation.py):
the --seeds flag, the default student layers, a metric's spread over seeds, and `Protocol`, which runs each step as
a repository script under the work folder, skips a step whose output exists (a rerun resumes), prints the commands
under --dry_run, and times the training runs.
"""
import json
import os
import re
import shlex
import statistics
import time

from demo.pipeline import Pipeline, StepFailed
from utils import UserError, fail, write_json_atomic


def parse_seeds(text):
    """--seeds as a list of ints; anything but comma-separated integers is a UserError."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(re.fullmatch(r"-?[0-9]+", item) for item in items):
        raise UserError(f"--seeds {text!r}: expected comma-separated integers")
    return [int(item) for item in items]


def default_layers(n_teacher_layers):
    """Half the depth, as the first half and the last half of the teacher: for SmolLM2-135M the layers 0-7 and
    23-29 start at a held-out loss of 8.9 nats, where every other layer (0,2,...,28) starts at 14.4, worse than
    a uniform guess (10.8)."""
    n = max(1, n_teacher_layers // 2)
    first = (n + 1) // 2
    return list(range(first)) + list(range(n_teacher_layers - (n - first), n_teacher_layers))


def spread(values, digits):
    """'mean \u00b1 sample std [min, max]' of the values, or the value alone when there is one: one run measures no
    spread, and '\u00b1 0.00' would claim one."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (f"{statistics.fmean(values):.{digits}f} \u00b1 {statistics.stdev(values):.{digits}f} "
            f"[{min(values):.{digits}f}, {max(values):.{digits}f}]")


class Protocol:
    """A measurement over arms x seeds. Subclasses name their ARMS, build the steps in run() and check their own
    flags in check() after check_common()."""

    ARMS = {}

    def __init__(self, args, fixed_steps, steps_per_run):
        """fixed_steps: the steps before the runs; steps_per_run: those of each (arm, seed) (for the step count)."""
        self.args = args
        self.workdir = os.path.abspath(args.workdir)
        self.seeds = parse_seeds(args.seeds)
        self.arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
        n_steps = fixed_steps + len(self.seeds) * len(self.arms) * steps_per_run
        self.pipe = Pipeline(self.workdir, n_steps=n_steps, verbose=args.verbose)

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)

    def check_common(self, files, positive):
        """The input files exist, the arms are known, the counts are at least 1 (flag names without dashes)."""
        a = self.args
        for flag in files:
            if not os.path.exists(getattr(a, flag)):
                raise UserError(f"--{flag} {getattr(a, flag)}: no such file or folder")
        unknown = [arm for arm in self.arms if arm not in self.ARMS]
        if unknown or not self.arms:
            raise UserError(f"--arms {a.arms!r}: choose among {', '.join(self.ARMS)}")
        for flag in positive:
            if getattr(a, flag) < 1:
                raise UserError(f"--{flag} must be at least 1")

    def step(self, name, done, script, args, log, progress=None):
        """Run a script unless its output `done` exists (a rerun resumes); --dry_run only prints it."""
        self.pipe.begin(name)
        if os.path.exists(done):
            print(f"    already done: {self.pipe.rel(done)}", flush=True)
        elif self.args.dry_run:
            print("    python " + shlex.join(str(x) for x in [script, *args]), flush=True)
        else:
            self.pipe.run(script, args, log, progress)
        self.pipe.end()

    def timed_train(self, arm, seed, run, train_args, timing_name):
        """train.py with train_args into the folder `run`: timed_run's wall seconds."""
        return self.timed_run(f"Train {arm} seed {seed}", run, "train.py", train_args, f"train_{arm}_seed{seed}.log",
                              timing_name)

    def timed_run(self, name, run, script, args, log, timing_name):
        """A training script writing into the folder `run`; its wall seconds, kept in run/timing_name once the run
        is complete (a resumed protocol reads them back), nan under --dry_run."""
        timing = os.path.join(run, timing_name)
        start = time.time()
        self.step(name, timing, script, args, log, progress=os.path.join(run, "metrics.jsonl"))
        if self.args.dry_run:
            return float("nan")
        if not os.path.exists(timing):
            write_json_atomic(timing, {"train_seconds": round(time.time() - start, 1)})
        with open(timing) as f:
            return json.load(f)["train_seconds"]

    def write_results(self, name, layers, records, table):
        """name.json (the settings, the student's layers, every record) and name.md (the table), then the table."""
        write_json_atomic(self.path(f"{name}.json"), {"settings": vars(self.args), "layers": layers, "results": {
            (k if isinstance(k, str) else f"{k[0]}_seed{k[1]}"): v for k, v in records.items()}})
        with open(self.path(f"{name}.md"), "w") as f:
            f.write(table + "\n")
        print("\n" + table, flush=True)


def teacher_depth(folder):
    """The number of blocks of the model in `folder`, or 0 before it exists (a dry run before the conversion)."""
    config = os.path.join(folder, "config.json")
    if not os.path.exists(config):
        return 0
    with open(config) as f:
        values = json.load(f)
    return values.get("num_hidden_layers") or values.get("n_layer") or 0


def main_of(protocol_class, args):
    """Build, check and run a protocol; user errors and a failed step are one line and a non-zero exit."""
    try:
        protocol = protocol_class(args)
        protocol.check()
        return protocol.run()
    except UserError as exc:
        fail(str(exc))
    except StepFailed as exc:
        fail(f"{exc.step}: {exc} (log: {exc.log})")
