"""distil/measuring.SavedForBackward: the activation part of a step's memory floor (experiments/peer_benchmark.py)."""


def test_saved_for_backward_counts_activations_once_and_no_weights():
    import torch

    from distil.measuring import SavedForBackward

    layer = torch.nn.Linear(32, 64)
    x = torch.randn(8, 32, requires_grad=True)
    with SavedForBackward(layer.parameters()) as saved:
        h = torch.relu(layer(x))  # linear keeps x (and its weight, left out); relu keeps its output
        y = (h * h).sum()  # mul keeps h twice: one storage
    assert saved.bytes == 8 * 32 * 4 + 8 * 64 * 4
    y.backward()
    with SavedForBackward() as none:
        with torch.no_grad():
            layer(x)
    assert none.bytes == 0
