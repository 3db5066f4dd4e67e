"""PyTorch reference for the GPU timing in validation/gpu/run.sh.

The same MoE-ResNet as `moe-dmft gpu bench`: h0 = x W_in^T; per block a = rmsnorm(h) * gain (with --norm),
router logits r = a R^T, top-k experts per token, softmax gates over the selected set, experts
z_e = V_e relu(U_e a), h <- h + beta * sum_e g_e z_e; f = h w^T; loss 0.5 * mean (f - y)^2; AdamW.
Float32 throughout (TF32 only with --tf32, as for our backend). The MoE is written the usual eager way
(sort assignments by expert, one pair of products per expert, index_add back), which is also what our
backend does, so the comparison is of implementations of one algorithm, not of algorithms.

Each timed step is forward + backward + optimizer step, ended by torch.cuda.synchronize(), timed by the
host clock: the same convention as our backend's timing. Writes one JSON object to --out.
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch


class MoeResNet(torch.nn.Module):
    def __init__(self, d, n, depth, experts, active, hidden, norm):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.active = active
        self.norm = norm
        self.beta = 1.0 / depth
        self.embedding = torch.nn.Parameter(torch.randn(n, d, generator=g) / math.sqrt(d))
        self.routers = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(experts, n, generator=g) / n) for _ in range(depth)]
        )
        self.up = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(experts, hidden, n, generator=g) / math.sqrt(n)) for _ in range(depth)]
        )
        self.down = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(experts, n, hidden, generator=g) / math.sqrt(hidden)) for _ in range(depth)]
        )
        self.gains = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(n)) for _ in range(depth)])
        self.readout = torch.nn.Parameter(torch.randn(1, n, generator=g) / n)

    def moe(self, a, router, up, down):
        tokens = a.shape[0]
        experts = up.shape[0]
        logits = a @ router.t()
        top_vals, top_idx = logits.topk(self.active, dim=-1)
        gates = torch.softmax(top_vals, dim=-1)
        flat = top_idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // self.active
        counts = torch.bincount(flat, minlength=experts).tolist()
        gathered = a.index_select(0, token_of)
        outs = []
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            chunk = gathered[start:start + c]
            outs.append(torch.relu(chunk @ up[e].t()) @ down[e].t())
            start += c
        z = torch.cat(outs, dim=0) * gates.reshape(-1)[order].unsqueeze(1)
        return torch.zeros_like(a).index_add(0, token_of, z)

    def forward(self, x):
        h = x @ self.embedding.t()
        for router, up, down, gain in zip(self.routers, self.up, self.down, self.gains):
            if self.norm:
                a = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * gain
            else:
                a = h
            h = h + self.beta * self.moe(a, router, up, down)
        return h @ self.readout.t()


def step_flops(d, n, depth, experts, active, hidden, tokens):
    per_block = 2.0 * tokens * n * experts + active * tokens * 4.0 * n * hidden
    return 3.0 * (depth * per_block + 2.0 * tokens * d * n + 2.0 * tokens * n)


def time_steps(model, step_fn, x, y, warmup, steps):
    losses = []
    for _ in range(warmup):
        losses.append(step_fn(x, y))
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step_fn(x, y))
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, losses


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--active", type=int, default=8)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--input-dim", type=int, default=64)
    p.add_argument("--norm", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--compile", action="store_true", help="time torch.compile(model) instead of eager")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    dev = torch.device("cuda")
    model = MoeResNet(a.input_dim, a.width, a.depth, a.experts, a.active, a.expert_hidden, a.norm).to(dev)
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(a.tokens, a.input_dim, device=dev, generator=g)
    y = torch.randn(a.tokens, 1, device=dev, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    fwd = torch.compile(model) if a.compile else model

    def step(xb, yb):
        opt.zero_grad(set_to_none=True)
        f = fwd(xb)
        loss = 0.5 * (f - yb).pow(2).mean()
        loss.backward()
        opt.step()
        return loss

    result = {
        "framework": "pytorch",
        "torch_version": torch.__version__,
        "mode": "compile" if a.compile else "eager",
        "tf32": a.tf32,
        "device": torch.cuda.get_device_name(0),
        "sizes": {"width": a.width, "depth": a.depth, "experts": a.experts, "active": a.active,
                  "expert_hidden": a.expert_hidden, "tokens": a.tokens, "input_dim": a.input_dim, "norm": a.norm},
        "params_total": sum(p.numel() for p in model.parameters()),
    }
    try:
        times, losses = time_steps(model, step, x, y, a.warmup, a.steps)
        median = statistics.median(times)
        flops = step_flops(a.input_dim, a.width, a.depth, a.experts, a.active, a.expert_hidden, a.tokens)
        result.update({
            "step_ms": times,
            "median_step_ms": median,
            "flops_per_step": flops,
            "achieved_tflops": flops / (median * 1e-3) / 1e12,
            "losses": [float(l) for l in losses],
            "ok": True,
        })
    except Exception as e:  # torch.compile may fail on data-dependent shapes: record, do not crash
        result.update({"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({k: result.get(k) for k in ("mode", "tf32", "median_step_ms", "achieved_tflops", "ok", "error")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
