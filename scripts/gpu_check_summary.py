"""Writes the JSON summary of a gpu_check.sh run from its work folder: card, driver, versions,
date, every step's status, the pytest counts and failures, each sanitizer's error count (or
"unsupported"), the ptxas totals and the benchmark rows. Reads only what exists, so a run that
stopped early (no GPU, failed build) still gets a summary.

    python scripts/gpu_check_summary.py WORK_DIR [WALL_SECONDS] > summary.json"""
import datetime
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

SANITIZERS = ("memcheck", "racecheck", "initcheck", "synccheck")


def read(work, name):
    path = os.path.join(work, name)
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as handle:
        return handle.read()


def json_lines(text):
    rows = []
    for line in (text or "").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line cut by a kill
    return rows


def versions():
    out = {}
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True) if _has("nvidia-smi") else None
    out["gpu"] = smi.stdout.strip() if smi and smi.returncode == 0 else None
    try:
        import torch
        out.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    except Exception as error:  # the summary must not depend on a working torch
        out["torch"] = f"import failed: {error}"
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True) if _has("nvcc") else None
    out["nvcc"] = nvcc.stdout.strip().splitlines()[-1] if nvcc and nvcc.returncode == 0 else None
    return out


def _has(program):
    return any(os.access(os.path.join(p, program), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep))


def pytest_results(work, xml="pytest.xml", log_name="tests.log"):
    text = read(work, xml)
    log = read(work, log_name) or ""
    tail = [line for line in log.splitlines()[-5:] if line.strip()]
    if text is None:
        return {"junit": None, "last_lines": tail}
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as error:
        return {"junit": f"unreadable: {error}", "last_lines": tail}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                message = (node.get("message") or "").splitlines()
                failed.append(f"{kind}: {case.get('classname')}::{case.get('name')}: {message[0][:200] if message else ''}")
    return dict(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                failed=failed[:40], last_lines=tail)


def sanitizer_results(work, steps):
    probe = steps.get("sanitizer_probe", {})
    out = {}
    probe_log = read(work, "sanitizer_probe.log") or ""
    for tool in SANITIZERS:
        log = read(work, f"{tool}.log")
        if probe.get("status") == "unsupported":
            reason = "Device not supported" if "not supported" in probe_log else probe.get("note") or "probe failed"
            out[tool] = {"status": "unsupported", "reason": reason}
        elif log is None:
            out[tool] = {"status": "not run"}
        else:
            summary = re.findall(r"ERROR SUMMARY: (\d+) error", log)
            out[tool] = {"status": steps.get(tool, {}).get("status"),
                         "errors": int(summary[-1]) if summary else None,
                         "workload_finished": "sanitizer workload finished" in log}
    return out


def ptxas_totals(work):
    text = read(work, "ptxas.txt") or ""
    match = re.search(r"TOTAL kernels=(\d+) max_registers=(\d+) spill_bytes=(\d+) stack_bytes=(\d+)", text)
    if not match:
        return None
    return dict(zip(("kernels", "max_registers", "spill_bytes", "stack_bytes"), map(int, match.groups())))


def bench_rows(work):
    rows = []
    for row in json_lines(read(work, "bench.jsonl")):
        if row.get("kind") == "ceiling":
            rows.append({"ceiling_gbps": row.get("ceiling_gbps")})
            continue
        results = row.get("results", {})
        gradfuse = results.get("gradfuse", {})
        rows.append({k: v for k, v in {
            "case": row.get("label"), "error": row.get("error"),
            "gradfuse_ms": 1e3 * gradfuse["timing"]["median_s"] if gradfuse else None,
            "speedup": row.get("speedup"), "pct_ceiling": gradfuse.get("pct_ceiling"),
            "host_us_per_step": row.get("host_us_per_step"),
        }.items() if v is not None})
    return rows


def main(work, wall_s=None):
    steps = {}
    for row in json_lines(read(work, "steps.jsonl")):
        steps[row["step"]] = row
    summary = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": wall_s,
        "versions": versions(),
        "steps": list(steps.values()),
        "tests": pytest_results(work),
        "compile_tests": pytest_results(work, "pytest_compile.xml", "compile_tests.log"),
        "sanitizers": sanitizer_results(work, steps),
        "ptxas": ptxas_totals(work),
        "bench": bench_rows(work),
    }
    failed = [s["step"] for s in steps.values() if s["status"] not in ("ok", "unsupported")]
    summary["failed_steps"] = failed
    summary["all_passed"] = not failed and bool(steps) and "bench" in steps
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
