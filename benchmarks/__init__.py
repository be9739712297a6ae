"""gradfuse benchmarks: `python -m benchmarks.run --device cpu|cuda [--quick] [--out DIR]`.

Modules, one job each:
  timing       the one timing helper (warm-up, interleaved repetitions, median/min/IQR,
               CUDA events / CUDA-graph replay on GPU, perf_counter on CPU, input rotation)
  bytes_model  minimum bytes each case must move -> achieved GB/s
  ceiling      measured bandwidth ceiling (GPU: D2D copy; CPU: streaming copy and triad)
  workloads    tensor shape lists (big-tensor sweep, GPT-2 small, ResNet-50, 2000 tiny)
  cases        gradfuse vs torch implementations of each benchmarked case
  machine      machine / software description recorded in the JSON
  progress     a minimal stderr progress bar
  report       console table, targets, markdown rendering from the JSON
  plot         GB/s vs size PNG
  run          the command-line entry point
"""
