"""The device-tensor state of a cycle policy (clip or skip), created on the norm's device at first
use and checkpointed with the optimizer."""
import torch


class DeviceState:
    name = ""
    state: dict

    def fresh_state(self, device):
        """The policy's state before its first cycle (a dict of tensors on device)."""
        return {}

    def state_on(self, device):
        """The state, created on (or moved to) the norm's device."""
        if not self.state:
            self.state = self.fresh_state(device)
        elif next(iter(self.state.values())).device != device:
            self.state = {key: value.to(device) for key, value in self.state.items()}
        return self.state

    def load_state(self, state, device):
        """A saved state back (copies), checked against this policy's layout first."""
        expected = self.fresh_state(device)
        if not isinstance(state, dict) or set(state) != set(expected) or any(
                not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape for k, v in expected.items()):
            raise ValueError(f"the saved {self.name} state does not match this optimizer's {self!r}")
        self.state = {key: state[key].to(device=device, dtype=expected[key].dtype).clone() for key in expected}
