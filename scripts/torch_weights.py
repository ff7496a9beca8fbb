#!/usr/bin/env python3
"""Moves model weights between PyTorch and aimass (safetensors).

aimass models use torchvision's and torch.nn.Sequential's parameter names
(`conv1.weight`, `layer1.0.bn1.running_mean`, `0.weight`, ...), so a
state_dict of the same architecture loads as is. This script handles the
rest: other module names (renamed by prefix), dtypes, and the file format.

  python3 scripts/torch_weights.py to-safetensors model.pth model.safetensors \
      --rename module.= --rename features.=backbone. --drop classifier.
  python3 scripts/torch_weights.py to-torch model.safetensors model.pth \
      --rename backbone.=features.

to-safetensors: reads a checkpoint written by torch.save (a state_dict, or
a dict holding one under "state_dict" / "model"), applies the renames (the
first OLD prefix that starts a name is replaced by NEW; an empty NEW strips
it), drops names starting with a --drop prefix, casts floating tensors to
float32 (--dtype keeps them or picks another), drops `num_batches_tracked`
(aimass keeps no step counter in BatchNorm), and writes safetensors.

to-torch: the reverse; the result loads with `model.load_state_dict(
torch.load(path))`. It has no `num_batches_tracked` entries: PyTorch's
BatchNorm accepts that, also with strict=True (it fills in 0 when a state
dict carries no version metadata, as a plain dict does).

Needs torch and safetensors (`python3 -m pip install torch safetensors`).
The same renames can be done on the Rust side while loading:
`aimass::nn::params::LoadConfig::non_strict().with_renamed_prefix("features.", "backbone.")`.
"""
import argparse
import sys

import torch
from safetensors.torch import load_file, save_file


def rename(name, pairs):
    for old, new in pairs:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def convert(state, pairs, drop, dtype, keep_batches_tracked=False):
    """The renamed, filtered and cast state dict (names sorted)."""
    out = {}
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        if name.endswith("num_batches_tracked") and not keep_batches_tracked:
            continue
        if any(name.startswith(d) for d in drop):
            continue
        new = rename(name, pairs)
        if new in out:
            sys.exit(f"error: two tensors are renamed to `{new}`; check the --rename pairs")
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        out[new] = t.detach().cpu().contiguous()
    return out


def parse_pairs(items):
    pairs = []
    for item in items or []:
        if "=" not in item:
            sys.exit(f"error: --rename takes OLD=NEW, got `{item}`")
        old, new = item.split("=", 1)
        pairs.append((old, new))
    return pairs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=["to-safetensors", "to-torch"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--rename", action="append", metavar="OLD=NEW", help="prefix rename, repeatable; first match wins")
    p.add_argument("--drop", action="append", default=[], metavar="PREFIX", help="leave out names with this prefix, repeatable")
    p.add_argument("--dtype", default="float32", help="float32 (default), float64, float16, bfloat16, or keep")
    args = p.parse_args()
    dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
    pairs = parse_pairs(args.rename)
    if args.direction == "to-safetensors":
        state = torch.load(args.src, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        out = convert(state, pairs, args.drop, dtype)
        save_file(out, args.dst)
    else:
        out = convert(load_file(args.src), pairs, args.drop, dtype)
        torch.save(out, args.dst)
    print(f"wrote {len(out)} tensors to {args.dst}")


if __name__ == "__main__":
    main()
