"""What a training run is: `TrainConfig` (every field, checked once, errors naming the CLI flag)
and the presets "cpu", "gpu" and "tiny". `train.py` runs one; `experiment.py` defines several.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..checks import as_positive_number, check_branches, is_number
from .data import NUM_KEYS, recall_capacity
from .model import ATTENTION_KINDS, ModelConfig

TASKS = ("code", "recall")
DEVICES = ("auto", "cpu", "cuda")  # what --device offers; preflight.pick_device checks that it is there
INT_FIELDS = (
    "seq_len", "steps", "batch_size", "embed_dim", "num_heads", "num_layers", "num_pairs", "queries_per_pair",
    "eval_every", "eval_size", "warmup", "seed", "threads",
)  # fmt: skip
# fields that define the model or the data stream: a resumed run must agree on them
MODEL_FIELDS = ("attention", "seq_len", "embed_dim", "num_heads", "num_layers", "segment_lengths", "dilation_rates",
                "num_kv_heads")  # fmt: skip
RESUME_FIELDS = MODEL_FIELDS + ("task", "num_pairs", "queries_per_pair", "seed", "batch_size")


@dataclass
class TrainConfig:
    attention: str = "dilated"
    seq_len: int = 1024
    steps: int = 600
    batch_size: int = 8
    embed_dim: int = 128
    num_heads: int = 4
    num_layers: int = 4
    num_kv_heads: int | None = None  # grouped-query attention (None: num_heads)
    segment_lengths: list = field(default_factory=list)  # empty: [N/4, N/2, N]
    dilation_rates: list = field(default_factory=list)  # empty: [1, 2, 4]
    task: str = "code"
    num_pairs: int = 4  # recall task: needles per sequence...
    queries_per_pair: int = 8  # ...each asked this many times, at its own distance
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_size: int = 16  # code: validation windows of seq_len; recall: sequences
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads; 0: torch's default (one per core)

    def __post_init__(self):
        """Fill the default mixture from seq_len and check every field; errors name the CLI flag."""
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"--attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {DEVICES}, got {self.device!r}")
        self.check_numbers()
        self.fill_and_check_mixture()
        if self.embed_dim % self.num_heads:
            raise ValueError(f"--embed-dim {self.embed_dim} is not divisible by --num-heads {self.num_heads}")
        if self.num_kv_heads is not None:
            kv = self.num_kv_heads
            if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.num_heads % kv:
                raise ValueError(
                    f"--num-kv-heads must be a positive integer dividing --num-heads {self.num_heads}, got {kv!r}"
                )
        if self.task == "recall":
            self.check_recall_fits()
        self.model_config()  # validates the branches and head size with ModelConfig's messages

    def check_numbers(self):
        """Ints are ints (not bools, floats or strings); NaN fails every range below, and inf trains to NaN."""
        for name in INT_FIELDS:
            value, low = getattr(self, name), (0 if name in ("warmup", "seed", "threads") else 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                what = "a positive integer" if low else "an integer >= 0"
                raise ValueError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")
        if self.num_pairs > NUM_KEYS:  # needles have distinct keys
            raise ValueError(f"--num-pairs must be at most {NUM_KEYS} (the recall task's keys), got {self.num_pairs}")
        if self.seed >= 2**63:  # torch.manual_seed's range, with room for the data stream's seed + 1
            raise ValueError(f"--seed must be below 2**63, got {self.seed}")
        for name in ("lr", "grad_clip"):
            as_positive_number(f"--{name.replace('_', '-')}", getattr(self, name))
        if not (is_number(self.weight_decay) and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay!r}")

    def fill_and_check_mixture(self):
        """Empty lists: the default mixture [N/4, N/2, N] x [1, 2, 4]; given lists: valid branches covering N."""
        for name in ("segment_lengths", "dilation_rates"):  # None is not the default; the empty list is
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a list of positive integers (empty: the default mixture), "
                    f"got {getattr(self, name)!r}"
                )
            setattr(self, name, list(getattr(self, name)))  # a tuple would differ from a checkpoint's list
        N = self.seq_len
        if not self.segment_lengths and not self.dilation_rates:
            self.segment_lengths = [max(1, N // 4), max(2, N // 2), max(4, N)]
            self.dilation_rates = [1, 2, 4]
        if len(self.segment_lengths) != len(self.dilation_rates):
            raise ValueError(
                f"--segment-lengths {self.segment_lengths} and --dilation-rates {self.dilation_rates} "
                "must have the same number of entries"
            )
        check_branches(self.segment_lengths, self.dilation_rates)  # ints with r <= w, before max() compares them
        if self.attention == "dilated" and max(self.segment_lengths) < N:
            # Every branch's segments nest inside the largest one, so no information crosses a
            # largest-segment boundary in any number of layers: training would see chunks.
            raise ValueError(
                f"--seq-len {N} is not covered by --segment-lengths {self.segment_lengths}: the largest "
                f"segment length must be >= the training length, or tokens {max(self.segment_lengths)} "
                "apart in different segments never exchange information"
            )

    def check_recall_fits(self):
        """The recall task's needles and queries fit in --seq-len (`recall_capacity`); its distance buckets exist."""
        N, pairs, per_pair = self.seq_len, self.num_pairs, self.queries_per_pair
        if N < 8:  # evaluate.recall_buckets
            raise ValueError(f"--task recall needs --seq-len >= 8 for its distance buckets, got {N}")
        most = recall_capacity(N, per_pair)
        if pairs > most:
            raise ValueError(
                f"--task recall: --num-pairs {pairs} needles, each asked --queries-per-pair {per_pair} times, "
                f"take {pairs} x (1 + {per_pair}) = {pairs * (1 + per_pair)} positions; they must fit in half "
                f"of --seq-len {N} ({N // 2}), with at most {NUM_KEYS} keys: at most {most} pairs fit. "
                "Lower --num-pairs or --queries-per-pair, or raise --seq-len"
            )

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            attention=self.attention,
            segment_lengths=self.segment_lengths,
            dilation_rates=self.dilation_rates,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
        )


PRESETS = {
    "cpu": {},  # the TrainConfig defaults
    "gpu": dict(seq_len=4096, steps=1500, batch_size=8, embed_dim=384, num_heads=8, num_layers=6, lr=1e-3),
    "tiny": dict(seq_len=64, steps=20, batch_size=4, embed_dim=32, num_heads=4, num_layers=2, eval_every=10, warmup=5),
}


def preset_values(name):
    """What a flag defaults to in each preset: "default: cpu 1024, gpu 4096, tiny 64"."""
    known = [f.name for f in fields(TrainConfig)]
    if name not in known:
        raise ValueError(f"name must be a TrainConfig field, one of {known}, got {name!r}")
    default = getattr(TrainConfig(), name)  # the dataclass's defaults, default_factory ones included
    values = [f"{preset} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"
              for preset, value in ((p, PRESETS[p].get(name, default)) for p in sorted(PRESETS))]  # fmt: skip
    return "default: " + ", ".join(values)
