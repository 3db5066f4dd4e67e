#!/usr/bin/env python3
"""Rebuilds a moe-dmft MoE-ResNet in PyTorch from its exported weights and checks that it reproduces
the Rust forward pass.

    cargo run --release --example export_resnet -- DIR
    python3 validation/torch_roundtrip.py DIR

DIR holds weights.safetensors (f32 tensors named as in docs/tensors.md), model.json (the ResNetConfig,
the forward multipliers and the norm epsilon), task_x.npy (inputs) and predictions.npy (the Rust f32
model's outputs). The script implements the forward pass of SPEC §3 from the documented rules only:
RMS norm with gain, router logits, selection of the top-k of logit + bias (prototype groups, ties to the
lowest index), gates renormalized over the selected set (softmax or sigmoid), capacity drops in
slot-major token order, routed and shared experts, residual branches scaled by beta_L, readout.

Expected outcome: max |torch - rust| < 1e-5 (float32). Exit status 0 on success, 1 on a mismatch.
If PyTorch is not installed the same forward pass runs in numpy (say so in the output).
Needs only numpy (+ torch when available); the safetensors file is parsed directly.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np

try:
    import torch

    HAVE_TORCH = True
except ImportError:  # numpy fallback
    HAVE_TORCH = False

TOLERANCE = 1e-5


def read_safetensors(path):
    """name -> float32 numpy array; the format is an 8-byte header length, a JSON header, raw data."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = {"F32": np.float32, "F64": np.float64}[info["dtype"]]
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"]).astype(np.float32)
    return out, header.get("__metadata__", {})


