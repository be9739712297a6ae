"""Shared helpers of the robustness tests (bad inputs, explosions, resume, determinism, memory):
a live two-group FusedAccumSGD driven in lock-step with the float64 reference, and bitwise
snapshots of everything an optimizer holds."""
import copy

import torch

import harness
import reference as ref
from data import generator, randn
from gradfuse import FusedAccumSGD
from tolerances import assert_bitwise, loosest

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

# Two groups with different dtypes and every SGD feature in use; clipping is active for randn grads.
SHAPES = [(5, 4), (7,), (3,), (6,)]
DTYPES = [F32, BF16, F64, F32]
GROUPS = [dict(params=[0, 1], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
               maximize=False),
          dict(params=[2, 3], lr=0.05, momentum=0.5, dampening=0.0, weight_decay=0.0, nesterov=True,
               maximize=True)]
HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


class LiveRun:
    """FusedAccumSGD and ReferenceAccumSGD fed the same random micro-batches; compare() checks
    them after every completed cycle."""

    def __init__(self, device, seed, k=3, max_grad_norm=1.0, shapes=SHAPES, dtypes=DTYPES, groups=GROUPS,
                 devices=None, **opt_kwargs):
        self.k, self.shapes, self.dtypes = k, list(shapes), list(dtypes)
        self.devices = list(devices) if devices else [device] * len(self.shapes)
        self.device = self.devices[0]
        self.gen = generator(seed)
        self.params = [randn(s, d, dev, self.gen) for s, d, dev in zip(shapes, dtypes, self.devices)]
        self.initial = [p.clone() for p in self.params]
        self.groups = copy.deepcopy(groups)
        self.opt = FusedAccumSGD([dict(params=[self.params[i] for i in g["params"]], **{h: g[h] for h in HYPER})
                                  for g in self.groups], accumulation_steps=k, max_grad_norm=max_grad_norm,
                                 **opt_kwargs)
        self.model = ref.ReferenceAccumSGD(self.initial, self.groups, accumulation_steps=k,
                                           max_grad_norm=max_grad_norm, storage=list(dtypes),
                                           acc_storage=[harness.acc_dtype_of(d) for d in dtypes])
        self.norm_dtype = loosest([harness.acc_dtype_of(d) for d in dtypes])
        self.saved_hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        self.cycles = 0

    def random_grads(self, scale=1.0):
        return [randn(s, d, dev, self.gen, scale) for s, d, dev in zip(self.shapes, self.dtypes, self.devices)]

    def set_grads(self, grads=None):
        """Puts valid fresh gradients on every parameter (returns them)."""
        grads = self.random_grads() if grads is None else grads
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.clone()
        return grads

    def feed(self, n, check=True, poison=None):
        """n micro-batches through both implementations; poison(grads) may edit them in place
        (NaN/inf injection) before either implementation sees them."""
        for _ in range(n):
            grads = self.random_grads()
            if poison is not None:
                poison(grads)
            self.set_grads(grads)
            self.model.step(grads)
            self.opt.step()
            self.opt.zero_grad()
            assert self.opt.micro_step == self.model.micro_step
            if self.model.micro_step == 0:
                self.cycles += 1
                if check:
                    self.compare(f"after cycle {self.cycles}")

    def compare(self, where):
        harness.compare(self.opt, self.model, self.params, self.dtypes, self.norm_dtype, where)

    def fix(self):
        """Undoes what a bad-input case did from the outside: hyperparameters back, no gradients."""
        for group, saved in zip(self.opt.param_groups, self.saved_hyper):
            for key in [k for k in group if k != "params" and k not in saved]:
                del group[key]
            group.update(saved)
        for p in self.params:
            p.grad = None


def snapshot(opt, params):
    """Everything observable about an optimizer, deep-copied: params, momentum buffers,
    state_dict (incl. accumulators and micro_step), counters."""
    return dict(params=[p.detach().clone() for p in params],
                buffers=[None if opt.state.get(p, {}).get("momentum_buffer") is None
                         else opt.state[p]["momentum_buffer"].clone() for p in params],
                state_dict=copy.deepcopy(opt.state_dict()),
                skipped=opt.skipped_steps.clone(), micro_step=opt.micro_step,
                last_norm=None if opt.last_grad_norm is None else opt.last_grad_norm.clone())


def assert_same(a, b, where="state"):
    """Recursive bit-identity of nested dicts/lists/tensors/numbers."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{where}: {type(a)} vs {type(b)}"
        assert a.device == b.device, f"{where}: device {a.device} vs {b.device}"
        assert_bitwise(a, b, where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs " \
                                                         f"{sorted(map(str, b)) if isinstance(b, dict) else b}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def held_tensors(opt, exclude=()):
    """Unique storages of every tensor reachable from the optimizer's attributes (state,
    caches, counters), except the parameters and `exclude`: {storage ptr: (nbytes, where)}."""
    skip = {t.untyped_storage().data_ptr() for t in list(exclude)}
    skip |= {p.untyped_storage().data_ptr() for g in opt.param_groups for p in g["params"]}
    found, seen = {}, set()

    def walk(obj, where):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in skip and storage.nbytes():
                found.setdefault(storage.data_ptr(), (storage.nbytes(), where))
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{where}[{type(key).__name__}]" if isinstance(key, torch.Tensor) else f"{where}[{key!r}]")
        elif isinstance(obj, (list, tuple, set)):
            for i, value in enumerate(obj):
                walk(value, f"{where}[{i}]")
        elif type(obj).__module__.startswith("gradfuse."):  # the optimizer's own objects (its store, ...)
            names = list(getattr(obj, "__dict__", {})) + list(getattr(type(obj), "__slots__", ()))
            for name in names:
                if hasattr(obj, name):
                    walk(getattr(obj, name), f"{where}.{name}")

    for name, value in vars(opt).items():
        walk(value, name)
    return found
