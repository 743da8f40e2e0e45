"""Generate bytes from a trained H-Net: batched, with cached state at every level.

    python -m pretrain.sample runs/l1 --prompt "The H-Net " "Once upon" --max-bytes 200 --temperature 0.8
    python -m pretrain.sample exports/l1/model.pt --prompt-file prompts.txt --jsonl out.jsonl --show-boundaries

CHECKPOINT: a run directory or its checkpoints directory (the `latest` tag), a checkpoint tag
directory (any ZeRO stage, pipelined or not: consolidated on the fly), or an exported / public
`.pt` with its config JSON (--config, or config.json beside it). Each prompt is one row of the
batch, a document of its own (BOS first); rows of different lengths run together. Decoding is
incremental (pretrain/model/inference.py): every level keeps its state, and an inner level steps
only for the rows whose boundary fired. Temperature 0 is greedy. A row ends at EOS (byte 255),
at one of the --stop strings, or after --max-bytes. Output bytes that are not valid UTF-8 are
printed with replacement characters (the JSONL keeps the exact bytes in hex as well).
--show-boundaries marks chunk starts in the terminal (stage 0 `|`, stage 1 `‖`, deeper `¦`) and,
with --html, writes the boundary picture.
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from pretrain.errors import ConfigError, TrainingError

BOS, EOS = 254, 255
MARKS = ["|", "\u2016", "\u00a6", "\u00a6"]


# ----------------------------------------------------------------------------- loading
def load_model(path: str, config_json: str | None = None, device: str = "cpu", dtype: str = "fp32"):
    """The model of a checkpoint directory or a .pt file, in eval mode; `residual_proj` stays fp32."""
    from pretrain.model import HNetConfig, HNetForCausalLM, check_state_dict, load_public_checkpoint

    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint at {path}")
    if os.path.isfile(path):
        beside = [os.path.splitext(path)[0] + ".json", os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")]
        cfg = config_json or next((c for c in beside if os.path.isfile(c)), None)
        if cfg is None or not os.path.isfile(cfg):
            raise ConfigError(f"{path} needs its config JSON: pass --config (neither {' nor '.join(beside)} exists)"
                              if cfg is None else f"--config {cfg}: no such file")
        model = load_public_checkpoint(path, cfg)
    else:
        from pretrain.checkpoint import COMPLETE, CheckpointManager
        from pretrain.export import consolidated_state_dict
        from pretrain.reshard import find_checkpoint_root

        root = find_checkpoint_root(path)
        tag = os.path.basename(os.path.abspath(path)) if os.path.isfile(os.path.join(path, COMPLETE)) \
            else CheckpointManager(root).latest_tag()
        if not tag:
            raise ConfigError(f"{path}: no complete checkpoint found")
        config = HNetConfig.from_dict(CheckpointManager(root).read_meta(tag)["model"])
        state = consolidated_state_dict(root, tag)
        model = HNetForCausalLM(config)
        check_state_dict(model, state, f"{root}/{tag}")
        model.load_state_dict(state, strict=True)
    if dtype == "bf16":
        model.to(torch.bfloat16)
        for level in _outer_levels(model.backbone):
            level.residual_proj.to(torch.float32)  # the skip path is fp32 by design
    return model.to(device).eval()


def _outer_levels(level):
    while not level.is_innermost:
        yield level
        level = level.main_network


# ----------------------------------------------------------------------------- sampling
def next_bytes(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator):
    """(B, V) fp32 logits -> (B,) sampled bytes, on the logits' device."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)


@dataclass
class Generation:
    prompt: bytes
    output: bytearray = field(default_factory=bytearray)
    stop_reason: str = ""
    boundaries: list = field(default_factory=list)  # per stage (mask, prob) over prompt + output bytes

    @property
    def text(self) -> str:
        return safe_text(bytes(self.output))


