"""The issues' performance targets, checked on measured rows.

    python -m bench.targets [--out DIR]        # DIR: a results folder (default: bench/results/<this device>)

Each target compares rows of one run (same device), a ratio against a peer measured beside it or a fraction of
a ceiling; it is reported as met, short (by how much) or not measured (a row is missing: the case was not run,
was cut by its time box, or a peer skipped the shape). Targets hold on an H100/H200 only: on another device the
verdicts are printed but say nothing about them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import utils


@dataclass
class Target:
    issue: int
    what: str
    need: float  # the measured value must be >= need (ratios are taken so that larger is better)
    measure: Callable[[dict], float | None]  # rows index -> value (None: not measured)
    unit: str = "x"


def _index(rows: list[dict]) -> dict:
    """(case, shape, dtype, mode, provider) -> the newest row."""
    out = {}
    for r in rows:
        out[(r.get("case"), r.get("shape"), r.get("dtype"), r.get("mode"), r.get("provider"))] = r
    return out


def _get(idx, case, shape, dtype, mode, provider, key="median_ms"):
    row = idx.get((case, shape, dtype, mode, provider))
    value = None if row is None else utils.number(row.get(key))
    # times, peaks and shares are positive; anything else is not a measurement (a damaged or foreign row)
    return value if value is not None and value > 0 else None


def _speedup(case, shape, dtype, mode, peer, provider="fastseg3d", key="median_ms"):
    def measure(idx):
        ours = _get(idx, case, shape, dtype, mode, provider, key)
        theirs = _get(idx, case, shape, dtype, mode, peer, key)
        return None if ours is None or theirs is None else theirs / ours
    return measure


def _memory_share(case, shape, dtype, mode, peer, provider="fastseg3d"):
    """peer's peak / ours: >= 1 / share means ours uses at most ``share`` of the peer's peak."""
    def measure(idx):
        ours = _get(idx, case, shape, dtype, mode, provider, "peak_mem_mb")
        theirs = _get(idx, case, shape, dtype, mode, peer, "peak_mem_mb")
        return None if not ours or theirs is None else theirs / ours
    return measure


def _bandwidth(case, shape, dtype, mode, provider="fastseg3d", key="median_ms"):
    """The row's share of copy bandwidth, at its median time or (``key="graph_ms"``) at its replay time: the same
    bytes over the other time."""
    def measure(idx):
        pct = _get(idx, case, shape, dtype, mode, provider, "bandwidth_pct")
        time, median = _get(idx, case, shape, dtype, mode, provider, key), _get(idx, case, shape, dtype, mode, provider)
        return None if pct is None or not time or not median else pct * median / time
    return measure


def _best_of(case, shape, dtype, mode, peers, provider="fastseg3d", key="median_ms"):
    """The fastest of ``peers`` (those measured) over ours."""
    def measure(idx):
        ours = _get(idx, case, shape, dtype, mode, provider, key)
        theirs = [t for p in peers if (t := _get(idx, case, shape, dtype, mode, p, key)) is not None]
        return None if ours is None or not theirs else min(theirs) / ours
    return measure


class Bounds(float):
    """A value known only to lie in ``[lo, hi]`` (``hi`` may be infinite); as a float, ``lo``."""

    def __new__(cls, lo: float, hi: float):
        value = super().__new__(cls, lo)
        value.lo, value.hi = lo, hi
        return value


def _cube_range(row: dict) -> tuple[float, float]:
    """The voxels of the largest side a search row brackets: exact when it converged; a search cut short (its time
    box) knows the side that trained and, if one failed, that the answer lies below it."""
    voxels = float(row["voxels"])
    if row.get("stop") == "max-side":  # it trained at the largest side it was allowed
        return voxels, math.inf
    if row.get("converged", True):
        return voxels, voxels
    failed, stride = row.get("failed_side"), row.get("stride") or 1
    return voxels, math.inf if failed is None else float(failed - stride) ** 3


def _below_scores(case, shape, dtype, mode, batch, provider="fastseg3d"):
    """One fp32 N x M score matrix per batch element and head (what eager math attention holds, at the least) over
    our peak: >= 1 where the fused step's whole peak stays below it. N, M and the heads are read off the label."""
    fields = dict((f[0], int(f[1:])) for f in shape.split()[1:] if f[0] in "NMH")
    scores_mb = batch * fields["H"] * fields["N"] * fields["M"] * 4 / 2**20

    def measure(idx):
        ours = _get(idx, case, shape, dtype, mode, provider, "peak_mem_mb")
        return None if not ours else scores_mb / ours
    return measure


