"""PyTorch reference for the GPU timing in validation/gpu/run.sh.

Two architectures (--arch), each the same model as the corresponding `moe-dmft gpu bench`:

resnet (default), the MoE-ResNet: h0 = x W_in^T; per block a = rmsnorm(h) * gain (with --norm), router
logits r = a R^T, top-k experts per token, softmax gates over the selected set, experts
z_e = V_e relu(U_e a), h <- h + beta * sum_e g_e z_e; f = h w^T; loss 0.5 * mean (f - y)^2; AdamW.

transformer, the MoE-Transformer (src/model/transformer.rs, attention.rs): h0 = E[token] + P[position];
per block (pre-norm) h += beta * attn(rmsnorm(h)), h += beta * moe(rmsnorm(h)), beta = 1/depth; attention
causal with a fused qkv projection (3N x N), H heads, logits scaled by 1/d_head (not 1/sqrt(d_head)),
output projection N x N, computed by F.scaled_dot_product_attention; MoE FFN as above with
z_e = V_e gelu_tanh(U_e a); logits = rmsnorm(h) U^T (U separate from E); loss = mean next-token
cross-entropy over the B x S tokens of a fixed batch of random token ids; AdamW. --tokens, --input-dim and
--norm are accepted and ignored (tokens = batch x seq), so that run.sh can pass one SIZES array.

Float32 throughout (TF32 only with --tf32, as for our backend). The MoE is written the usual eager way
(sort assignments by expert, one pair of products per expert, index_add back), which is also what our
backend does, so the comparison is of implementations of one algorithm, not of algorithms.

Each timed step is forward + backward + optimizer step, ended by torch.cuda.synchronize(), timed by the
host clock: the same convention as our backend's timing. Writes one JSON object to --out. Runs on the CPU
when there is no GPU (for testing the script; the timings then mean nothing).
"""

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def rms_norm(h, gain, eps=1e-6):
    return h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps) * gain


def moe_ffn(a, router, up, down, active, act):
    """MoE FFN on tokens a (T x N): router (M x N), up (M x n x N), down (M x N x n); top-`active` of the
    router logits, softmax gates over the selected ones, z_e = down_e act(up_e a), no capacity.
    Assignments are sorted by expert, one pair of products per expert, index_add back."""
    experts = up.shape[0]
    logits = a @ router.t()
    top_vals, top_idx = logits.topk(active, dim=-1)
    gates = torch.softmax(top_vals, dim=-1)
    flat = top_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = order // active
    counts = torch.bincount(flat, minlength=experts).tolist()
    gathered = a.index_select(0, token_of)
    outs = []
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        chunk = gathered[start:start + c]
        outs.append(act(chunk @ up[e].t()) @ down[e].t())
        start += c
    z = torch.cat(outs, dim=0) * gates.reshape(-1)[order].unsqueeze(1)
    return torch.zeros_like(a).index_add(0, token_of, z)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


class MoeParams(torch.nn.Module):
    """Router, up and down projections of the MoE FFN of every block."""

    def __init__(self, n, depth, experts, hidden, g):
        super().__init__()
        self.routers = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(experts, n, generator=g) / n) for _ in range(depth)]
        )
        self.up = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(experts, hidden, n, generator=g) / math.sqrt(n)) for _ in range(depth)]
        )
        self.down = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(experts, n, hidden, generator=g) / math.sqrt(hidden)) for _ in range(depth)]
        )


class MoeResNet(torch.nn.Module):
    def __init__(self, d, n, depth, experts, active, hidden, norm):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.active = active
        self.norm = norm
        self.beta = 1.0 / depth
        self.embedding = torch.nn.Parameter(torch.randn(n, d, generator=g) / math.sqrt(d))
        moe = MoeParams(n, depth, experts, hidden, g)
        self.routers, self.up, self.down = moe.routers, moe.up, moe.down
        self.gains = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(n)) for _ in range(depth)])
        self.readout = torch.nn.Parameter(torch.randn(1, n, generator=g) / n)

    def forward(self, x):
        h = x @ self.embedding.t()
        for router, up, down, gain in zip(self.routers, self.up, self.down, self.gains):
            a = rms_norm(h, gain) if self.norm else h
            h = h + self.beta * moe_ffn(a, router, up, down, self.active, torch.relu)
        return h @ self.readout.t()


class MoeTransformer(torch.nn.Module):
    def __init__(self, vocab, seq, n, depth, n_head, experts, active, hidden):
        super().__init__()
        if n % n_head:
            raise ValueError("width %d is not a multiple of n_head %d" % (n, n_head))
        g = torch.Generator().manual_seed(0)
        self.n_head = n_head
        self.active = active
        self.beta = 1.0 / depth
        self.embedding = torch.nn.Parameter(torch.randn(vocab, n, generator=g))
        self.position = torch.nn.Parameter(torch.randn(seq, n, generator=g))
        self.qkv = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(3 * n, n, generator=g) / math.sqrt(n)) for _ in range(depth)]
        )
        self.out = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(n, n, generator=g) / math.sqrt(n)) for _ in range(depth)]
        )
        moe = MoeParams(n, depth, experts, hidden, g)
        self.routers, self.up, self.down = moe.routers, moe.up, moe.down
        self.attn_gains = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(n)) for _ in range(depth)])
        self.ffn_gains = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(n)) for _ in range(depth)])
        self.final_gain = torch.nn.Parameter(torch.ones(n))
        # small unembedding: logits start near 0, the loss near ln(vocab)
        self.unembedding = torch.nn.Parameter(torch.randn(vocab, n, generator=g) / n)

    def attention(self, a, qkv, out):
        b, s, n = a.shape
        dh = n // self.n_head
        q, k, v = (a @ qkv.t()).split(n, dim=-1)
        q, k, v = (t.reshape(b, s, self.n_head, dh).transpose(1, 2) for t in (q, k, v))
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / dh)
        return ctx.transpose(1, 2).reshape(b, s, n) @ out.t()

    def forward(self, tokens):
        b, s = tokens.shape
        h = self.embedding[tokens] + self.position[:s]
        for l in range(len(self.qkv)):
            h = h + self.beta * self.attention(rms_norm(h, self.attn_gains[l]), self.qkv[l], self.out[l])
            a = rms_norm(h, self.ffn_gains[l]).reshape(b * s, -1)
            z = moe_ffn(a, self.routers[l], self.up[l], self.down[l], self.active, gelu_tanh)
            h = h + self.beta * z.reshape(b, s, -1)
        return rms_norm(h, self.final_gain) @ self.unembedding.t()