def safe_text(data: bytes) -> str:
    """UTF-8 with invalid bytes, and an unfinished tail, as replacement characters."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return dec.decode(data) + dec.decode(b"", final=True)


@torch.no_grad()
def generate(model, prompts: list[bytes], max_bytes: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stops: list[bytes] | None = None,
             eos: int | None = EOS) -> tuple[list[Generation], dict]:
    """Cached incremental generation for a batch of prompts; returns the rows and statistics."""
    from pretrain.model.inference import CachedDecoder

    device = next(model.parameters()).device
    rows = [bytes([BOS]) + p for p in prompts]
    lengths = torch.tensor([len(r) for r in rows], device=device)
    longest = max(len(r) for r in rows)
    padded = torch.zeros(len(rows), longest + 1, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
    total = longest + max_bytes
    dec = CachedDecoder(model, len(rows), total)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = [Generation(p) for p in prompts]
    done = [False] * len(rows)
    stops = [s for s in (stops or []) if s]
    trace_masks, trace_probs = [], []
    x = padded[:, 0]
    t0 = time.perf_counter()
    steps = 0
    for t in range(total - 1):
        logits, bounds = dec.step(x)
        steps += 1
        trace_masks.append(torch.stack([m for m, _ in bounds]))
        trace_probs.append(torch.stack([p.float() for _, p in bounds]))
        sampled = next_bytes(logits, temperature, top_k, top_p, gen)
        in_prompt = (t + 1) < lengths
        x = torch.where(in_prompt, padded[:, min(t + 1, longest)], sampled)
        new = sampled.tolist()  # the one host read per byte: what stopping needs
        for i, b in enumerate(new):
            if done[i] or t + 1 < len(rows[i]):
                continue
            if eos is not None and b == eos:
                done[i], out[i].stop_reason = True, "eos"
                continue
            out[i].output.append(b)
            if any(out[i].output.endswith(s) for s in stops):
                done[i], out[i].stop_reason = True, "stop"
            elif len(out[i].output) >= max_bytes:
                done[i], out[i].stop_reason = True, "max_bytes"
        if all(done):
            break
    elapsed = time.perf_counter() - t0
    _, bounds = dec.step(x)  # the boundaries at the last bytes sampled (nothing is sampled from it)
    trace_masks.append(torch.stack([m for m, _ in bounds]))
    trace_probs.append(torch.stack([p.float() for _, p in bounds]))
    masks = torch.stack(trace_masks, -1).cpu()  # (stages, B, positions)
    probs = torch.stack(trace_probs, -1).cpu()
    for i, g in enumerate(out):
        n = len(rows[i]) + len(g.output) - 1  # positions stepped for this row's bytes after BOS
        g.boundaries = [(masks[s, i, 1:n + 1].tolist(), probs[s, i, 1:n + 1].tolist()) for s in range(masks.shape[0])]
    generated = sum(len(g.output) for g in out)
    ran = [float(masks[s - 1].float().mean()) for s in range(1, masks.shape[0] + 1)]  # inner level s ran
    stats = {"rows": len(rows), "steps": steps, "generated_bytes": generated, "seconds": elapsed,
             "bytes_per_s": generated / max(elapsed, 1e-9),
             "inner_level_ran_fraction": {f"level{s}": ran[s - 1] for s in range(1, len(ran) + 1)}}
    return out, stats


@torch.no_grad()
def generate_recompute(model, prompts: list[bytes], max_bytes: int) -> list[bytes]:
    """Greedy decoding by running the whole prefix of every row each step (packed into one row):
    the reference the cached decoder is checked against, and the benchmark's baseline."""
    device = next(model.parameters()).device
    rows = [bytearray([BOS]) + p for p in prompts]
    outs = [bytearray() for _ in prompts]
    for _ in range(max_bytes):
        ids = torch.tensor([b for r in rows for b in r], dtype=torch.long, device=device).view(1, -1)
        cu = torch.tensor([0] + [sum(len(r) for r in rows[:i + 1]) for i in range(len(rows))], dtype=torch.int32,
                          device=device)
        logits = model(ids, cu_seqlens=cu).logits[0]
        nxt = logits[cu[1:].long() - 1].argmax(-1).tolist()
        for r, o, b in zip(rows, outs, nxt):
            r.append(b)
            o.append(b)
    return [bytes(o) for o in outs]


