"""--compile compiles each transformer block (blocks.compile_blocks), so a causal LM keeps SDPA's is_causal.

torch.compile is swapped for one whose backend records the graphs dynamo captures and runs them as they are
(no inductor code generation: seconds instead of minutes on a CPU); what is compiled, and how, is the
Distiller's own choice.
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import run_loop, tiny_distiller


@pytest.fixture
def recorded_graphs(monkeypatch):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=record))
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def _sdpa_calls(graphs):
    sdpa = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
    return [node for gm in graphs for node in gm.graph.nodes if node.op == "call_function" and node.target in sdpa]


def test_compiled_causal_lm_calls_sdpa_with_is_causal_and_no_mask(tmp_path, recorded_graphs):
    """GPT-2 -> GPT-2 with --compile: every SDPA call in the compiled graphs is causal by flag, without an
    explicit (bs, 1, L, L) mask (which is what a whole-model trace builds, losing the causal flash kernel);
    the embeddings and the head stay outside the compiled graphs."""
    distiller, prepare, batches = tiny_distiller("gpt2_clm", tmp_path, {"compile": True}, n_batches=2)
    run_loop(distiller, prepare, batches)
    calls = _sdpa_calls(recorded_graphs)
    assert calls
    for node in calls:
        assert node.kwargs.get("is_causal") is True and node.kwargs.get("attn_mask") is None, node.format_node()
    targets = {str(node.target) for gm in recorded_graphs for node in gm.graph.nodes}
    assert not any("embedding" in t for t in targets)  # blocks only
    assert list(distiller.student.state_dict()) == list(distiller.student_lm.model.state_dict())  # names kept
    assert all("_orig_mod" not in name for name in distiller.student.state_dict())
