"""Train a large-vocabulary policy with MHPO and with GRPO-clip: ``python -m mhpo_kernels demo``.

A small causal transformer with a Qwen-size vocabulary (151,936 tokens, small
hidden size) learns to reverse a digit string (``BOS 3 1 4 1 = -> 1 4 1 3 EOS``).
A short supervised warm-up teaches the format; then GRPO-style RL: G sampled
completions per prompt, partial-credit reward (the fraction of answer slots
right), group-normalised advantages, a few inner epochs of minibatch updates
so the importance ratios move away from 1. The loss is
:class:`mhpo_kernels.MHPOLinearLoss` over the lm_head, so the [tokens, V]
logits of the loss never exist at once. Both runs (MHPO and GRPO-clip) start
from the same warm-up checkpoint and seed; the output folder gets
``demo_log.json`` and ``demo_curves.png`` (reward and gradient norm of both
runs; needs matplotlib).

    python -m mhpo_kernels demo                      # ~2-4 minutes on 2 CPU cores
    python -m mhpo_kernels demo --smoke              # seconds, for CI
    python -m mhpo_kernels demo --device cuda --steps 200 --hidden 256 --layers 4
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
from torch import nn

import mhpo_kernels as mk
from .. import backends

DIGITS = list(range(15, 25))  # Qwen2's ids of "0".."9"


def special_ids(V):
    """BOS, SEP, EOS at the top of the vocabulary (Qwen2: <|endoftext|>, <|im_start|>, <|im_end|>)."""
    if V >= 151646:
        return 151643, 151644, 151645
    return V - 3, V - 2, V - 1


class Policy(nn.Module):
    """Pre-norm causal transformer; the loss module wraps its lm_head."""

    def __init__(self, V, d, layers, heads, ctx):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, V, bias=False)
        nn.init.normal_(self.emb.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        self.loss_fn = mk.MHPOLinearLoss(self.lm_head, loss_agg_mode="seq-mean-token-mean")

    def hidden(self, ids):
        T = ids.shape[1]
        x = self.emb(ids) + self.pos[:T]
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device, dtype=x.dtype)
        for blk in self.blocks:
            x = blk(x, src_mask=causal, is_causal=True)
        return self.norm(x)

    def forward(self, ids, start, targets, old, adv, mask, **kw):
        """Policy loss of the answer tokens ``targets`` ([B, A]) that follow ``ids[:, :start]``."""
        h = self.hidden(ids)[:, start - 1 : start - 1 + targets.shape[1]]
        return self.loss_fn(h, targets, old, adv, mask, **kw)


class Task:
    """Reverse ``L`` digits; reward = fraction of the L + 1 answer slots (digits, then EOS) right."""

    def __init__(self, V, L, device):
        self.L, self.device = L, device
        self.bos, self.sep, self.eos = special_ids(V)
        self.digits = torch.tensor(DIGITS, device=device)

    def prompts(self, n, g):
        d = self.digits[torch.randint(0, 10, (n, self.L), generator=g).to(self.device)]
        col = lambda t: torch.full((n, 1), t, device=self.device)
        return torch.cat([col(self.bos), d, col(self.sep)], 1), torch.cat([d.flip(1), col(self.eos)], 1)

    def reward(self, answers, solutions):
        return (answers == solutions).float().mean(1)

    @staticmethod
    def answer_mask(answers, eos):
        """1 up to and including the first EOS, 0 after it."""
        after = (answers == eos).long().cumsum(1) - (answers == eos).long()
        return (after == 0).float()


@torch.no_grad()
def sample(model, prompts, n_new, g, temperature=1.0):
    seq = prompts
    for _ in range(n_new):
        logits = model.lm_head(model.hidden(seq)[:, -1]).float() / temperature
        # inverse-CDF sampling: exact, and much cheaper than torch.multinomial over 151,936 categories
        cdf = torch.softmax(logits, -1).cumsum_(-1)
        u = torch.rand(cdf.shape[0], 1, generator=g).to(cdf.device) * cdf[:, -1:]
        nxt = torch.searchsorted(cdf, u).clamp_(max=cdf.shape[1] - 1)
        seq = torch.cat([seq, nxt], 1)
    return seq


def memory_probe(kind):
    """``(PeakMemory factory, release)`` for a device kind, or None where this platform cannot
    reset its memory high-water mark between two measurements.

    ``release()`` (no arguments) runs before each measurement. On CUDA the peak is the
    allocator's ``max_memory_allocated`` (reset per measurement), so there is nothing to
    release. On CPU the peak is the resident-set high-water mark; glibc would serve the
    loss's buffers from pages training already touched, invisible to that mark, so
    ``release`` hands free memory back to the OS (``malloc_trim``).
    """
    from .bench_utils import PeakMemory

    if kind == "cuda":
        return (lambda: PeakMemory("cuda")), (lambda: None)
    if kind != "cpu" or PeakMemory("cpu").method != "vmhwm":
        return None
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return (lambda: PeakMemory("cpu")), (lambda: trim(0))


def measure_loss_memory(lm_head, n_rows, n_cols, backend, g, kind=None, chunk_size=None):
    """Measured peak extra bytes of the loss forward + backward over the lm_head for one
    minibatch: (fused MHPOLinearLoss path, eager F.linear + reference loss), or None where
    :func:`memory_probe` cannot measure. ``kind`` (default: the weight's device type)
    picks the probe; tests pass ``"cuda"`` with CPU tensors and faked ``torch.cuda``
    counters to run the CUDA branch without a GPU."""
    W = lm_head.weight.detach()
    V, H = W.shape
    dev = W.device
    probe = memory_probe(kind or dev.type)
    if probe is None:
        return None
    peak_memory, release = probe
    ids = torch.randint(0, V, (n_rows, n_cols), generator=g).to(dev)
    old = torch.full((n_rows, n_cols), -12.0, device=dev)
    adv = torch.randn(n_rows, generator=g).to(dev)
    peaks = []
    for fused in (True, False):
        h = torch.randn(n_rows, n_cols, H, generator=g).to(dev, W.dtype).requires_grad_()
        w = W.clone().requires_grad_()
        release()
        with peak_memory() as pm:
            if fused:
                out = mk.fused_linear_mhpo_loss(h, w, ids, old, adv, backend=backend, chunk_size=chunk_size)
            else:
                out = mk.mhpo_loss(nn.functional.linear(h, w), ids, old, adv, backend="reference")
            out.loss.backward()
            del out
        peaks.append(pm.bytes)
    return tuple(peaks)


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class Bar:
    """A plain stderr progress bar (tqdm is not a dependency)."""

    def __init__(self, total, label, enabled=True):
        self.total, self.label, self.enabled, self.t0 = total, label, enabled, time.time()

    def update(self, i, text=""):
        if not self.enabled:
            return
        frac = i / max(self.total, 1)
        fill = int(24 * frac)
        eta = (time.time() - self.t0) / max(frac, 1e-9) * (1 - frac)
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (24 - fill)}] {i}/{self.total} "
                         f"eta {eta:4.0f}s {text}\033[K")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


def adamw(params, lr):
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99), fused=True)
    except (RuntimeError, TypeError):  # fused AdamW needs a recent torch on this device
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))


def warmup(model, task, args, g):
    """Supervised warm-up (plain cross-entropy on the answer tokens) so the policy emits digits at all."""
    opt = adamw(list(model.parameters()), args.warmup_lr)
    bar = Bar(args.warmup_steps, "warm-up ", not args.quiet)
    P = task.L + 2
    for step in range(args.warmup_steps):
        prompts, sol = task.prompts(max(args.prompts * args.group // 2, 1), g)
        seq = torch.cat([prompts, sol[:, :-1]], 1)
        h = model.hidden(seq)[:, P - 1 :]
        logits = model.lm_head(h).float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), sol.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(step + 1, f"ce {loss.item():.3f}")
    bar.close()


def rl_run(name, ratio_control, model, task, args, seed):
    """GRPO-style RL; returns the per-step log."""
    torch.manual_seed(seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    opt = adamw(list(model.parameters()), args.lr)
    P, A = task.L + 2, task.L + 1
    B = args.prompts * args.group
    mb = max(B // args.minibatches, 1)
    log, bar = [], Bar(args.steps, f"{name:<9}", not args.quiet)
    kw = dict(ratio_control=ratio_control, backend=args.backend, chunk_size=args.chunk_size)
    for step in range(args.steps):
        t0 = time.perf_counter()
        model.eval()
        prompts, sol = task.prompts(args.prompts, g)
        prompts, sol = prompts.repeat_interleave(args.group, 0), sol.repeat_interleave(args.group, 0)
        seq = sample(model, prompts, A, g)
        answers = seq[:, P:]
        reward = task.reward(answers, sol)
        grouped = reward.view(args.prompts, args.group)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)
        mask = task.answer_mask(answers, task.eos)
        with torch.no_grad():  # rollout log-probs, through the fused op (no logits, no gradient)
            zeros = torch.zeros_like(mask)
            old = model(seq, P, answers, zeros, zeros, mask, **kw).logprobs
        t_gen = time.perf_counter() - t0
        model.train()
        stats = []
        for _ in range(args.epochs):
            for idx in torch.randperm(B, generator=g).split(mb):
                out = model(seq[idx], P, answers[idx], old[idx], adv[idx], mask[idx], **kw)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                opt.step()
                stats.append((out.loss.item(), gnorm.item(), {k: v.item() for k, v in out.metrics.items()}))
        dt = time.perf_counter() - t0
        n_tok = int(mask.sum().item())
        m = {k: sum(s[2][k] for s in stats) / len(stats) for k in stats[0][2]}
        row = {
            "step": step,
            "reward": reward.mean().item(),
            "solved": (reward == 1).float().mean().item(),
            "loss": sum(s[0] for s in stats) / len(stats),
            "grad_norm": sum(s[1] for s in stats) / len(stats),
            "kl_old": m["kl_old"],
            "survival_mean": m.get("survival_mean"),
            "clipfrac": m.get("clipfrac"),
            "ratio_max": max(s[2]["ratio_max"] for s in stats),
            "ratio_min": min(s[2]["ratio_min"] for s in stats),
            "tokens_per_s": n_tok * args.epochs / max(dt - t_gen, 1e-9),
            "step_s": dt,
        }
        log.append(row)
        extra = (f"surv {row['survival_mean']:.3f}" if row["survival_mean"] is not None
                 else f"clip {row['clipfrac']:.3f}")
        bar.update(step + 1, f"reward {row['reward']:.3f} loss {row['loss']:+.3f} |g| {row['grad_norm']:.3f} "
                             f"kl {row['kl_old']:+.4f} {extra} {row['tokens_per_s']:.0f} tok/s")
        if args.verbose:
            print(json.dumps(row), file=sys.stderr)
    bar.close()
    return log


def window_means(log, key="reward"):
    k = max(1, math.ceil(len(log) * 0.1))
    vals = [r[key] for r in log]
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def plot(runs, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, log in runs.items():
        steps = [r["step"] for r in log]
        axes[0].plot(steps, [r["reward"] for r in log], label=name)
        axes[1].plot(steps, [r["grad_norm"] for r in log], label=name)
    axes[0].set(xlabel="RL step", ylabel="mean reward", title="reward (fraction of answer slots right)")
    axes[1].set(xlabel="RL step", ylabel="gradient norm (before clipping)", title="gradient norm")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse(argv):
    p = argparse.ArgumentParser(prog="mhpo-kernels demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder for demo_log.json and demo_curves.png")
    p.add_argument("--steps", type=int, default=40, help="RL steps per run")
    p.add_argument("--warmup-steps", type=int, default=40, help="supervised warm-up steps")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--digits", type=int, default=4, help="length of the string to reverse")
    p.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    p.add_argument("--group", type=int, default=8, help="G: sampled completions per prompt")
    p.add_argument("--epochs", type=int, default=2, help="inner epochs over each rollout")
    p.add_argument("--minibatches", type=int, default=2, help="optimizer steps per inner epoch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-lr", type=float, default=3e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--chunk-size", type=int, default=None, help="token rows per lm_head chunk of the fused loss "
                   "(default: the package's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--backend", default="auto", choices=backends.names())
    p.add_argument("--runs", default="mhpo,clip", help="comma list of mhpo, clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="a seconds-long run for CI")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print every step's JSON row")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup_steps, args.prompts, args.group = 3, 3, 2, 4
        args.hidden, args.layers, args.heads, args.digits = 32, 1, 2, 2
    if args.vocab < 32:
        p.error("--vocab must be >= 32 (digits use ids 15..24, specials the top 3 ids)")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    task = Task(args.vocab, args.digits, device)
    base = Policy(args.vocab, args.hidden, args.layers, args.heads, ctx=2 * args.digits + 3).to(device, dtype)
    backend = backends.resolve(args.backend, device)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"policy: {n_params / 1e6:.1f}M parameters, V={args.vocab}, hidden={args.hidden}, "
          f"layers={args.layers}, {args.dtype} on {device}; loss backend {backend!r}"
          f"{' (reference: unfused)' if backend == 'reference' else ''}", file=sys.stderr)

    warmup(base, task, args, g)
    configs = {"mhpo": mk.MHPOConfig(), "clip": mk.ClipConfig(eps_low=0.2, eps_high=0.2)}
    runs = {}
    for name in [r.strip() for r in args.runs.split(",") if r.strip()]:
        model = copy.deepcopy(base)
        runs[name] = rl_run(name, configs[name], model, task, args, seed=args.seed + 1)

    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for name, log in runs.items():
        first, last = window_means(log)
        summary[name] = {"reward_first_10pct": first, "reward_last_10pct": last, "gain": last - first,
                         "final_solved": window_means(log, "solved")[1]}
    mb_rows = max(args.prompts * args.group // args.minibatches, 1)
    measured = measure_loss_memory(base.lm_head, mb_rows, args.digits + 1, backend, g,
                                   chunk_size=args.chunk_size)
    wall = time.time() - t_start
    loss_memory = None
    if measured is not None:
        loss_memory = {"fused_bytes_measured": measured[0], "eager_bytes_measured": measured[1]}
    result = {"args": vars(args), "backend": backend, "parameters": n_params, "wall_s": wall,
              "loss_memory": loss_memory, "summary": summary, "runs": runs}
    with open(os.path.join(args.out, "demo_log.json"), "w") as f:
        json.dump(result, f, indent=1)
    png = plot(runs, os.path.join(args.out, "demo_curves.png"))

    tokens = f"{mb_rows * (args.digits + 1)} tokens, forward + backward over the lm_head"
    if measured is not None:
        print(f"\nloss peak memory per minibatch ({tokens}), measured: fused {fmt_bytes(measured[0])} vs "
              f"eager F.linear + reference {fmt_bytes(measured[1])} ({measured[1] / max(measured[0], 1):.1f}x less)")
    else:
        print(f"\nloss peak memory per minibatch ({tokens}): not measured (needs CUDA, or Linux with a "
              f"resettable resident-set high-water mark)")
    for name, s in summary.items():
        print(f"{name:>5}: mean reward first 10% of steps {s['reward_first_10pct']:.3f} -> last 10% "
              f"{s['reward_last_10pct']:.3f} ({s['gain']:+.3f}); solved in last 10%: {s['final_solved']:.0%}")
    print(f"wrote {os.path.join(args.out, 'demo_log.json')}" + (f" and {png}" if png else "")
          + f" in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