def _cube_ratio(model):
    """fastseg3d's voxels over plain's, searched in one dtype (bf16 preferred); a :class:`Bounds` where a search
    was cut short."""
    def measure(idx):
        for dtype in ("bf16", "fp16", "fp32"):
            ours, plain = (idx.get(("largest_cube", model, dtype, None, p)) for p in ("fastseg3d", "plain"))
            if ours and plain and ours.get("voxels") and plain.get("voxels"):
                (ours_lo, ours_hi), (plain_lo, plain_hi) = _cube_range(ours), _cube_range(plain)
                if ours_lo == ours_hi and plain_lo == plain_hi:
                    return ours_lo / plain_lo
                return Bounds(ours_lo / plain_hi, ours_hi / plain_lo)
        return None
    return measure


_SDPA = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")
_DW = "2x32x128^3"
_S1, _S2 = "stage1@128^3 N32768 M512 H1 d32", "stage2@128^3 N4096 M512 H2 d32"
_S1_256 = "stage1@256^3 N262144 M4096 H1 d32"
_DSD = ("2x14x128^3 dsd 6 pairs deconv heads", "2x14x128^3 dsd 6 pairs interp heads")
_SF = ("segformer3d", "2x4x128^3", "bf16", "train_step")
_SF_VARIANTS = (("fastseg3d", ""), ("fastseg3d+torch.compile", ", compiled"), ("fastseg3d+cuda-graph", ", CUDA graph"))

_REPLAY = ", replayed"


def _timed(issue: int, what: str, need: float, fn: Callable, args: tuple, unit: str = "x") -> list[Target]:
    """An op target on the rows' median time (the host's Python included where it is the slower side), and its
    twin on their CUDA-graph replay time (``graph_ms``: the kernels alone, for peers and ours alike)."""
    return [Target(issue, what, need, fn(*args), unit),
            Target(issue, what + _REPLAY, need, fn(*args, key="graph_ms"), unit)]


TARGETS = [
    *_timed(2, f"dwconv3d bf16 fwd {_DW} NCDHW: % of copy bandwidth", 70,
            _bandwidth, ("dwconv3d", f"{_DW} ncdhw", "bf16", "fwd"), "%"),
    *_timed(2, f"dwconv3d bf16 fwd {_DW} channels-last: % of copy bandwidth", 70,
            _bandwidth, ("dwconv3d", f"{_DW} channels_last", "bf16", "fwd"), "%"),
    *_timed(2, f"dwconv3d bf16 fwd+bwd {_DW} NCDHW: speed-up over ATen's native kernel", 10,
            _speedup, ("dwconv3d", f"{_DW} ncdhw", "bf16", "fwd+bwd", "torch (aten-native)")),
    *_timed(2, f"dwconv3d bf16 fwd+bwd {_DW} channels-last: speed-up over cuDNN", 1,
            _speedup, ("dwconv3d", f"{_DW} channels_last", "bf16", "fwd+bwd", "torch (cudnn-channels-last)")),
    *[t for shape in (_S1, _S2) for mode in ("fwd", "fwd+bwd")
      for t in _timed(3, f"attention bf16 {mode} {shape.split()[0]}: speed-up over the best SDPA backend", 1,
                      _best_of, ("attention", shape, "bf16", mode, _SDPA))],
    *[t for shape in (_S1, _S2) for mode in ("fwd", "fwd+bwd")
      for t in _timed(3, f"attention fp32 {mode} {shape.split()[0]}: speed-up over SDPA efficient", 1,
                      _speedup, ("attention", shape, "fp32", mode, "sdpa-efficient"))],
    *[t for shape in (_S1, _S2) for peer, need in (("torch-sdpa", 3), ("torch.compile", 1.5))
      for t in _timed(3, f"attention sub-block bf16 fwd+bwd {shape.split()[0]}: speed-up over {peer}", need,
                      _speedup, ("attention_block", shape, "bf16", "fwd+bwd", peer))],
    # the fused sub-block trains at 256^3 within less than one fp32 copy of the scores eager math attention holds
    # (8 GiB at batch 2; its softmax and backward hold several)
    Target(3, "attention sub-block bf16 fwd+bwd stage1@256^3: one fp32 N x M score matrix / our peak", 1,
           _below_scores("attention_block", _S1_256, "bf16", "fwd+bwd", batch=2)),
    # the fused loss's peak is at its floor when it holds its inputs and one gradient each, nothing else
    *[t for shape in _DSD
      for what, need, fn, peer, unit in (("speed-up over eager", 5, _speedup, ("torch",), "x"),
                                         ("eager peak / ours (<= 25% of eager)", 4, _memory_share, ("torch",), "x"),
                                         ("% of the memory roofline", 60, _bandwidth, (), "%"))
      for t in ([Target(4, f"kl_distill bf16 fwd+bwd {shape.split(' ', 1)[1]}: {what}", need,
                        fn("kl_distill", shape, "bf16", "fwd+bwd", *peer), unit)] if fn is _memory_share else
                _timed(4, f"kl_distill bf16 fwd+bwd {shape.split(' ', 1)[1]}: {what}", need, fn,
                       ("kl_distill", shape, "bf16", "fwd+bwd", *peer), unit))],
    # the fused network eager, compiled (train.compile) and its eager step captured in a CUDA graph: an eager step
    # may be bound by the host's time to issue its kernels
    *[Target(5, f"SegFormer3D train step 128^3 B=2 bf16{label}: {what}", need, fn(*_SF, peer, provider))
      for provider, label in _SF_VARIANTS
      for what, need, fn, peer in (("speed-up over plain eager", 2, _speedup, "plain"),
                                   ("speed-up over plain compiled", 1.5, _speedup, "plain+torch.compile"),
                                   ("plain peak / ours (<= 60% of plain)", 1 / 0.6, _memory_share, "plain"))
      if not (fn is _memory_share and provider.endswith("cuda-graph"))],  # replays have no peak of their own
    Target(7, "SegFormer3D largest trainable cube at batch 1: voxels over plain", 2, _cube_ratio("segformer3d")),
]


