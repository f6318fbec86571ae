"""``python -m attn_compiler demo``: compile the embedded GPT with memattn, print the report, and measure eager vs
memattn (output difference, training-step time and peak memory) on whatever device is present.

``python -m attn_compiler report MODULE:FACTORY``: compile a model of yours with memattn and write its report."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _build(args):
    import torch
    from attn_compiler.models import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=args.layers, n_head=args.heads, n_kv_head=args.kv_heads, d_model=args.d_model,
                    block=max(args.seq, 16))
    dev = _device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = GPT(cfg).to(dev, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    idx = torch.randint(0, cfg.vocab, (args.batch, args.seq), generator=g).to(dev)
    return model, idx


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _reset_peak_rss() -> bool:
    """Linux resets the peak resident size (VmHWM) when 5 is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(args) -> None:
    """One measured configuration in a fresh process, so peak memory is this configuration's alone."""
    import gc

    import torch
    import attn_compiler  # noqa: F401

    model, idx = _build(args)
    cuda = idx.is_cuda
    step = model if args.worker == "eager" else torch.compile(model, backend="memattn")

    def train_step():
        loss = step(idx, idx)
        loss.backward()
        model.zero_grad(set_to_none=True)

    train_step()  # compile and warm up
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        measurable = _reset_peak_rss()
        base = _status_kib("VmRSS") * 1024 if measurable else 0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() - base, "CUDA memory a step adds at its peak"
    elif measurable:
        peak, kind = _status_kib("VmHWM") * 1024 - base, "resident memory a step adds at its peak (VmHWM)"
    else:
        peak, kind = float("nan"), "peak memory not measurable here"
    print(json.dumps({"time_ms": 1000 * sorted(times)[len(times) // 2], "peak_bytes": peak, "peak_kind": kind}))


def _measure(args, which: str) -> dict:
    cmd = [sys.executable, "-m", "attn_compiler", "demo", "--worker", which] + _passthrough(args)
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if out.returncode != 0:
        raise SystemExit(f"demo worker '{which}' failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _passthrough(args):
    return ["--seq", str(args.seq), "--batch", str(args.batch), "--layers", str(args.layers), "--heads",
            str(args.heads), "--kv-heads", str(args.kv_heads), "--d-model", str(args.d_model), "--steps",
            str(args.steps), "--device", args.device, "--dtype", args.dtype]


def demo(args) -> int:
    import torch
    import attn_compiler

    if args.worker:
        _worker(args)
        return 0
    model, idx = _build(args)
    print(f"memattn demo: GPT with {args.layers} layers, {args.heads} heads ({args.kv_heads} kv heads), "
          f"d_model {args.d_model}, batch {args.batch}, sequence {args.seq}, {args.dtype} on {idx.device}\n")
    compiled = torch.compile(model, backend="memattn")
    with torch.no_grad():
        out = compiled(idx)
        ref = model(idx)
    report = attn_compiler.last_report()
    print(report.summary())
    print(report.table())
    ok = _check_logits(model, idx, out, ref, args.dtype)
    if args.steps > 0:
        eager, mem = _measure(args, "eager"), _measure(args, "memattn")
        print(f"\ntraining step (forward + backward), median of {args.steps}, {eager['peak_kind']}:")
        print(f"  {'':8s} {'time ms':>10s} {'peak MiB':>10s}")
        for name, r in (("eager", eager), ("memattn", mem)):
            print(f"  {name:8s} {r['time_ms']:10.1f} {r['peak_bytes'] / 2 ** 20:10.1f}")
        print(f"  ratio    {mem['time_ms'] / eager['time_ms']:10.2f} "
              f"{mem['peak_bytes'] / max(eager['peak_bytes'], 1):10.2f}")
    return 0 if ok else 1


# dtype -> (atol, multiple): memattn's error against an fp64 run of the same model may be at most MULTIPLE x eager's
# error in the dtype, plus ATOL x the logits' scale (eager can be exact at tiny sizes)
_TOLERANCE = {"fp32": (3e-5, 4.0), "bf16": (1e-2, 2.0)}


def _check_logits(model, idx, out, ref, dtype: str) -> bool:
    """Prints memattn's and eager's errors against an fp64 run of the model; True when memattn's is within the
    dtype's tolerance of eager's."""
    import copy
    import torch
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(idx)
    err = (out.double() - truth).abs().max().item()
    eager_err = (ref.double() - truth).abs().max().item()
    atol, mult = _TOLERANCE[dtype]
    bound = mult * eager_err + atol * max(1.0, truth.abs().max().item())
    ok = err <= bound
    print(f"\nmax |memattn - eager| of the logits: {(out.double() - ref.double()).abs().max().item():.3g}; against "
          f"fp64: memattn {err:.3g}, eager {eager_err:.3g}, allowed {bound:.3g} ({'ok' if ok else 'MISMATCH'})")
    return ok


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def _load_factory(target: str):
    """MODULE:FACTORY, MODULE a file path (path/to/file.py) or a dotted module importable from the current
    directory."""
    if ":" not in target:
        raise UsageError(f"target {target!r} is not MODULE:FACTORY (e.g. mymodels.py:build or pkg.models:build)")
    mod_name, _, fn_name = target.rpartition(":")
    if not mod_name or not fn_name:
        raise UsageError(f"target {target!r} is not MODULE:FACTORY")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            path = os.path.abspath(mod_name)
            if not os.path.isfile(path):
                raise UsageError(f"no such file: {mod_name}")
            sys.path.insert(0, os.path.dirname(path))
            spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except UsageError:
        raise
    except ModuleNotFoundError as e:
        raise UsageError(f"cannot import {mod_name}: {e}") from None
    except Exception as e:
        raise UsageError(f"importing {mod_name} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise UsageError(f"{mod_name} has no callable {fn_name!r}")
    return fn


def _vocab_size(model):
    """The token vocabulary of a language model: its config's vocab size, else its first nn.Embedding's rows."""
    import torch.nn as nn
    for attr in ("config", "cfg", "args", "params"):
        cfg = getattr(model, attr, None)
        for key in ("vocab_size", "vocab", "n_vocab", "ntoken", "num_tokens"):
            v = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(v, int) and v > 0:
                return v
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    return None


def _example_inputs(model, args):
    import torch
    vocab = _vocab_size(model)
    if vocab is None:
        raise UsageError(f"cannot make example inputs for {type(model).__name__}: it has no config vocab size and "
                         "no nn.Embedding; return (model, example_inputs) from the factory")
    try:
        dev = next(model.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(dev)
    if not args.static:
        torch._dynamo.maybe_mark_dynamic(idx, 1)   # the sequence length stays a symbol in the formulas
    return (idx,), {}


def _call_inputs(inputs):
    import torch
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise UsageError(f"example inputs must be a tensor, a tuple/list of arguments or a dict of keyword "
                     f"arguments, not {type(inputs).__name__}")


def _first_tensor(out):
    import torch
    if isinstance(out, torch.Tensor):
        return out
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else \
        (getattr(out, "logits", None),)
    for x in items:
        t = _first_tensor(x) if x is not None else None
        if t is not None:
            return t
    return None


def report_cmd(args) -> int:
    import torch
    import attn_compiler
    from attn_compiler import options as options_mod
    from attn_compiler.report import Report

    if args.seq < 1 or args.batch < 1:
        raise UsageError("--seq and --batch must be positive")
    options = {"report": False}
    if args.budget is not None:
        options["memory_budget"] = args.budget
    try:
        options_mod.parse(options)
    except ValueError as e:
        raise UsageError(str(e)) from None
    factory = _load_factory(args.target)
    try:
        made = factory()
    except Exception as e:
        raise UsageError(f"{args.target}() failed: {type(e).__name__}: {e}") from None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        model, (call_args, call_kwargs) = made[0], _call_inputs(made[1])
    elif isinstance(made, torch.nn.Module):
        model = made
        call_args, call_kwargs = _example_inputs(model, args)
    else:
        raise UsageError(f"{args.target}() returned {type(made).__name__}; expected an nn.Module or "
                         "(model, example_inputs)")
    model.train(args.train)
    first = len(attn_compiler.reports())
    compiled = torch.compile(model, backend="memattn", options=options)
    if args.train:
        out = _first_tensor(compiled(*call_args, **call_kwargs))
        if out is None:
            raise UsageError("--train: the model returned no tensor to call backward on")
        (out if out.numel() == 1 else out.float().sum()).backward()
    else:
        with torch.no_grad():
            compiled(*call_args, **call_kwargs)
    made_reports = attn_compiler.reports()[first:]
    if not made_reports:
        print("memattn compiled no graph (is the model's forward traceable by torch.compile?)", file=sys.stderr)
        return 1
    report = Report.merge(made_reports)
    print(report.summary())
    print(report.table())
    if args.html:
        report.to_html(args.html)
        print(f"HTML report: {args.html}")
    if args.text:
        with open(args.text, "w") as f:
            f.write(str(report) + "\n")
        print(f"text report: {args.text}")
    return 0


def main(argv=None) -> int:
    from attn_compiler import __version__
    parser = argparse.ArgumentParser(prog="python -m attn_compiler", description=__doc__)
    parser.add_argument("--version", action="version", version=f"attn_compiler {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile the embedded GPT with memattn and compare it with eager")
    d.add_argument("--seq", type=int, default=1024, help="sequence length (default 1024)")
    d.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    d.add_argument("--layers", type=int, default=4, help="transformer layers (default 4)")
    d.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    d.add_argument("--kv-heads", type=int, default=4, help="key/value heads; fewer than heads is GQA (default 4)")
    d.add_argument("--d-model", type=int, default=256, help="model width (default 256)")
    d.add_argument("--steps", type=int, default=3, help="timed training steps per side; 0 skips timing")
    d.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    d.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="parameter dtype (default fp32)")
    d.add_argument("--worker", choices=["eager", "memattn"], help=argparse.SUPPRESS)
    r = sub.add_parser(
        "report", help="compile a model of yours with memattn and write the report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a model with FACTORY from MODULE, compile it with memattn on example inputs and write "
                    "the report (text summary on stdout; --html/--text files).",
        epilog="The factory takes no arguments and returns either a model or (model, example_inputs), where "
               "example_inputs is a tensor, a tuple of positional arguments or a dict of keyword arguments.\n"
               "When it returns only a model, the model must be a language model: token ids of shape "
               "[batch, seq] are made\nfrom its config's vocab size (config.vocab_size, cfg.vocab, ...) or its "
               "first nn.Embedding; anything else\nneeds example inputs from the factory.\n"
               "Set MEMATTN_LOG=info or debug to see the backend's log.")
    r.add_argument("target", help="MODULE:FACTORY; MODULE is a file (path/to/models.py) or a dotted module "
                                  "importable from the current directory (pkg.models)")
    r.add_argument("--seq", type=int, default=512, help="sequence length of the made token ids (default 512)")
    r.add_argument("--batch", type=int, default=1, help="batch size of the made token ids (default 1)")
    r.add_argument("--budget", help="memory_budget, e.g. 8GiB, 512MB or bytes (default: none)")
    r.add_argument("--html", metavar="OUT.html", help="write the HTML report here")
    r.add_argument("--text", metavar="OUT.txt", help="write the text report here")
    r.add_argument("--train", action="store_true",
                   help="compile a training step (train mode, forward + backward on the output or its .loss); "
                        "default: eval mode under no_grad")
    r.add_argument("--static", action="store_true",
                   help="keep the sequence length static (default: the made token ids' sequence axis is marked "
                        "dynamic so formulas and the plot are in the sequence length)")
    args = parser.parse_args(argv)
    if args.cmd == "report":
        try:
            return report_cmd(args)
        except UsageError as e:
            print(f"python -m attn_compiler report: error: {e}", file=sys.stderr)
            return 2
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
