"""H-Net architecture configuration: the public JSON format plus the project's training fields.

`arch_layout` nests one list per hierarchy level: ``[encoder, inner, decoder]`` for an outer
stage and ``[main]`` for the innermost network, e.g. ``["m4", ["T22"], "m4"]`` (1-stage).
Per-stage lists (`d_model`, `d_intermediate`, `attn_cfg.*`) are indexed by depth, outer first.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pretrain.errors import ConfigError  # one ConfigError for the whole project

LAYER_LETTERS = "mMtT"
_LAYOUT_TOKEN = re.compile(r"([A-Za-z])(\d+)")



@dataclass
class SSMConfig:
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    chunk_size: int = 256
    headdim: int = 64  # fixed in the public code; kept configurable for tiny test models
    ngroups: int = 1


@dataclass
class AttnConfig:
    num_heads: list[int] = field(default_factory=list)
    rotary_emb_dim: list[int] = field(default_factory=list)
    window_size: list[int] = field(default_factory=list)  # -1 = full causal attention


def parse_layout(layout: str, where: str = "arch_layout") -> list[tuple[str, int]]:
    """'T1m4' -> [('T', 1), ('m', 4)]. Raises ConfigError on unknown letters or junk."""
    if not isinstance(layout, str) or not layout:
        raise ConfigError(f"{where}: expected a non-empty layer string like 'm4' or 'T1m4', got {layout!r}")
    tokens = _LAYOUT_TOKEN.findall(layout)
    if "".join(f"{a}{n}" for a, n in tokens) != layout:
        raise ConfigError(f"{where}: cannot parse layer string {layout!r} (expected letter+count pairs like 'T1m4')")
    out = []
    for letter, count in tokens:
        if letter not in LAYER_LETTERS:
            raise ConfigError(f"{where}: unknown layer letter {letter!r} in {layout!r} (allowed: m, M, t, T)")
        out.append((letter, int(count)))
    return out


@dataclass
class HNetConfig:
    arch_layout: list
    d_model: list[int]
    d_intermediate: list[int]
    vocab_size: int = 256
    ssm_cfg: SSMConfig = field(default_factory=SSMConfig)
    attn_cfg: AttnConfig = field(default_factory=AttnConfig)
    tie_embeddings: bool = False
    # Training fields (not in the public JSON): target compression N^s of every routing
    # level, outer first, and the weight alpha of the ratio loss (eq. 10).
    ratio_targets: list[float] | None = None
    ratio_alpha: float = 0.03

    def __post_init__(self):
        if isinstance(self.ssm_cfg, dict):
            self.ssm_cfg = _build(SSMConfig, self.ssm_cfg, "ssm_cfg")
        if isinstance(self.attn_cfg, dict):
            n_levels = len(self.d_model) if isinstance(self.d_model, list) else 1
            # The public format also allows one value for every level: broadcast it.
            attn = {k: [v] * n_levels if isinstance(v, (int, float)) else v for k, v in self.attn_cfg.items()}
            self.attn_cfg = _build(AttnConfig, attn, "attn_cfg")
        for k, v in vars(self.ssm_cfg).items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"ssm_cfg.{k}: expected one integer for every stage, got {v!r} "
                                  f"(per-stage SSM settings are not supported)")
        if self.ratio_targets is None:
            # The paper's settings: N = 6 for one stage, N = 3 per stage when nested.
            self.ratio_targets = [6.0] if self.num_stages == 1 else [3.0] * self.num_stages
        self.validate()

    # ----------------------------------------------------------------- structure
    @property
    def num_stages(self) -> int:
        """Number of routing levels (1 for a 1-stage H-Net); the depth of `arch_layout` minus one."""
        depth, layout = 0, self.arch_layout
        while isinstance(layout, list) and len(layout) == 3:
            depth += 1
            layout = layout[1]
        return depth

    def stage_layout(self, stage: int) -> list:
        layout = self.arch_layout
        for _ in range(stage):
            layout = layout[1]
        return layout

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        layout, depth = self.arch_layout, 0
        while True:
            where = "arch_layout" + "[1]" * depth
            if not isinstance(layout, list) or len(layout) not in (1, 3):
                raise ConfigError(f"{where}: expected [encoder, inner, decoder] or [main], got {layout!r}")
            if len(layout) == 1:
                parse_layout(layout[0], f"{where}[0]")
                break
            parse_layout(layout[0], f"{where}[0] (encoder)")
            parse_layout(layout[2], f"{where}[2] (decoder)")
            layout, depth = layout[1], depth + 1
        n_levels = depth + 1
        for name, values in (("d_model", self.d_model), ("d_intermediate", self.d_intermediate),
                             ("attn_cfg.num_heads", self.attn_cfg.num_heads),
                             ("attn_cfg.rotary_emb_dim", self.attn_cfg.rotary_emb_dim),
                             ("attn_cfg.window_size", self.attn_cfg.window_size)):
            if not isinstance(values, list) or len(values) != n_levels:
                raise ConfigError(f"{name}: expected a list of {n_levels} values (one per hierarchy level of "
                                  f"arch_layout), got {values!r}")
        if len(self.ratio_targets) != self.num_stages:
            raise ConfigError(f"ratio_targets: expected {self.num_stages} values (one per routing level), "
                              f"got {self.ratio_targets!r}")
        for s, n in enumerate(self.ratio_targets):
            if not n > 1:
                raise ConfigError(f"ratio_targets[{s}]: target compression must be > 1, got {n}")
        for s in range(n_levels):
            d = self.d_model[s]
            if not isinstance(d, int) or d <= 0:
                raise ConfigError(f"d_model[{s}]: expected a positive integer, got {d!r}")
            if s > 0 and d < self.d_model[s - 1]:
                raise ConfigError(f"d_model[{s}]: widths must not shrink inward ({self.d_model[s - 1]} -> {d})")
            if self.d_intermediate[s] < 0:
                raise ConfigError(f"d_intermediate[{s}]: must be >= 0, got {self.d_intermediate[s]}")
            letters = self.stage_letters(s)
            if {"t", "T"} & letters:
                h = self.attn_cfg.num_heads[s]
                if h <= 0 or d % h:
                    raise ConfigError(f"attn_cfg.num_heads[{s}]: {h} heads do not divide d_model[{s}] = {d}")
                r = self.attn_cfg.rotary_emb_dim[s]
                if r < 0 or r % 2 or r > d // h:
                    raise ConfigError(f"attn_cfg.rotary_emb_dim[{s}]: {r} must be even and at most the head "
                                      f"dim {d // h}")
            if "T" in letters or "M" in letters:
                if self.d_intermediate[s] <= 0:
                    raise ConfigError(f"d_intermediate[{s}]: upper-case layers ({sorted(letters)}) need an MLP "
                                      f"width > 0")
            if {"m", "M"} & letters:
                ssm = self.ssm_cfg
                d_inner = ssm.expand * d
                if d_inner % ssm.headdim:
                    raise ConfigError(f"ssm_cfg.headdim: {ssm.headdim} does not divide expand*d_model[{s}] = {d_inner}")
                if (d_inner // ssm.headdim) % ssm.ngroups:
                    raise ConfigError(f"ssm_cfg.ngroups: {ssm.ngroups} does not divide the {d_inner // ssm.headdim} heads")
        if self.vocab_size != 256:
            raise ConfigError(f"vocab_size: H-Net reads bytes, expected 256, got {self.vocab_size}")
        for k in ("d_state", "d_conv", "expand", "chunk_size", "headdim", "ngroups"):
            if getattr(self.ssm_cfg, k) <= 0:
                raise ConfigError(f"ssm_cfg.{k}: must be > 0, got {getattr(self.ssm_cfg, k)}")
        if self.ratio_alpha < 0:
            raise ConfigError(f"ratio_alpha: must be >= 0, got {self.ratio_alpha}")

    def stage_letters(self, stage: int) -> set[str]:
        layout = self.stage_layout(stage)
        strings = [layout[0]] if len(layout) == 1 else [layout[0], layout[2]]
        return {letter for s in strings for letter, _ in parse_layout(s)}

    # ----------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """The fields of the public JSON format (what the public inference code reads). The public
        code fixes headdim = 64 and ngroups = 1; other values are kept so the file stays faithful."""
        d = self.to_dict()
        ssm = d["ssm_cfg"]
        d["ssm_cfg"] = {k: ssm[k] for k in ("chunk_size", "d_conv", "d_state", "expand")}
        d["ssm_cfg"].update({k: ssm[k] for k, public in (("headdim", 64), ("ngroups", 1)) if ssm[k] != public})
        for k in ("ratio_targets", "ratio_alpha"):
            d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HNetConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"model config: expected a mapping, got {type(d).__name__}")
        return _build(cls, d, "model")

    @classmethod
    def from_json(cls, path: str | Path) -> "HNetConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "HNetConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model config file not found: {path}")
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "model" in data and "arch_layout" not in data:
            data = data["model"]
        return cls.from_dict(data)


def _build(cls, d: dict, where: str):
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**d)
    except TypeError as e:  # a missing required field
        raise ConfigError(f"{where}: {e}") from e


def model_section_dict(section: dict[str, Any]) -> dict[str, Any]:
    """The `model:` section of an experiment YAML -> what `HNetConfig.from_dict` takes: the
    public JSON named by `config_path` (absolute, relative to the working directory or to the
    repository) with the section's other keys laid over it (dicts merged key by key)."""
    import copy

    base: dict[str, Any] = {}
    config_path = section.get("config_path")
    if config_path:
        path = Path(config_path)
        if not path.is_absolute() and not path.exists():
            path = Path(__file__).resolve().parents[2] / path  # repository-relative
        if not path.is_file():
            raise ConfigError(f"model.config_path: no such file {config_path!r}")
        base = json.loads(path.read_text())
    for name in ("arch_layout", "d_model", "d_intermediate", "vocab_size", "ssm_cfg", "attn_cfg", "tie_embeddings",
                 "ratio_targets"):
        value = section.get(name)
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(base.get(name), dict):
            merged = dict(base[name])
            merged.update(value)
            value = merged
        base[name] = copy.deepcopy(value)
    if "ratio_alpha" in section and section["ratio_alpha"] is not None:
        base["ratio_alpha"] = section["ratio_alpha"]
    if "arch_layout" not in base:
        raise ConfigError("model: give model.config_path (a public JSON) or inline model.arch_layout etc.")
    return base
