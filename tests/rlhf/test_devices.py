"""Where a role computes (rlhf/devices.py): the contract holds on this machine whatever it has."""

import pytest
import torch

from rlhf.devices import DeviceError, role_device


def test_a_role_without_gpus_or_on_simulated_ones_computes_on_the_cpu():
    assert role_device(0) == torch.device("cpu")
    assert role_device(2, simulated=True) == torch.device("cpu")  # labels for placement only


def test_a_role_given_gpus_uses_the_first_visible_one_or_says_why_it_cannot():
    if torch.cuda.is_available():
        assert role_device(1) == torch.device("cuda", 0)
        assert role_device(0.5) == torch.device("cuda", 0)  # a share of one
    else:
        with pytest.raises(DeviceError, match=r"given 1 GPU\(s\) but torch .* sees none.*simulate_gpus"):
            role_device(1)