def activation(name, x, xp):
    if name == "relu":
        return xp.maximum(x, 0 * x)
    if name == "tanh":
        return xp.tanh(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + xp.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    if name == "linear":
        return x
    raise ValueError(f"unknown activation {name}")


def route(logits, bias, active, routing):
    """Selection, gates and capacity of one MoE layer (numpy, float64 scores: decisions only)."""
    tokens, experts = logits.shape
    z = routing.get("prototypes", 1)
    group, per_group = experts // z, active // z
    scores = logits.astype(np.float64) + bias.astype(np.float64)
    if routing.get("tie_break", "random") != "index":
        raise ValueError("the round trip needs tie_break = 'index' (random ties use Rust's rng)")
    selected = np.zeros((tokens, active), dtype=np.int64)
    for t in range(tokens):
        chosen = []
        for g in range(z):
            idx = np.arange(g * group, (g + 1) * group)
            # stable sort on -score: equal scores keep the lower index first.
            order = idx[np.argsort(-scores[t, idx], kind="stable")]
            chosen.extend(order[:per_group].tolist())
        chosen = np.array(sorted(chosen))
        selected[t] = chosen[np.argsort(-scores[t, chosen], kind="stable")]
    kept = np.ones((tokens, active), dtype=bool)
    c = routing.get("capacity_factor")
    if c is not None:
        capacity = int(np.ceil(c * tokens * active / experts))
        filled = np.zeros(experts, dtype=np.int64)
        for j in range(active):  # slot-major, then token order
            for t in range(tokens):
                e = selected[t, j]
                if filled[e] < capacity:
                    filled[e] += 1
                else:
                    kept[t, j] = False
    return selected, kept


class MoEResNet:
    """The MoE-ResNet forward pass on a backend: torch (float32 or float64) or numpy."""

    def __init__(self, meta, weights, backend="torch", dtype="float32"):
        self.cfg = meta["config"]
        self.mult = meta["multipliers"]
        self.eps = meta["norm_eps"]
        self.backend = backend
        if backend == "torch":
            tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
            self.w = {k: torch.nn.Parameter(torch.from_numpy(v.copy()).to(tdtype), requires_grad=False) for k, v in weights.items()}
            self.xp = torch
        else:
            self.w = {k: v.astype(dtype) for k, v in weights.items()}
            self.xp = np
        self.dtype = dtype

    def _t(self, a):
        return a.T if self.backend == "numpy" else a.transpose(-1, -2)

    def _asarray(self, x):
        if self.backend == "torch":
            return torch.from_numpy(np.ascontiguousarray(x)).to(self.w["embedding"].dtype)
        return x.astype(self.dtype)

    def _inv_rms(self, h):
        """1 / sqrt(mean(h^2) + eps) per row."""
        if self.backend == "torch":
            return torch.rsqrt((h * h).mean(dim=-1, keepdim=True) + self.eps)
        return 1.0 / np.sqrt((h * h).mean(axis=1, keepdims=True) + self.eps)

    def _to_numpy(self, a):
        return a.detach().cpu().numpy() if self.backend == "torch" else a

    def forward(self, x):
        xp, m, cfg = self.xp, self.mult, self.cfg
        sizes, routing = cfg["sizes"], cfg["routing"]
        h = m["input"] * (self._asarray(x) @ self._t(self.w["embedding"]))
        for l in range(sizes["depth"]):
            if cfg["norm"]:
                a = m["norm"] * (h * self._inv_rms(h) * self.w[f"blocks.{l}.norm"])
            else:
                a = h
            p = f"blocks.{l}.moe"
            logits = m["router"] * (a @ self._t(self.w[f"{p}.router"]))
            logits_np = self._to_numpy(logits)
            selected, kept = route(logits_np, self._to_numpy(self.w[f"{p}.expert_bias"]), sizes["active"], routing)
            gates = self._gates(logits, selected, routing.get("gate", "softmax"))
            out = 0 * a
            for e in range(sizes["experts"]):
                rows, slots = np.nonzero((selected == e) & kept)
                if len(rows) == 0:
                    continue
                a_e = a[rows]
                u = m["up"] * (a_e @ self._t(self.w[f"{p}.expert_up"][e]))
                z = m["down"] * (activation(cfg["activation"], u, xp) @ self._t(self.w[f"{p}.expert_down"][e]))
                g = gates[rows, slots][:, None]
                if self.backend == "torch":
                    out = out.index_add(0, torch.from_numpy(rows), g * z)
                else:
                    np.add.at(out, rows, g * z)
            for s in range(routing.get("shared_experts", 0)):
                u = m["up"] * (a @ self._t(self.w[f"{p}.shared_up"][s]))
                out = out + m["down"] * (activation(cfg["activation"], u, xp) @ self._t(self.w[f"{p}.shared_down"][s]))
            h = h + m["residual"] * out
        return self._to_numpy(m["readout"] * (h @ self._t(self.w["readout"]))).astype(np.float64)

    def _gates(self, logits, selected, kind):
        """Gates over the selected set, as differentiable functions of the logits."""
        if self.backend == "torch":
            r = torch.gather(logits, 1, torch.from_numpy(selected))
            if kind == "softmax":
                return torch.softmax(r, dim=-1)
            s = torch.sigmoid(r)
            return s / s.sum(dim=-1, keepdim=True)
        r = np.take_along_axis(logits, selected, axis=1)
        if kind == "softmax":
            e = np.exp(r - r.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        s = 1.0 / (1.0 + np.exp(-r))
        return s / s.sum(axis=1, keepdims=True)


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    d = Path(sys.argv[1])
    meta = json.loads((d / "model.json").read_text())
    weights, file_meta = read_safetensors(d / "weights.safetensors")
    expected = {t["name"]: (t["group"], t["shape"]) for t in meta["tensors"]}
    got = {k: (file_meta.get(k), list(v.shape)) for k, v in weights.items()}
    if expected != got:
        print(f"tensor names/groups/shapes differ from model.json:\n{expected}\n{got}")
        return 1
    x = np.load(d / "task_x.npy")
    rust = np.load(d / "predictions.npy")
    runs = [("torch", "float32"), ("torch", "float64")] if HAVE_TORCH else [("numpy", "float32"), ("numpy", "float64")]
    if not HAVE_TORCH:
        print("PyTorch is not installed: running the same forward pass in numpy")
    ok = True
    for backend, dtype in runs:
        pred = MoEResNet(meta, weights, backend, dtype).forward(x)
        diff = float(np.max(np.abs(pred - rust)))
        passed = diff < TOLERANCE
        ok &= passed
        print(f"{backend} {dtype}: {pred.shape[0]} samples, max |{backend} - rust| = {diff:.3e} "
              f"(tolerance {TOLERANCE:g}) {'OK' if passed else 'FAIL'}")
    if HAVE_TORCH:
        print(f"torch {torch.__version__}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
