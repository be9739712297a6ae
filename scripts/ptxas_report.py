"""Per-kernel registers, stack frame and spill bytes from a build log made with
GRADFUSE_PTXAS_VERBOSE=1 (ptxas -v), one line per kernel with demangled, shortened names, and a
last line with the totals: python scripts/ptxas_report.py build.log"""
import re
import shutil
import subprocess
import sys


def kernels(lines):
    """(mangled name, registers, stack bytes, spill store bytes, spill load bytes) per kernel."""
    current, frame, rows = None, (0, 0, 0), []
    for line in lines:
        entry = re.search(r"Compiling entry function '(\w+)'", line)
        if entry:
            current, frame = entry.group(1), (0, 0, 0)
            continue
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spill and current:
            frame = tuple(int(v) for v in spill.groups())
            continue
        used = re.search(r"Used (\d+) registers", line)
        if used and current:
            rows.append((current, int(used.group(1))) + frame)
            current = None
    return rows


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def shorten(name):
    name = re.sub(r"gradfuse::cuda::|\(anonymous namespace\)::|c10::", "", name)
    name = re.sub(r"TensorTable<(\d), (\d+)>", r"Table<\1,\2>", name)
    return name.split("(")[0] if name.startswith("void ") else name


def main(path):
    with open(path, errors="replace") as handle:
        rows = kernels(handle)
    rows = list({row[0]: row for row in rows}.values())  # ptxas may report a kernel twice
    for (_, regs, stack, stores, loads), name in zip(rows, demangle([r[0] for r in rows])):
        print(f"{regs:4d} registers {stack:5d} B stack {stores:5d} B spill stores {loads:5d} B spill loads  {shorten(name)}")
    spills = sum(r[3] + r[4] for r in rows)
    most = max((r[1] for r in rows), default=0)
    print(f"TOTAL kernels={len(rows)} max_registers={most} spill_bytes={spills} "
          f"stack_bytes={sum(r[2] for r in rows)}")


if __name__ == "__main__":
    main(sys.argv[1])
