"""The orders examples are read in: evaluation's longest-first order and its inverse."""

from pipelines.batching import in_dataset_order, longest_first


def test_longest_first_keeps_ties_in_dataset_order():
    lengths = [3, 1, 4, 1, 5, 4]
    assert longest_first(lengths) == [4, 2, 5, 0, 1, 3]


def test_outputs_in_longest_first_order_go_back_to_dataset_order():
    lengths = [3, 1, 4, 1, 5, 4]
    order = longest_first(lengths)
    outputs = [f"out-{i}" for i in order]  # what an evaluation in that order produces
    assert in_dataset_order(outputs, order) == [f"out-{i}" for i in range(len(lengths))]


def test_a_count_mismatch_is_an_error_not_a_silent_shift():
    import pytest

    with pytest.raises(ValueError, match="3 outputs for 2 examples"):
        in_dataset_order([1, 2, 3], [1, 0])
