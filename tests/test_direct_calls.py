"""gradfuse._C.direct, the optimizer's dispatcher-free op calls: the same results, bit for bit,
and the same errors as the registered torch.ops; a fall back to torch.ops whenever a mode or a
tensor subclass must see the ops."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data import randn
from gradfuse import FusedAccumSGD, direct_ops, ops
from gradfuse._native import direct
from tolerances import assert_bitwise

F32, BF16 = torch.float32, torch.bfloat16
SHAPES = [(7,), (), (1025, 3), (0,), (33,)]


def clones(tensors):
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("with_amp", [False, True])
def test_accumulate_matches_the_registered_op(device, gen, with_amp):
    accs = [randn(s, F32, device, gen) for s in SHAPES]
    grads = [randn(s, BF16, device, gen) for s in SHAPES]
    amp = torch.tensor(1024.0, device=device) if with_amp else None
    a_accs, a_state = clones(accs), ops.new_norm_state(device)
    b_accs, b_state = clones(accs), ops.new_norm_state(device)
    assert direct.accumulate_(a_accs, grads, 0.25, False, a_state, 2.0, amp)
    ops.accumulate_(b_accs, grads, 0.25, False, b_state, 2.0, amp)
    for i, (a, b) in enumerate(zip(a_accs, b_accs)):
        assert_bitwise(a, b, f"accs[{i}]")
    assert_bitwise(a_state, b_state, "norm_state")


def test_accumulate_norm_matches_the_registered_op(device, gen):
    tensors = [randn(s, F32, device, gen) for s in SHAPES]
    a_state, b_state = ops.new_norm_state(device), ops.new_norm_state(device)
    assert direct.accumulate_norm_(a_state, tensors, float("inf"))
    ops.accumulate_norm_(b_state, tensors, float("inf"))
    assert_bitwise(a_state, b_state, "norm_state")


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_clipped_sgd_step_matches_the_registered_op(device, gen, lr_kind):
    params = [randn(s, F32, device, gen) for s in SHAPES]
    grads = [randn(s, F32, device, gen) for s in SHAPES]
    buffers = [randn(s, F32, device, gen) for s in SHAPES]
    flags = [torch.tensor(i % 2 == 0, device=device) for i in range(len(SHAPES))]
    norm = torch.tensor(3.0, dtype=torch.float64, device=device)
    lr = 0.1 if lr_kind == "float" else torch.tensor(0.1, device=device)
    runs = []
    for call in (direct_ops.clipped_sgd_step_, ops.clipped_sgd_step_):
        state = (clones(params), clones(buffers), clones(flags))
        call(state[0], grads, state[1], state[2], norm, lr, 0.01, 0.9, 0.1, True, False, 0.5, 1.0, True)
        runs.append(state)
    for name, a_list, b_list in zip(("params", "buffers", "flags"), *runs):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            assert_bitwise(a, b, f"{name}[{i}]")


def test_errors_match_and_change_nothing(device, gen):
    accs = [randn(s, F32, device, gen) for s in SHAPES]
    before = clones(accs)
    with pytest.raises(ValueError):
        direct.accumulate_(accs, accs[:2], 1.0, False, None, 2.0, None)
    with pytest.raises(TypeError, match=r"grads\[1\] is not a tensor"):
        direct.accumulate_(accs[:2], [accs[0], 3.0], 1.0, False, None, 2.0, None)
    with pytest.raises(TypeError):
        direct.accumulate_(accs, [a.double() for a in accs], 1.0, False, None, 2.0, None)
    for i, (a, b) in enumerate(zip(accs, before)):
        assert_bitwise(a, b, f"a rejected call changed accs[{i}]")


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_optimizer_ops(device, gen):
    params = [torch.nn.Parameter(randn((5,), F32, device, gen)) for _ in range(3)]
    opt = FusedAccumSGD(params, lr=0.1, momentum=0.9, max_grad_norm=1.0)
    for p in params:
        p.grad = randn((5,), F32, device, gen)
    with OpLog() as log:
        opt.step()
    assert any("gradfuse.clipped_sgd_step_" in name for name in log.names), log.names
    assert any("gradfuse.accumulate_norm_" in name for name in log.names), log.names


class Wrapped(torch.Tensor):
    """A minimal __torch_dispatch__ wrapper: it carries the Python dispatch key."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype, device=elem.device,
                                                   strides=elem.stride())

    def __init__(self, elem):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: x.elem if isinstance(x, Wrapped) else x  # noqa: E731
        args = torch.utils._pytree.tree_map(unwrap, args)
        kwargs = torch.utils._pytree.tree_map(unwrap, kwargs or {})
        return func(*args, **kwargs)


def test_tensor_subclasses_are_left_to_the_dispatcher(device, gen):
    plain = randn((9,), F32, device, gen)
    state = ops.new_norm_state(device)
    assert direct.accumulate_norm_(state, [Wrapped(plain)], 2.0) is False
    assert_bitwise(state, ops.new_norm_state(device), "a declined call changed the norm state")
    direct_ops.accumulate_norm_(state, [Wrapped(plain)], 2.0)  # falls back to torch.ops
    expected = ops.new_norm_state(device)
    ops.accumulate_norm_(expected, [plain], 2.0)
    assert_bitwise(state, expected, "torch.ops fallback")