# ----------------------------------------------------------------------------- output
def marked(data: bytes, boundaries: list) -> str:
    """The text with chunk starts marked (the deepest stage's mark wins), UTF-8 safe."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces, pending = [], ""
    for i, b in enumerate(data):
        for s in reversed(range(len(boundaries))):
            if boundaries[s][0][i]:
                pending = pending or MARKS[min(s, len(MARKS) - 1)]
                break
        text = dec.decode(bytes([b]))
        if text:
            pieces.append(pending + text)
            pending = ""
    pieces.append(dec.decode(b"", final=True))
    return "".join(pieces)


def write_jsonl(path: str, gens: list[Generation]) -> None:
    with open(path, "w") as f:
        for g in gens:
            f.write(json.dumps({"prompt": safe_text(g.prompt), "output": g.text, "output_hex": bytes(g.output).hex(),
                                "stop_reason": g.stop_reason, "n_bytes": len(g.output),
                                "boundaries": {f"stage{s}": [i for i, m in enumerate(mask) if m]
                                               for s, (mask, _) in enumerate(g.boundaries)}}) + "\n")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pretrain.sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--config", default=None, help="config JSON of a .pt checkpoint")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", help="prompts (one row each)")
    src.add_argument("--prompt-file", help="a file with one prompt per line")
    ap.add_argument("--max-bytes", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", nargs="*", default=[], help="stop strings")
    ap.add_argument("--no-eos", action="store_true", help="do not stop at the EOS byte")
    ap.add_argument("--show-boundaries", action="store_true")
    ap.add_argument("--html", default=None, help="write the boundary picture here")
    ap.add_argument("--jsonl", default=None, help="write one JSON line per prompt here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    return ap.parse_args(argv)


def check_args(a) -> list[bytes]:
    if a.max_bytes < 1:
        raise ConfigError(f"--max-bytes must be >= 1, got {a.max_bytes}")
    if a.temperature < 0 or not 0 < a.top_p <= 1 or a.top_k < 0:
        raise ConfigError("--temperature must be >= 0, --top-p in (0, 1], --top-k >= 0")
    if a.prompt_file:
        if not os.path.isfile(a.prompt_file):
            raise ConfigError(f"--prompt-file {a.prompt_file}: no such file")
        with open(a.prompt_file, encoding="utf-8", errors="surrogateescape") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        prompts = list(a.prompt)
    if not prompts:
        raise ConfigError("no prompt given")
    return [p.encode("utf-8", errors="surrogateescape") for p in prompts]


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        prompts = check_args(a)
        model = load_model(a.checkpoint, a.config, a.device, a.dtype)
    except (ConfigError, ValueError, FileNotFoundError, TrainingError) as e:
        print(f"[sample] error: {e}", file=sys.stderr)
        return 2
    gens, stats = generate(model, prompts, a.max_bytes, a.temperature, a.top_k, a.top_p, a.seed,
                           [s.encode() for s in a.stop], None if a.no_eos else EOS)
    for i, g in enumerate(gens):
        if a.show_boundaries:
            print(f"--- {i} ({g.stop_reason}):\n{marked(g.prompt + bytes(g.output), g.boundaries)}")
        else:
            print(f"--- {i} ({g.stop_reason}):\n{safe_text(g.prompt)}{g.text}")
    ran = ", ".join(f"{k} {v:.1%}" for k, v in stats["inner_level_ran_fraction"].items())
    print(f"[sample] {stats['generated_bytes']} bytes in {stats['seconds']:.2f} s ({stats['bytes_per_s']:.1f} "
          f"bytes/s, batch {stats['rows']}); inner levels ran on {ran} of the steps", file=sys.stderr)
    if a.jsonl:
        write_jsonl(a.jsonl, gens)
    if a.html or a.show_boundaries:
        from pretrain.chunks import boundary_page

        path = a.html or "boundaries.html"
        with open(path, "w") as f:
            f.write(boundary_page([(f"row {i}: {safe_text(g.prompt)[:60]}", g.prompt + bytes(g.output),
                                    g.boundaries, None) for i, g in enumerate(gens)]))
        print(f"[sample] boundary picture: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
