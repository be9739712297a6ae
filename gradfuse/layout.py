"""The bucket layout: a pure function of param_groups. Parameters are sorted by (group, device,
dtype, norm domain) so that each bucket the ops take in one call is a contiguous slice of slots,
and a step costs a few list slices instead of per-tensor Python."""
from typing import Dict, List, Tuple

import torch

from . import hyperparameters as hp
from ._native import GradientInspector
from .distributed_norm import is_dtensor, shard_groups
from .kernel_views import KernelView, kernel_dtype, needs_view


class Bucket:
    """Slots [start, stop) of the sorted parameter list sharing group, device, dtype and norm
    domain (the key of Layout.domains whose process groups its norm partial is reduced over)."""
    __slots__ = ("start", "stop", "group_index", "device", "acc_dtype", "adopts", "domain", "sharded", "viewed",
                 "kernel_dtype")

    def __init__(self, start, group_index, device, acc_dtype, adopts, domain, sharded):
        self.start, self.stop = start, start + 1
        self.group_index, self.device, self.acc_dtype, self.adopts = group_index, device, acc_dtype, adopts
        self.domain, self.sharded = domain, sharded
        self.viewed = False  # some slot is updated through a KernelView (kernel_views.py)

    @property
    def slots(self):
        return range(self.start, self.stop)


class Layout:
    """params: the state_dict order; sorted: the slot order (sorted[k] is params[order[k]]);
    inspector: the native reader of the slots' .grad."""
    __slots__ = ("params", "group_of", "order", "sorted", "buckets", "domains", "has_sharded", "inspector",
                 "group_lists", "views", "slot_of_param", "norm_keys")

    def __init__(self, params, group_of, order, buckets, domains, group_lists):
        self.params: List[torch.Tensor] = params
        self.group_of: List[int] = group_of
        self.order: List[int] = order
        self.sorted: List[torch.Tensor] = [params[i] for i in order]
        self.buckets: List[Bucket] = buckets
        self.domains: Dict[str, Tuple] = domains
        self.has_sharded = any(b.sharded for b in buckets)
        # Every (device, norm domain) of the layout: each rank runs each one's collective every cycle.
        self.norm_keys = tuple(dict.fromkeys((b.device, b.domain) for b in buckets))
        self.inspector = GradientInspector(self.sorted)
        self.group_lists = group_lists  # the params lists it was built from: an edit of param_groups shows
        self.slot_of_param = sorted(range(len(order)), key=lambda k: order[k])  # parameter index -> its slot
        self.views: Dict[int, KernelView] = {k: KernelView(p) for k, p in enumerate(self.sorted) if needs_view(p)}
        for b in buckets:
            b.viewed = any(k in self.views for k in b.slots)

    @property
    def primary_device(self):
        """Where the cycle's counters and the merged norm live: the first parameter's device."""
        return self.params[0].device if self.params else torch.device("cpu")

    def stale(self):
        """Whether parameters were cast or moved since the layout was built (model.double(), .to()):
        each bucket's first parameter is compared (cheap: one per bucket)."""
        for b in self.buckets:
            p = self.sorted[b.start]
            if p.device != b.device or kernel_dtype(p.dtype) != b.kernel_dtype:
                return True
        return False

    def describe(self, index):
        """'parameter i (param_groups[g]['params'][j])' for parameter index i (state_dict order)."""
        group = self.group_of[index]
        position = index - sum(len(params) for params in self.group_lists[:group])
        return f"parameter {index} (param_groups[{group}]['params'][{position}])"

    def describe_slot(self, k):
        return self.describe(self.order[k])

    def write_back(self, bucket_index):
        """After the bucket's update: parameters updated through a working copy get its values."""
        if self.buckets[bucket_index].viewed:
            for k in self.buckets[bucket_index].slots:
                if k in self.views:
                    self.views[k].write_back()


def build_layout(param_groups, process_group, accum_dtype, name) -> Layout:
    """The layout of param_groups (their params lists as they are now)."""
    entries = [(gi, p) for gi, g in enumerate(param_groups) for p in g["params"]]
    params = [p for _, p in entries]
    # Norm domains: the same key on every rank (placements, not object ids), so every rank runs
    # the same collectives in the same order and merges the partials identically.
    domains = {"": (process_group,) if process_group is not None else ()}
    keys = []
    for i, (gi, p) in enumerate(entries):
        domain = ""
        if is_dtensor(p):
            domain = f"mesh{p.device_mesh.mesh_dim_names or p.device_mesh.ndim}:{p.placements}"
            domains[domain] = shard_groups(p, f"{name}: parameter {i}")
        keys.append((gi, str(p.device), str(p.dtype), domain))
    order = sorted(range(len(entries)), key=lambda i: keys[i])
    buckets: List[Bucket] = []
    for k, i in enumerate(order):
        if not buckets or keys[order[k - 1]] != keys[i]:
            p = params[i]
            acc_dtype = hp.accumulator_dtype(kernel_dtype(p.dtype), accum_dtype)
            buckets.append(Bucket(k, keys[i][0], p.device, acc_dtype, acc_dtype == p.dtype, keys[i][3], is_dtensor(p)))
            buckets[-1].kernel_dtype = kernel_dtype(p.dtype)
        buckets[-1].stop = k + 1
    return Layout(params, [gi for gi, _ in entries], order, buckets, domains,
                  [list(g["params"]) for g in param_groups])
