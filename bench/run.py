"""Run benchmark cases and append their rows to bench/results/<device>/<suite>.jsonl.

    python -m bench.run --case dwconv3d [--dtype fp32,bf16] [--modes fwd,bwd,fwd+bwd] [--providers ...]
                        [--quick] [--out DIR] [--json]

On a CPU the timings only exercise the harness (``--quick``); they say nothing about a GPU kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench import utils
from bench.registry import MODEL_MODES, MODES, load_cases

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _closure(setup, mode: str):
    if setup.runners is not None:
        return setup.runners[mode]
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return setup.forward()
        return fn
    y = setup.forward()
    g = torch.randn_like(y)
    if mode == "bwd":
        def fn():
            y.backward(g, retain_graph=True)
        return fn

    def fn():
        setup.forward().backward(g)
    return fn


def run_case(case, dtypes, modes, providers, quick, device, env, peak_bw, rows_path: Path) -> list[dict]:
    """Measure every (shape, dtype, provider, mode) of ``case``; each row is appended to ``rows_path`` at once, so
    a run stopped by a time limit keeps what it measured."""
    rows = []
    for label, spec in case.shapes(quick):
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            case_modes = [m for m in modes if m in case.modes]
            for provider in case.providers(spec):
                if providers and not any(provider.startswith(p) for p in providers):
                    continue
                try:
                    setup = case.setup(spec, dtype, provider, device)
                except (RuntimeError, NotImplementedError) as err:
                    print(f"  {label} {dtype_name} {provider}: skipped ({err})", file=sys.stderr)
                    continue
                for mode in case_modes:
                    try:
                        fn = _closure(setup, mode)
                        med, p20, p80 = utils.time_ms(fn, device, grad_to_none=setup.grads_of)
                        peak = utils.peak_memory_mb(fn, device)
                    except torch.OutOfMemoryError:
                        print(f"  {label} {dtype_name} {mode} {provider}: out of memory", file=sys.stderr)
                        continue
                    except (RuntimeError, NotImplementedError) as err:
                        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
                        print(f"  {label} {dtype_name} {mode} {provider}: skipped ({first_line})", file=sys.stderr)
                        continue
                    roof = None
                    if peak_bw and mode in setup.min_bytes:
                        roof = 100.0 * (setup.min_bytes[mode] / (peak_bw * 1e9)) / (med * 1e-3)
                    row = {"suite": case.suite, "case": case.name, "shape": label, "dtype": dtype_name, "mode": mode,
                           "provider": provider, "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                           "peak_mem_mb": peak, "roofline_pct": roof, **env}
                    utils.write_rows([row], rows_path)
                    rows.append(row)
                del setup
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    cases = load_cases()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(cases), help="repeatable; default: all")
    parser.add_argument("--dtype", default=None, help="comma list of fp32,fp16,bf16 (default: the case's)")
    parser.add_argument("--modes", default=",".join(MODES + MODEL_MODES))
    parser.add_argument("--providers", default=None, help="comma list of provider-name prefixes to keep")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the harness")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/<device>)")
    parser.add_argument("--plot", action="store_true", help="write <case>.png beside the rows")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines instead of a table")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = utils.environment(device)
    out = args.out or utils.RESULTS / utils.device_slug(env["device"])
    peak_bw = utils.copy_bandwidth_gbs(device)
    if peak_bw:
        print(f"measured device copy bandwidth: {peak_bw:.0f} GB/s", file=sys.stderr)
    modes = [m for m in args.modes.split(",") if m]
    providers = args.providers.split(",") if args.providers else None
    for name in args.case or sorted(cases):
        case = cases[name]
        dtypes = args.dtype.split(",") if args.dtype else list(case.dtypes)
        rows = run_case(case, dtypes, modes, providers, args.quick, device, env, peak_bw, out / f"{case.suite}.jsonl")
        if args.json:
            for row in rows:
                print(json.dumps(row))
        else:
            print(utils.format_table(rows))
        if args.plot and rows:
            utils.plot_rows(rows, out / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
