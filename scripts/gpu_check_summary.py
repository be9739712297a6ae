"""Writes the JSON summary of a gpu_check.sh run: card, driver, versions, date, step results."""
import datetime
import json
import subprocess
import sys

import torch


def main(out_dir):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    with open(f"{out_dir}/steps.jsonl") as handle:
        steps = [json.loads(line) for line in handle if line.strip()]
    summary = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu_and_driver": smi,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "steps": steps,
        "all_passed": all(s["rc"] == 0 for s in steps),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
