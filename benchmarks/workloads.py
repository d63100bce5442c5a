"""Named workloads: what real video DiTs feed their attention stack.

Each workload is a pack of latent videos (T, H, W) after the VAE (temporal /4 + 1,
spatial /8), cut into patches (pt, ph, pw) and projected to `hidden` = heads * head_dim.

| name          | videos (frames, pixels)                      | latent (T, H, W)                      | C  | patch   | hidden | heads x dim | tokens |
| ------------- | -------------------------------------------- | ------------------------------------- | -- | ------- | ------ | ----------- | ------ |
| wan2.1-480p   | 81 frames 480x832                            | (21, 60, 104)                         | 16 | (1,2,2) | 1536   | 12 x 128    | 32760  |
| wan2.1-720p   | 81 frames 720x1280                           | (21, 90, 160)                         | 16 | (1,2,2) | 5120   | 40 x 128    | 75600  |
| hunyuan-720p  | 129 frames 720x1280                          | (33, 90, 160)                         | 16 | (1,2,2) | 3072   | 24 x 128    | 118800 |
| mixed-pack    | 81f 480x832 + 49f 240x416 + 1 image 720x1280 | (21, 60, 104), (13, 30, 52), (1, 90, 160) | 16 | (1,2,2) | 3072 | 24 x 128 | 41430  |
| mixed-60k     | 81f 480x832 + 49f 480x832 + 1 image 720x1280 | (21, 60, 104), (13, 60, 104), (1, 90, 160) | 16 | (1,2,2) | 3072 | 24 x 128 | 56640  |
| train-pack    | 4 x 81f 480x832 + 2 x 129f 720x1280          | 4 x (21, 60, 104), 2 x (33, 90, 160)  | 16 | (1,2,2) | 3072   | 24 x 128    | 368640 |
| sweep-<T>     | T latent frames at 480x832 (seq-length sweep) | (T, 60, 104)                         | 16 | (1,2,2) | 3072   | 24 x 128    | 1560*T |

(Wan2.1-14B uses hidden 5120 / 40 heads at 720p; Wan2.1-1.3B, hidden 1536 / 12 heads, at 480p.)
On CPU only the "cpu-tiny" workload (a few hundred tokens) runs: a smoke test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    shapes: tuple  # latent (T, H, W) per video
    channels: int = 16
    patch: tuple = (1, 2, 2)
    hidden: int = 3072
    heads: int = 24
    head_dim: int = 128

    @property
    def seqlens(self) -> list[int]:
        pt, ph, pw = self.patch
        return [(t // pt) * (h // ph) * (w // pw) for t, h, w in self.shapes]

    @property
    def num_tokens(self) -> int:
        return sum(self.seqlens)

    @property
    def features(self) -> int:
        pt, ph, pw = self.patch
        return self.channels * pt * ph * pw

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Wan-style split of the head dim over (t, h, w): d - 4*(d//6), 2*(d//6), 2*(d//6)."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    def label(self) -> str:
        return f"{self.name} [{self.num_tokens} tok, {len(self.shapes)} vid, {self.heads}x{self.head_dim}]"


WORKLOADS = {
    w.name: w for w in [
        Workload("wan2.1-480p", "Wan2.1-1.3B, 81 frames 480x832", ((21, 60, 104),), 16, (1, 2, 2), 1536, 12, 128),
        Workload("wan2.1-720p", "Wan2.1-14B, 81 frames 720x1280", ((21, 90, 160),), 16, (1, 2, 2), 5120, 40, 128),
        Workload("hunyuan-720p", "HunyuanVideo, 129 frames 720x1280", ((33, 90, 160),), 16, (1, 2, 2), 3072, 24, 128),
        Workload("mixed-pack", "81f 480x832 + 49f 240x416 + one 720x1280 image",
                 ((21, 60, 104), (13, 30, 52), (1, 90, 160)), 16, (1, 2, 2), 3072, 24, 128),
        Workload("mixed-60k", "81f 480x832 + 49f 480x832 + one 720x1280 image (the DiT-block target)",
                 ((21, 60, 104), (13, 60, 104), (1, 90, 160)), 16, (1, 2, 2), 3072, 24, 128),
        # head dim 72 (Open-Sora-like: hidden 1152 = 16 x 72): the "masked" tile class and
        # the ROW_ALIGN hint; opt-in (--workload), not in the default list
        Workload("mixed-d72", "81f 480x832 + 49f 240x416 + one 720x1280 image, 16 heads of 72",
                 ((21, 60, 104), (13, 30, 52), (1, 90, 160)), 16, (1, 2, 2), 1152, 16, 72),
        # a pack before sequence parallelism shards it (vdit_kernels.parallel): patchify
        # moves 94 MB here against 10 MB on mixed-pack, whose few-microsecond kernels
        # cannot reach a large copy's bandwidth (launch ramp and tail); opt-in (--workload)
        Workload("train-pack", "4 x 81f 480x832 + 2 x 129f 720x1280 (a sequence-parallel training pack)",
                 ((21, 60, 104),) * 4 + ((33, 90, 160),) * 2, 16, (1, 2, 2), 3072, 24, 128),
        Workload("cpu-tiny", "CPU smoke test: three tiny videos",
                 ((5, 12, 16), (1, 8, 8), (2, 6, 10)), 4, (1, 2, 2), 96, 2, 48),
    ]
}

SWEEP_FRAMES = (1, 3, 9, 21, 33)


def sweep(frames: Sequence[int] = SWEEP_FRAMES) -> list[Workload]:
    """Single 480x832 videos of growing length: the seq-length sweep for the plots."""
    return [Workload(f"sweep-{t}", f"{t} latent frames 480x832", ((t, 60, 104),)) for t in frames]


def select(device: str, quick: bool) -> list[Workload]:
    """The workloads of one run: tiny on CPU, small with --quick on GPU, all otherwise."""
    if device != "cuda":
        return [WORKLOADS["cpu-tiny"]]
    if quick:
        return [WORKLOADS["wan2.1-480p"], WORKLOADS["mixed-pack"]]
    return [WORKLOADS[n] for n in ("wan2.1-480p", "wan2.1-720p", "hunyuan-720p", "mixed-pack", "mixed-60k")] + sweep()
