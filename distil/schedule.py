"""How many optimizer steps a run makes, how many of them warm up, and when such a plan is worth a warning.

With the original default --gradient_accumulation_steps 50, a run over a few dozen batches makes one
optimizer step, and the linear warmup's first step has a learning rate of 0: the student ends exactly as it
started. The default stays (faithful), but `short_run_warnings` says so before training starts.
"""
import dataclasses
import math

# Below this many optimizer steps a run is "short": it can hardly learn anything, whatever the learning rate.
FEW_STEPS = 10


@dataclasses.dataclass(frozen=True)
class StepPlan:
    total: int  # optimizer steps of the whole run (the length of the learning-rate schedule)
    warmup: int  # of which the learning rate rises linearly from 0
    n_epochs: int  # passes over the data the loop starts (the last one may stop early under max_steps)
    steps_per_epoch: int


def plan_steps(batches_per_epoch, n_epoch, gradient_accumulation_steps, warmup_prop, max_steps=None):
    """The schedule of a run: every epoch ends on an optimizer step (its last group may be short); with
    max_steps the run stops after that many steps, taking as many epochs as it needs (n_epoch is ignored)."""
    steps_per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    if max_steps:
        total = max_steps
        n_epochs = math.ceil(max_steps / steps_per_epoch) if steps_per_epoch else 0
    else:
        total, n_epochs = steps_per_epoch * n_epoch, n_epoch
    return StepPlan(total=total, warmup=math.ceil(total * warmup_prop), n_epochs=n_epochs,
                    steps_per_epoch=steps_per_epoch)


def short_run_warnings(plan, batches_per_epoch, gradient_accumulation_steps, warmup_prop):
    """Sentences for the log when the plan can barely train: too few steps, or warmup never ends."""
    warnings = []
    if plan.total < FEW_STEPS:
        warnings.append(
            f"only {plan.total} optimizer step(s): {batches_per_epoch} batches per epoch / "
            f"--gradient_accumulation_steps {gradient_accumulation_steps} = {plan.steps_per_epoch} step(s) per "
            f"epoch; lower --gradient_accumulation_steps or raise --max_steps for a run that learns")
    if plan.total and plan.warmup >= plan.total:
        warnings.append(
            f"the learning rate never leaves warmup ({plan.warmup} warmup step(s) of {plan.total}; the first step "
            f"runs at learning rate 0): lower --warmup_prop (now {warmup_prop}) or make more steps")
    return warnings
