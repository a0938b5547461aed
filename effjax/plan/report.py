"""The plan as text (the `effjax plan` output) and as a JSON-able dict (benchmarks/paper_scale.py)."""

from __future__ import annotations

from effjax.plan.planner import KINDS, MARGIN_GOAL, PlanResult, gb
from effjax.plan.programs import GRADIENTS, INPUTS, KV_CACHE, OPTIMIZER, PARAMS
from effjax.plan.recipes import Recipe

SHORT = {PARAMS: "params", OPTIMIZER: "optim", KV_CACHE: "kv", GRADIENTS: "grads",
         INPUTS: "inputs"}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(r, widths)))
  return [fmt(header)] + [fmt(r) for r in rows]


def _ms(s: float) -> str:
  return f"{s * 1e3:.3g}"


def format_result(recipe: Recipe, r: PlanResult) -> str:
  t, chip = r.target, r.target.chip
  ext = r.compiled[0].extrapolated_from if r.compiled else ()
  lines = [f"== {r.plan.title} on {t.describe()}" + (
      f" [extrapolated from compiles with {ext[0]} and {ext[1]} layers]" if ext else ""),
           f"   chip {chip.device_kind}: {gb(t.hbm)} GB memory, {chip.peak_flops / 1e12:.0f} TFLOP/s "
           f"bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s"]
  header = ["program (GB per device)"] + [SHORT[k] for k in KINDS] + [
      "held", "temps", "outputs", "peak", "of mem", "compile s"]
  rows = []
  for c in r.compiled:
    temps = gb(c.temp) + (f" (kv {gb(c.kv_inside)})" if c.kv_inside else "")
    name = c.program.name + (" (costs only, not run)" if c.program.costs_only else "")
    rows.append([name] + [gb(c.inputs[k]) for k in KINDS] + [
        gb(c.held), temps, gb(c.output), gb(c.peak), f"{c.peak / t.hbm:.0%}", f"{c.seconds:.0f}"])
  lines += ["   " + x for x in _table(header, rows)]
  header = ["phase", "runs", "GFLOP/run", "GB/run", "XLA GB/run", "ms compute", "ms memory",
            "total s"]
  rows = []
  for p in r.phases:
    comp, mem = p.seconds(chip)
    rows.append([p.name, f"{p.count:g}", f"{p.flops / 1e9:.4g}", f"{p.hbm / 1e9:.4g}",
                 f"{p.xla_bytes / 1e9:.4g}", _ms(comp), _ms(mem),
                 f"{p.count * max(comp, mem):.4g}"])
  lines += ["   " + x for x in _table(header, rows)]
  lines.append(f"   step at peak: {r.step_seconds():.4g} s (roofline: max(FLOPs / peak, GB / "
               f"bandwidth) per phase); {r.step_seconds(xla_bytes=True):.4g} s with XLA's bytes")
  if has_decode_step(r):
    lines.append("   " + decode_line(r))
  peak = r.peak
  lines.append(f"   peak {gb(peak.peak)} GB of {gb(t.hbm)} GB ({peak.program.name}): "
               f"{r.margin:.1%} free (goal >= {MARGIN_GOAL:.0%})")
  return "\n".join(lines)


def has_decode_step(r: PlanResult) -> bool:
  """Whether the plan has a decode step and its program was compiled (--program may leave it out)."""
  return bool(r.plan.decode_phase) and r.has_phase(r.plan.decode_phase)


def decode_throughput(r: PlanResult) -> dict:
  """Decode step at the roofline and tokens/s per chip at the memory roofline."""
  p = r.phase(r.plan.decode_phase)
  comp, mem = p.seconds(r.target.chip)
  step = max(comp, mem)
  n = r.target.num_chips
  out = dict(step_ms=step * 1e3, memory_ms=mem * 1e3, compute_ms=comp * 1e3,
             tokens_per_step=r.plan.tokens_per_step,
             tokens_per_s_per_chip_memory=r.plan.tokens_per_step / mem / n,
             tokens_per_s_per_chip=r.plan.tokens_per_step / step / n)
  # Methods whose decode program was compiled (a partial plan, --program, may leave some out).
  labels = [lab for lab in r.plan.info.get("labels", []) if r.has_phase(f"{lab} decode step")]
  if "ar" in labels[1:]:
    ar = max(r.phase("ar decode step").seconds(r.target.chip))
    tau = r.plan.info["tau"]
    # A step of a method costs break_even_tau plain steps; at tau tokens per step it is
    # tau / break_even_tau times faster than plain decoding (both at the roofline).
    out.update(baseline_step_ms=ar * 1e3, speedup_at_tau=tau * ar / step, break_even_tau={
        lab: max(r.phase(f"{lab} decode step").seconds(r.target.chip)) / ar
        for lab in labels if lab != "ar"})
  return out


def decode_line(r: PlanResult) -> str:
  d = decode_throughput(r)
  tau = r.plan.info.get("tau", 1.0)
  line = (f"decode: {d['step_ms']:.3g} ms per step ({d['memory_ms']:.3g} ms memory-bound); "
          f"{d['tokens_per_step']:g} tokens per step (batch {r.plan.info['batch']} x tau {tau:g}) "
          f"-> {d['tokens_per_s_per_chip_memory']:.4g} tokens/s per chip at the memory roofline")
  if "break_even_tau" in d:
    costs = ", ".join(f"{k} {v:.3g}" for k, v in d["break_even_tau"].items())
    line += (f"\n   plain decoding: {d['baseline_step_ms']:.3g} ms per step; a step costs this many "
             f"plain steps (the break-even tau): {costs}; {r.plan.info['labels'][0]} at tau "
             f"{tau:g}: {d['speedup_at_tau']:.3g}x plain decoding")
  return line


def to_dict(recipe: Recipe, r: PlanResult) -> dict:
  t = r.target
  out = dict(title=r.plan.title, slice=t.slice.accelerator_type if t.platform == "tpu" else "cpu",
             topology=t.slice.topology_name if t.platform == "tpu" else "cpu",
             chips=t.num_chips, processes=t.num_processes, hbm=t.hbm, chip=t.chip.device_kind,
             peak_flops=t.chip.peak_flops, hbm_bandwidth=t.chip.hbm_bandwidth,
             margin=r.margin, peak_program=r.peak.program.name, peak=r.peak.peak,
             step_seconds=r.step_seconds(), step_seconds_xla_bytes=r.step_seconds(xla_bytes=True),
             extrapolated_from=list(r.compiled[0].extrapolated_from) if r.compiled else [],
             info=r.plan.info,
             programs=[dict(name=c.program.name, compile_seconds=c.seconds, inputs=c.inputs,
                            held=c.held, temp=c.temp, output=c.output, code=c.code, peak=c.peak,
                            kv_inside=c.kv_inside, flops=c.flops,
                            product_flops=c.product_flops, bytes=c.bytes_accessed,
                            costs_only=c.program.costs_only)
                       for c in r.compiled],
             phases=[dict(name=p.name, count=p.count, flops=p.flops, hbm=p.hbm,
                          xla_bytes=p.xla_bytes) for p in r.phases])
  if has_decode_step(r):
    out["decode"] = decode_throughput(r)
  return out