def step_flops(d, n, depth, experts, active, hidden, tokens):
    per_block = 2.0 * tokens * n * experts + active * tokens * 4.0 * n * hidden
    return 3.0 * (depth * per_block + 2.0 * tokens * d * n + 2.0 * tokens * n)


def transformer_step_flops(batch, seq, n, depth, experts, active, hidden, vocab):
    """Matrix-product FLOPs of one step (forward x 3), the formula of our Rust side: qkv, the full S x S
    score and probs @ v products (causality not discounted), output projection, router, active experts,
    unembedding."""
    t = float(batch * seq)
    per_block = (2.0 * t * n * 3 * n + 2.0 * t * seq * n + 2.0 * t * seq * n + 2.0 * t * n * n
                 + 2.0 * t * n * experts + active * t * 4.0 * n * hidden)
    return 3.0 * (depth * per_block + 2.0 * t * n * vocab)


def synchronize(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_steps(dev, step_fn, x, y, warmup, steps):
    losses = []
    for _ in range(warmup):
        losses.append(step_fn(x, y))
    synchronize(dev)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step_fn(x, y))
        synchronize(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return times, losses


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=["resnet", "transformer"], default="resnet")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--active", type=int, default=8)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--tokens", type=int, default=8192, help="resnet only")
    p.add_argument("--input-dim", type=int, default=64, help="resnet only")
    p.add_argument("--norm", action="store_true", help="resnet only (the transformer is always pre-norm)")
    p.add_argument("--batch", type=int, default=32, help="transformer only")
    p.add_argument("--seq", type=int, default=256, help="transformer only")
    p.add_argument("--n-head", type=int, default=16, help="transformer only")
    p.add_argument("--vocab", type=int, default=65, help="transformer only")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--compile", action="store_true", help="time torch.compile(model) instead of eager")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=dev).manual_seed(1)
    if a.arch == "resnet":
        model = MoeResNet(a.input_dim, a.width, a.depth, a.experts, a.active, a.expert_hidden, a.norm).to(dev)
        x = torch.randn(a.tokens, a.input_dim, device=dev, generator=g)
        y = torch.randn(a.tokens, 1, device=dev, generator=g)

        def loss_fn(f, yb):
            return 0.5 * (f - yb).pow(2).mean()

        sizes = {"width": a.width, "depth": a.depth, "experts": a.experts, "active": a.active,
                 "expert_hidden": a.expert_hidden, "tokens": a.tokens, "input_dim": a.input_dim, "norm": a.norm}
        flops = step_flops(a.input_dim, a.width, a.depth, a.experts, a.active, a.expert_hidden, a.tokens)
    else:
        model = MoeTransformer(a.vocab, a.seq, a.width, a.depth, a.n_head, a.experts, a.active,
                               a.expert_hidden).to(dev)
        batch = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=dev, generator=g)
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

        def loss_fn(f, yb):
            return F.cross_entropy(f.reshape(-1, f.shape[-1]), yb.reshape(-1))

        sizes = {"width": a.width, "depth": a.depth, "experts": a.experts, "active": a.active,
                 "expert_hidden": a.expert_hidden, "tokens": a.batch * a.seq, "batch": a.batch, "seq": a.seq,
                 "n_head": a.n_head, "vocab": a.vocab}
        flops = transformer_step_flops(a.batch, a.seq, a.width, a.depth, a.experts, a.active, a.expert_hidden,
                                       a.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    fwd = torch.compile(model) if a.compile else model

    def step(xb, yb):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(fwd(xb), yb)
        loss.backward()
        opt.step()
        return loss.detach()

    result = {
        "framework": "pytorch",
        "torch_version": torch.__version__,
        "arch": a.arch,
        "mode": "compile" if a.compile else "eager",
        "tf32": a.tf32,
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "sizes": sizes,
        "params_total": sum(p.numel() for p in model.parameters()),
    }
    if a.arch == "transformer":
        result.update({"batch": a.batch, "seq": a.seq, "n_head": a.n_head, "vocab": a.vocab, "attention": "sdpa",
                       "lr": a.lr})
    try:
        times, losses = time_steps(dev, step, x, y, a.warmup, a.steps)
        median = statistics.median(times)
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
    print(json.dumps({k: result.get(k) for k in ("arch", "mode", "tf32", "median_step_ms", "achieved_tflops", "ok",
                                                 "error")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
