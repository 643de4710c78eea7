"""`make gpu-check` (`python -m iisan.experiments.gpu_check`): the GPU path, run on a GPU machine itself in
a few minutes: extract MiniLM-L3 title states of Scientific on the GPU (fp16), train cached IISAN there (fp16
states on the GPU, AMP) for two epochs with its evaluations, and time FFT's step (MiniLM-L3 trained end to
end) and the uncached IISAN step; it prints seconds per epoch / step and `torch.cuda.max_memory_allocated`
for each part and writes them to OUT/gpu-check.json (`--out`; make gpu-check: $OUT when set, else reports/).

The GPU machine has no network and none of `../shared`: `make gpu-pack` (here) puts what it needs into the
ignored folder `.gpu/`: Scientific's two TSV files, the minilm-l3 weights, this package as a wheel, and the
wheels of what the machine lacks (zarr and its needs). The check reads them from there (`--pack`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _peak_mib(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20


def run_check(pack: Path, work: Path, epochs: int = 2, steps: int = 20, log=print) -> dict:
    import torch

    os.environ["IISAN_DATA_DIR"] = str(pack / "data")
    os.environ["IISAN_MODELS_DIR"] = str(pack / "models")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from iisan.experiments.cost import measure_step_cost
    from iisan.extract.run import ExtractConfig, run_extraction
    from iisan.train.config import resolve
    from iisan.experiments.launch import launch
    from iisan.train.result import RunSpec

    if not torch.cuda.is_available():
        sys.exit("gpu-check: no CUDA device here (it is meant for a GPU machine)")
    device = torch.device("cuda")
    out: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                 "cuda": torch.version.cuda}
    log(f"gpu-check on {out['device']} (torch {out['torch']}, CUDA {out['cuda']})")
    cache = work / "cache"

    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    extracted = run_extraction(ExtractConfig(model="minilm-l3", dataset="scientific", out=cache, device="cuda",
                                             progress=False), log=log)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    out["extract"] = {"items": extracted.items_encoded, "seconds": seconds, "encode_seconds": extracted.seconds,
                      "items_per_second": extracted.items_encoded / max(extracted.seconds, 1e-9),
                      "max_memory_allocated_mib": _peak_mib(device)}
    log(f"extract: {extracted.items_encoded:,} items in {seconds:.1f} s with loading "
        f"({out['extract']['items_per_second']:,.0f} items/s encoding), max allocated "
        f"{out['extract']['max_memory_allocated_mib']:,.0f} MiB")

    base = {"dataset": "scientific", "pipeline": "text-only", "text": "minilm-l3", "cache": str(cache),
            "device": "cuda", "progress": False}
    torch.cuda.reset_peak_memory_stats(device)
    result = launch(RunSpec(resolve({**base, "out": str(work / "runs"), "epochs": epochs, "patience": epochs})),
                    log=log)
    seed = result.seeds[0]
    out["iisan_cached"] = {"epochs": seed.epochs, "seconds_per_epoch": seed.seconds_per_epoch,
                           "seconds_per_evaluation": seed.seconds_per_evaluation,
                           "max_memory_allocated_mib": seed.peak_memory_mib, "test": seed.test}
    log(f"iisan (cached, fp16 states on the GPU, AMP): {seed.seconds_per_epoch:.2f} s / epoch, "
        f"{seed.seconds_per_evaluation:.2f} s / evaluation, max allocated {seed.peak_memory_mib:,.0f} MiB, "
        f"test HR@10 {100 * seed.test['HR@10']:.2f} after {seed.epochs} epochs")

    for method in ("fft", "iisan-uncached"):
        config = resolve({**base, "method": method, "out": str(work / "runs"), "batch_size": 64}).to_dict()
        torch.cuda.empty_cache()
        cost = measure_step_cost(config, warmup=2, steps=steps, budget=60.0, full_epoch_under=0.0)
        out[method] = {k: cost[k] for k in ("seconds_per_step", "steps_timed", "steps_per_epoch",
                                            "seconds_per_epoch", "peak_memory_mib", "trainable_parameters")}
        log(f"{method} step: {cost['seconds_per_step'] * 1000:.1f} ms ({cost['steps_timed']} timed), projected "
            f"{cost['seconds_per_epoch']:.1f} s / epoch, max allocated {cost['peak_memory_mib']:,.0f} MiB, "
            f"{cost['trainable_parameters']:,} trainable parameters")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, default=Path(".gpu"), help="what `make gpu-pack` wrote")
    parser.add_argument("--work", type=Path, default=Path("/tmp/iisan-gpu-check"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of FFT / uncached IISAN")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder of gpu-check.json")
    args = parser.parse_args()
    result = run_check(args.pack, args.work, args.epochs, args.steps)
    target = args.out / "gpu-check.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=2))
    print(target)


if __name__ == "__main__":
    main()
