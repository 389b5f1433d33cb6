"""Step time and peak memory of relevance finetuning, in one process so that ratios are fair.

The cases (all on the same model, weights, batch and AdamW optimiser) are in ``step_cases.py``,
the shared timing and memory helper in ``step_measure.py``; one module per measurement: the step
table (``step_table.py``), ``--scaling`` (``step_scaling.py``), ``--fused-scaling``
(``step_fused.py``). Timings interleave the cases round by round and report the median; peak
memory runs each case in a fresh subprocess (CPU: ``VmHWM``; CUDA:
``torch.cuda.max_memory_allocated``), counted above the resident model and batch.

Examples::

    python benchmarks/step_time.py                                  # vit_small, batch 8, 224 px
    python benchmarks/step_time.py --threads 1                      # a shared, busy machine
    python benchmarks/step_time.py --profile --cases relevance      # where the time goes
    python benchmarks/step_time.py --model vit_tiny_patch16_224 vit_base_patch16_224
    python benchmarks/step_time.py --scaling --quick                # vs image size and depth
    python benchmarks/step_time.py --fused-scaling --plot mem.png   # fused vs explicit, vit_base
    python benchmarks/step_time.py --device cuda --dtype bfloat16   # SDPA flash/efficient kernels
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from step_cases import CASES, EXPLAIN_CASES, STEP_CASES
from step_fused import FUSED_BATCHES, FUSED_CASES, FUSED_MODEL, FUSED_SIZES, run_fused_scaling
from step_measure import measure_memory
from step_scaling import SCALING_CASES, markdown_scaling, scaling_configs
from step_table import environment, markdown_run, profile_cases, run_config, write_report
from step_workload import MODELS, Config

DTYPES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}  # --dtype -> Config.dtype


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=None,
                        help=f"timm model name(s), pretrained=False (default vit_small_patch16_224; with "
                             f"--fused-scaling {FUSED_MODEL}); measured: {', '.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--depth", type=int, default=None, help="override the model's depth")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (SDPA limited to flash/efficient kernels)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="bf16 or bfloat16: autocast")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 avoids OpenMP barrier stalls on a shared machine")
    parser.add_argument("--chunk-elements", type=int, default=None,
                        help="attention='fused': the most elements of one chunk of the rebuilt maps (default: automatic)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 5; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1)")
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=None,
                        help="default: all; with --scaling: " + " ".join(SCALING_CASES))
    parser.add_argument("--scaling", action="store_true", help="step time and memory vs image size and depth")
    parser.add_argument("--fused-scaling", action="store_true",
                        help=f"{FUSED_MODEL} at {FUSED_SIZES} px, batches {FUSED_BATCHES}: " + " ".join(FUSED_CASES))
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help=f"with --fused-scaling: these image sizes (default {FUSED_SIZES})")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help=f"with --fused-scaling: these batch sizes (default {FUSED_BATCHES})")
    parser.add_argument("--plot", default=None, help="with --fused-scaling: PNG of peak memory vs tokens")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 warm-up (below the 5-step rule)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: per-phase times and torch.profiler's top operators of each case")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-time", action="store_true", help="skip the timed steps (memory only)")
    parser.add_argument("--memory-repeats", type=int, default=1,
                        help="fresh processes per case; the median peak is reported (default 1)")
    parser.add_argument("--json", default="step_time.json", help="where to write the results")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_repeats < 1:
        parser.error(f"--memory-repeats must be at least 1, got {args.memory_repeats}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    args.dtype = DTYPES[args.dtype]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.memory_worker:
        config = Config(**json.loads(args.config_json))
        print(json.dumps(measure_memory(config, args.memory_worker)))
        return {}
    steps = args.steps or (3 if args.quick else 5)
    warmup = 1 if args.warmup is None else args.warmup
    cases = tuple(args.cases or (SCALING_CASES if args.scaling else STEP_CASES + EXPLAIN_CASES))
    report = dict(environment=environment(), command=" ".join(sys.argv), runs=[], scaling=[])
    started = time.perf_counter()
    if args.fused_scaling:
        model = args.model[0] if args.model else FUSED_MODEL
        base = Config(model=model, device=args.device, dtype=args.dtype, steps=steps, warmup=warmup,
                      threads=args.threads, chunk_elements=args.chunk_elements)
        report["fused"] = run_fused_scaling(base, args, report, started)
    for model in [] if args.fused_scaling else args.model or ["vit_small_patch16_224"]:
        base = Config(model=model, batch=args.batch, img_size=args.img_size, depth=args.depth,
                      device=args.device, dtype=args.dtype, steps=steps, warmup=warmup,
                      threads=args.threads, chunk_elements=args.chunk_elements)
        if args.profile:
            report["profile"] = profile_cases(base, cases)
            continue
        configs = scaling_configs(base) if args.scaling else [base]
        repeats = 0 if args.no_memory else args.memory_repeats
        runs = [run_config(config, cases, memory_repeats=repeats) for config in configs]
        report["scaling" if args.scaling else "runs"].extend(runs)
        print(markdown_scaling(runs) if args.scaling else "\n\n".join(markdown_run(r) for r in runs), flush=True)
    write_report(report, args.json, started)
    print(f"\nwall {report['wall_s']:.0f} s; load average {report['environment']['load_average']} -> "
          f"{report['environment']['load_average_end']}; JSON: {args.json}")
    return report


if __name__ == "__main__":
    main()
