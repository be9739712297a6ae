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
  stability    spread (IQR / median) of a row, the bound a target row must meet, re-measuring,
               MET / MISS / UNSTABLE verdicts
  report       console table, targets, markdown rendering from the JSON
  e2e_cases    end-to-end training rows (real forward + backward) of three models, with
               e2e_models (the models), e2e_loops (one update per mode), e2e_check (numerics vs
               torch), e2e_memory (peak memory, a process per mode), e2e_report (their table)
  plot         GB/s vs size PNG
  run          the command-line entry point
"""