def check(rows: list[dict]) -> list[tuple[Target, float | None, str]]:
    """(target, measured value, verdict) for every target: "met", "short by N%" or "not measured" (also where the
    value is a bound on the wrong side of the need: a search cut short)."""
    idx = _index(rows)
    out = []
    for t in TARGETS:
        value = t.measure(idx)
        if value is None or (not isinstance(value, Bounds) and math.isnan(value)):
            value, verdict = None, "not measured"
        elif isinstance(value, Bounds):
            if value.lo >= t.need:
                verdict = "met"
            elif value.hi < t.need:
                verdict = f"short by at least {100 * (1 - value.hi / t.need):.0f}%"
            elif math.isinf(value.hi):
                verdict = (f"not measured (search cut: at least {value.lo:.2f}{t.unit})" if value.lo > 0 else
                           "not measured (searches cut)")
            elif value.lo == 0:
                verdict = f"not measured (search cut: at most {value.hi:.2f}{t.unit})"
            else:
                verdict = f"not measured (search cut: between {value.lo:.2f} and {value.hi:.2f}{t.unit})"
        elif value >= t.need:
            verdict = "met"
        else:
            verdict = f"short by {100 * (1 - value / t.need):.0f}%"
        out.append((t, value, verdict))
    return out


def format_report(results) -> str:
    lines = [f"{'issue':<6} {'target':<84} {'need':>7} {'measured':>9}  verdict"]
    for t, value, verdict in results:
        shown = "-" if value is None else f"{value:.2f}{t.unit}"
        lines.append(f"#{t.issue:<5} {t.what:<84} {t.need:>6.3g}{t.unit} {shown:>9}  {verdict}")
    return "\n".join(lines)


def load_rows(out: Path) -> list[dict]:
    """The rows under ``out`` measured at the commit of the newest row (a results folder accumulates runs: a ratio
    must not pair rows of different code)."""
    rows = []
    for name in ("ops.jsonl", "model.jsonl", "largest_cube.jsonl"):
        path = out / name
        if path.exists():
            rows += utils.read_rows(path)
    if rows:
        newest = max(rows, key=lambda r: str(r.get("date") or "")).get("commit")
        kept = [r for r in rows if r.get("commit") == newest]
        if len(kept) < len(rows):
            print(f"targets on the {len(kept)} rows of commit {newest} (the newest row's); {len(rows) - len(kept)} "
                  "rows of other commits set aside", file=sys.stderr)
        rows = kept
    for r in rows:  # largest_cube rows name the network under "model"
        if r.get("case") == "largest_cube":
            r["shape"] = r.get("model")
    usable = [r for r in rows if all(isinstance(r.get(k), (str, type(None))) for k in _LABELS)
              and (r.get("case") != "largest_cube" or _cube_row_ok(r))]
    if len(usable) < len(rows):
        print(f"{out}: {len(rows) - len(usable)} rows left out (labels that are not strings, or a cube search row "
              "without numbers)", file=sys.stderr)
    return usable


_LABELS = ("case", "shape", "dtype", "mode", "provider")


def _cube_row_ok(row: dict) -> bool:
    return (utils.number(row.get("voxels")) or 0) > 0 and all(
        row.get(k) is None or (utils.number(row[k]) or 0) > 0 for k in ("failed_side", "stride"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/<device>)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per target instead")
    args = parser.parse_args(argv)
    if args.out is None:
        import torch

        from bench.run import default_out

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        args.out = default_out(utils.environment(device)["device"], device)
    rows = load_rows(args.out)
    results = check(rows)
    if args.json:
        for t, value, verdict in results:
            print(json.dumps({"issue": t.issue, "target": t.what, "need": t.need, "unit": t.unit, "measured": value,
                              "verdict": verdict}))
    else:
        print(format_report(results))
    devices = {r.get("device") for r in rows}
    if not any(d and ("H100" in d or "H200" in d) for d in devices):
        print(f"rows from {sorted(d for d in devices if d) or 'no device'}: the targets are stated for an H100/H200",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
