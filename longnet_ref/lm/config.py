"""What a training run is: `TrainConfig` (every field, checked once, errors naming the CLI flag)
and the presets "cpu", "gpu" and "tiny". `train.py` runs one; `experiment.py` defines several.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import ATTENTION_KINDS, ModelConfig

TASKS = ("code", "recall")
# fields that define the model or the data stream: a resumed run must agree on them
MODEL_FIELDS = ("attention", "seq_len", "embed_dim", "num_heads", "num_layers", "segment_lengths", "dilation_rates")
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
        for name in ("seq_len", "steps", "batch_size", "embed_dim", "num_heads", "num_layers", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"--threads must be 0 (torch's default) or a positive integer, got {self.threads!r}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)!r}")
        N = self.seq_len
        if not self.segment_lengths and not self.dilation_rates:
            self.segment_lengths = [max(1, N // 4), max(2, N // 2), max(4, N)]
            self.dilation_rates = [1, 2, 4]
        if len(self.segment_lengths) != len(self.dilation_rates):
            raise ValueError(
                f"--segment-lengths {self.segment_lengths} and --dilation-rates {self.dilation_rates} "
                "must have the same number of entries"
            )
        if self.attention == "dilated" and max(self.segment_lengths) < N:
            # Every branch's segments nest inside the largest one, so no information crosses a
            # largest-segment boundary in any number of layers: training would see chunks.
            raise ValueError(
                f"--seq-len {N} is not covered by --segment-lengths {self.segment_lengths}: the largest "
                f"segment length must be >= the training length, or tokens {max(self.segment_lengths)} "
                "apart in different segments never exchange information"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"--embed-dim {self.embed_dim} is not divisible by --num-heads {self.num_heads}")
        self.model_config()  # validates the branches and head size with ModelConfig's messages

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            attention=self.attention,
            segment_lengths=self.segment_lengths,
            dilation_rates=self.dilation_rates,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
        )


PRESETS = {
    "cpu": {},  # the TrainConfig defaults
    "gpu": dict(seq_len=4096, steps=1500, batch_size=8, embed_dim=384, num_heads=8, num_layers=6, lr=1e-3),
    "tiny": dict(seq_len=64, steps=20, batch_size=4, embed_dim=32, num_heads=4, num_layers=2, eval_every=10, warmup=5),
}
