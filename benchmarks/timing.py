"""The one timing helper used by every benchmark.

measure() takes several named implementations of the same work and times them
*interleaved* (A B C A B C ...) so slow drifts of a shared machine hit all of them alike:

* warm-up calls first, at least one per rotated input set (its first call builds lazy state such
  as optimizer buffers), the last ones also sizing the repetitions for a time budget;
* every repetition is timed on its own: on CPU with time.perf_counter, on CUDA with a pair
  of CUDA events around the call (after torch.cuda.synchronize() when an untimed `setup`
  ran first, so queued setup kernels never hide the call's launch overhead), or - for
  launch-bound pure-kernel cases - by replaying a CUDA graph captured from the call;
* the median is the headline, min / quartiles / IQR and every raw sample are kept;
* `n_sets` input sets are rotated (repetition k uses set k % n_sets) so that a case whose
  data would fit in the last-level cache is not timed hot; see rotation_sets().
"""
import math
import statistics
import time
from dataclasses import dataclass, field, asdict
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Bench:
    """One implementation to time. fn(i) does the work on input set i; setup(i), when
    given, runs untimed before each repetition (e.g. restoring a gradient the last
    repetition consumed)."""
    fn: Callable[[int], None]
    setup: Optional[Callable[[int], None]] = None
    n_sets: int = 1
    cuda_graph: bool = False


@dataclass
class Timing:
    median_s: float
    min_s: float
    q1_s: float
    q3_s: float
    iqr_s: float
    mean_s: float
    reps: int
    n_sets: int
    mode: str
    samples_s: List[float] = field(default_factory=list)
    note: str = ""

    def to_dict(self):
        return asdict(self)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def last_level_cache_bytes(device) -> int:
    """CPU: the largest cache level sysfs reports (L3 usually); CUDA: the L2 size."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 << 20))
    best = 0
    try:
        import glob
        for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
            text = open(path).read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            value = int(text[:-1]) * mult if text[-1] in "KMG" else int(text)
            best = max(best, value)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def rotation_sets(bytes_per_set: int, llc_bytes: int, max_sets: int = 64, budget_bytes: int = 4 << 30) -> int:
    """How many independent input sets to rotate: enough that the rotated footprint is
    >= 4x the last-level cache, capped at max_sets and at budget_bytes of memory."""
    if bytes_per_set <= 0 or bytes_per_set >= 4 * llc_bytes:
        return 1
    wanted = math.ceil(4 * llc_bytes / bytes_per_set)
    return max(1, min(wanted, max_sets, budget_bytes // bytes_per_set))


def summarize(samples: List[float], n_sets: int, mode: str, note: str = "") -> Timing:
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return Timing(median_s=statistics.median(ordered), min_s=ordered[0], q1_s=q1, q3_s=q3, iqr_s=q3 - q1,
                  mean_s=statistics.fmean(ordered), reps=len(ordered), n_sets=n_sets, mode=mode,
                  samples_s=list(samples), note=note)


class _Runner:
    """Times single repetitions of one Bench on one device."""

    def __init__(self, bench: Bench, device):
        self.bench = bench
        self.cuda = torch.device(device).type == "cuda"
        self.k = 0
        self.graphs = None
        self.note = ""
        self.mode = "cuda_events" if self.cuda else "perf_counter"

    def _index(self):
        i = self.k % self.bench.n_sets
        self.k += 1
        return i

    def try_capture(self):
        """Captures one CUDA graph per input set (after the eager warm-up ran)."""
        if not (self.cuda and self.bench.cuda_graph):
            return
        try:
            graphs = []
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for i in range(self.bench.n_sets):  # side-stream warm-up, as torch recommends
                    self.bench.fn(i)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            for i in range(self.bench.n_sets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.bench.fn(i)
                graphs.append(graph)
            torch.cuda.synchronize()
            self.graphs = graphs
            self.mode = "cuda_graph"
        except Exception as error:  # not capturable: fall back to eager + events
            torch.cuda.synchronize()
            self.note = f"cuda graph capture failed, eager timing used: {type(error).__name__}: {error}"[:300]

    def run(self, reps: int) -> List[float]:
        bench = self.bench
        if not self.cuda:
            out = []
            for _ in range(reps):
                i = self._index()
                if bench.setup is not None:
                    bench.setup(i)
                t0 = time.perf_counter()
                bench.fn(i)
                out.append(time.perf_counter() - t0)
            return out
        pairs = []
        for _ in range(reps):
            i = self._index()
            if bench.setup is not None:
                bench.setup(i)
                torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if self.graphs is not None:
                self.graphs[i].replay()
            else:
                bench.fn(i)
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e-3 for s, e in pairs]


def measure(benches: Dict[str, Bench], device, *, warmup: int = 2, min_reps: int = 5, max_reps: int = 200,
            target_s: float = 1.0, rounds: int = 4) -> Dict[str, Timing]:
    """Times every Bench; returns name -> Timing. Each gets about target_s of timed
    repetitions (between min_reps and max_reps), spread over `rounds` interleaved rounds."""
    runners = {name: _Runner(b, device) for name, b in benches.items()}
    estimate = {}
    for name, runner in runners.items():
        spent = 0.0
        calls = max(1, warmup, runner.bench.n_sets)  # every input set once: its first call builds lazy state
        for call in range(calls):
            i = runner._index()
            if runner.bench.setup is not None:
                runner.bench.setup(i)
            synchronize(device)
            t0 = time.perf_counter()
            runner.bench.fn(i)
            synchronize(device)
            if call >= calls - max(1, warmup):
                spent += time.perf_counter() - t0
        estimate[name] = spent / max(1, warmup)  # the timed part only, for sizing the repetitions
        runner.try_capture()
    reps = {name: int(min(max_reps, max(min_reps, target_s / max(est, 1e-7)))) for name, est in estimate.items()}
    rounds = max(1, min(rounds, min(reps.values())))
    samples = {name: [] for name in runners}
    for r in range(rounds):
        for name, runner in runners.items():
            share = reps[name] // rounds + (1 if r < reps[name] % rounds else 0)
            if share:
                samples[name].extend(runner.run(share))
    return {name: summarize(samples[name], runners[name].bench.n_sets, runners[name].mode, runners[name].note)
            for name in runners}
