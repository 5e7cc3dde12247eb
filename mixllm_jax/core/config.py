"""One configuration for a router: how it reads text, what it learns, and where it operates.

`RouterConfig` is what `train_router`, the CLI, ablations and experiments share; a checkpoint
saves it as one key. Light to import (no JAX).
"""

from __future__ import annotations

import dataclasses
import re

FEATURE_MODES = ("raw+domain", "soft-domain", "head", "raw")
DEFAULT_RIDGES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
DEFAULT_DOMAIN_PRECISIONS = (0.1, 1000.0)  # domain intercepts: free, or pulled to the arm's mean
RIDGE_SELECTION = ("validation", "evidence")
DEFAULT_DOMAINS = 20  # k-means clusters when a log has no tags (the paper derives ~20 domains)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The tag-enhanced head (tags.py): sizes, optimiser and the weight of the domain losses."""

    hidden: int = 256
    features: int = 64
    epochs: int = 300
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    tag_weight: float = 1.0  # 0 trains the regression alone (the ablation without tags)
    margin: float = 1.0
    val_frac: float = 0.1  # held out for early stopping on the regression loss (0: no stopping)
    patience: int = 20
    seed: int = 0


FINETUNE_METHODS = ("lora", "top")
LORA_TARGETS = ("query", "key", "value", "attention_out", "intermediate", "output")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning the encoder on routing outcomes before the router is fitted (finetune.py).

    method: "lora" adds low-rank adapters (rank, lora_alpha) to the `lora_targets` matrices of the
      top `layers` transformer layers; "top" trains those layers' weights outright. Either way the
      layers below are frozen and their hidden states are computed once per data set (and cached).
    Losses on the pooled, unit-norm embedding e (weights 0 switch a term off):
      contrastive: RouterDC's sample-LLM loss: cosine of e to a learnable key per LLM, over
        `temperature`; each of the query's `top_k` best LLMs against its `bottom_k` worst (ties
        included; LLMs that tie with the worst are never positives, with the best never negatives).
      sample: sample-sample (supervised) contrastive loss: queries of the same domain (tag, or
        k-means cluster when the log has none) are positives in the batch (`sample_temperature`).
      regression: squared error of a linear read-out of e predicting every LLM's quality (per-LLM
        standardised; NaN outcomes masked).
    Optimiser: adamw(learning_rate, weight_decay) for at most `epochs` epochs of `batch_size`;
    early stopping on the total loss of a held-out `val_frac` of the data (patience in epochs; the
    best epoch is kept).
    """

    method: str = "lora"
    layers: int = 1
    rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    contrastive: float = 1.0
    sample: float = 0.1
    regression: float = 1.0
    top_k: int = 3
    bottom_k: int = 3
    temperature: float = 0.1
    sample_temperature: float = 0.1
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    val_frac: float = 0.1
    patience: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.method not in FINETUNE_METHODS:
            raise ValueError(f"finetune method must be one of {FINETUNE_METHODS}, got {self.method!r}")
        for name in ("layers", "rank", "top_k", "bottom_k", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"finetune {name} must be a positive integer, got {v!r}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"finetune epochs must be a non-negative integer, got {self.epochs!r}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad or not self.lora_targets:
            raise ValueError(f"lora_targets must be a non-empty subset of {LORA_TARGETS}, got {self.lora_targets!r}")
        for name in ("contrastive", "sample", "regression", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"finetune {name} must be >= 0, got {getattr(self, name)!r}")
        if self.contrastive + self.sample + self.regression <= 0:
            raise ValueError("finetune needs a loss: contrastive, sample and regression weights are all 0")
        for name in ("temperature", "sample_temperature", "learning_rate", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"finetune {name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.val_frac < 0.9:
            raise ValueError(f"finetune val_frac must be in [0, 0.9), got {self.val_frac!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        d = dict(d)
        if "lora_targets" in d:
            d["lora_targets"] = tuple(d["lora_targets"])
        return cls(**d)


_BUDGET = re.compile(r"^\s*(?P<v>[0-9.eE+-]+)\s*(?P<pct>%?)\s*$")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Where on its cost-quality curve a router operates.

    kind "share": mean cost per query at most `value` (a fraction) of the reference LLM's;
      "usd": mean cost per query at most `value` USD;  "cost_weight": lambda = `value` directly.
    reference: the LLM of a "share" budget (None: the most expensive one).
    """

    kind: str = "share"
    value: float = 0.25
    reference: str | None = None

    def __post_init__(self):
        if self.kind not in ("share", "usd", "cost_weight"):
            raise ValueError(f"budget kind must be 'share', 'usd' or 'cost_weight', got {self.kind!r}")
        v = self.value
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 <= v < 1e9):
            raise ValueError(f"budget value must be a finite number >= 0, got {v!r}")
        if self.kind == "share" and not 0 < v <= 10:
            raise ValueError(f"a budget share must be in (0, 10] (a fraction; 25% is 0.25), got {v!r}")

    @classmethod
    def parse(cls, text: str, reference: str | None = None) -> "Budget":
        """`"25%"` -> share 0.25 of the reference LLM's cost (a bare number is also a share)."""
        m = _BUDGET.match(str(text))
        if not m:
            raise ValueError(f"--budget must look like 25% or 0.25, got {text!r}")
        v = float(m["v"])
        return cls("share", v / 100.0 if m["pct"] else v, reference)

    def describe(self) -> str:
        if self.kind == "share":
            return f"{100 * self.value:g}% of {self.reference or 'the most expensive LLM'}'s cost"
        if self.kind == "usd":
            return f"{self.value:g} USD per query"
        return f"cost weight {self.value:g}"


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Every setting of a trained router (see docs/architecture.md for what each one does).

    max_length, truncation_side: tokens kept per prompt and which end is cut.
    features: bandit features, see router.featurize ("raw+domain" default).
    ridges: candidate ridges of the embedding coefficients.
    domain_precisions: candidate prior precisions of the domain intercepts: 0.1 leaves each
      domain's intercept free, 1000 pulls it towards the arm's overall mean (~110 pseudo-observations
      at DOMAIN_SCALE 3: what small domains, many tags or k-means clusters of a small log, need). Never
      towards 0: the bias is free (fit.py). Chosen together with the ridge.
    ridge_selection: "validation" (default) takes the one (ridge, domain precision) whose held-out
      cost-quality curve is best (budget.OperatingCurve.score); "evidence" lets each arm take the
      pair of highest Bayesian evidence. Either way each arm's noise scale is its evidence estimate.
    domains: None uses the data's tags as domains (k-means into DEFAULT_DOMAINS when it has none);
      an int N clusters the embeddings into N domains (k-means) whatever the tags.
    head: the domains and the tag head (None: neither, features must be "raw"); the head's network is
      trained only for features "head", the other modes need the domains alone (tags.domain_head).
    budget: the operating point saved in the checkpoint and used by route, serve, eval, simulate.
    folds: cross-fitting folds of train that calibrate the budget and choose the ridge (the final
      fit uses all of train); < 2 turns calibration off (then only cost_weight budgets work).
    prior_weight: in (0, 1]: the offline log counts as prior_weight x its size in pseudo-observations
      (fit.fit_state): predictions are unchanged, widths grow by 1 / sqrt(prior_weight) and online
      feedback moves the arms faster (docs/architecture.md, "Online learning").
    spare_domains: domain slots kept free for domains opened online (domains.DomainGrowth); needs
      the head and features "raw+domain".
    finetune: fine-tune the encoder on the training outcomes first (FinetuneConfig; None: the
      encoder as given). The fine-tuned weights are saved in the checkpoint.
    """

    max_length: int = 128
    truncation_side: str = "left"
    features: str = "raw+domain"
    ridges: tuple[float, ...] = DEFAULT_RIDGES
    domain_precisions: tuple[float, ...] = DEFAULT_DOMAIN_PRECISIONS
    ridge_selection: str = "validation"
    domains: int | None = None
    head: HeadConfig | None = HeadConfig()
    budget: Budget = Budget()
    folds: int = 5
    prior_weight: float = 1.0
    spare_domains: int = 0
    finetune: FinetuneConfig | None = None

    def __post_init__(self):
        if self.features not in FEATURE_MODES:
            raise ValueError(f"features must be one of {FEATURE_MODES}, got {self.features!r}")
        if self.head is None and self.features != "raw":
            raise ValueError(f"features {self.features!r} need the tag head (head is None)")
        if self.truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}")
        if not isinstance(self.max_length, int) or not 8 <= self.max_length <= 512:
            raise ValueError(f"max_length must be an integer in [8, 512], got {self.max_length!r}")
        for name in ("ridges", "domain_precisions"):
            v = getattr(self, name)
            if not v or not all(isinstance(r, (int, float)) and 0 < r < 1e9 for r in v):
                raise ValueError(f"{name} must be positive numbers, got {v!r}")
        if self.ridge_selection not in RIDGE_SELECTION:
            raise ValueError(f"ridge_selection must be one of {RIDGE_SELECTION}, got {self.ridge_selection!r}")
        if self.domains is not None and not (isinstance(self.domains, int) and 2 <= self.domains <= 1000):
            raise ValueError(f"domains must be an integer in [2, 1000] or None, got {self.domains!r}")
        if not isinstance(self.folds, int) or not 0 <= self.folds <= 100:
            raise ValueError(f"folds must be an integer in [0, 100], got {self.folds!r}")
        if not isinstance(self.spare_domains, int) or not 0 <= self.spare_domains <= 256:
            raise ValueError(f"spare_domains must be an integer in [0, 256], got {self.spare_domains!r}")
        if self.spare_domains and (self.head is None or self.features != "raw+domain"):
            raise ValueError("spare_domains needs the tag head and features 'raw+domain'")
        if not isinstance(self.prior_weight, (int, float)) or not 0.0 < self.prior_weight <= 1.0:
            raise ValueError(f"prior_weight must be in (0, 1], got {self.prior_weight!r}")

    def replace(self, **kw) -> "RouterConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RouterConfig":
        """Inverse of to_dict; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown router config keys {unknown}")
        d = dict(d)
        if d.get("head") is not None:
            d["head"] = HeadConfig(**d["head"])
        if "budget" in d:
            d["budget"] = Budget(**d["budget"])
        for name in ("ridges", "domain_precisions"):
            if name in d:
                d[name] = tuple(float(r) for r in d[name])
        if d.get("finetune") is not None:
            d["finetune"] = FinetuneConfig.from_dict(d["finetune"])
        return cls(**d)
